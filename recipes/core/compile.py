"""--compile (torch.compile per decoder layer) and --use_liger_kernel (Liger's fused kernels).

Compilation follows torchtune's practice (training.compile_model): each decoder layer is
compiled in place with `layer.compile()`, after activation checkpointing is set up and before
the engine shards the model (FSDP2's `fully_shard` per layer, then the root). In-place
compilation keeps the module tree as it was: no `OptimizedModule` wrapper, so state_dict keys
(checkpoints, exports) carry no `_orig_mod.` prefix, `fully_shard` still finds the layers by
class, and DDP / ZeRO-2 see the same parameters. Only the layers are compiled: the embedding,
the final norm and camelid's chunked loss (recipes/core/loss.py, module hooks) stay eager.

Activation checkpointing: transformers wraps each layer's `forward` in torch.utils.checkpoint
(non-reentrant), and `layer.compile()` compiles the layer's call, so the checkpointed forward
is traced inside the compiled region (dynamo's checkpoint higher-order op); the recompute in
backward runs the compiled code again.

ZeRO-3 is refused: it gathers every parameter in forward hooks on every submodule, and a
per-layer compile traces into them. Measured with the refusal bypassed (tiny model, 2 layers,
2 CPU ranks): the losses were right, but dynamo took 39 graph breaks (DeepSpeed's
torch.compiler.disable()d fetch functions, its parameter coordinator), built 13 graphs, hit its
recompile limit (those frames then run eager) and spent 94 s in the first forward: slower than
eager for nothing. DeepSpeed's own `engine.compile()` compiles the whole engine, not this
per-layer scheme, and is not wired up here. ZeRO-2 has no such hooks and compiles cleanly.

Graph breaks are reported, not hidden: after the first forward through the compiled layers
(rank 0) one line gives the compile time of that forward, the number of graph breaks dynamo
took, and their reasons (torch._dynamo.utils.counters["graph_break"]).
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from .config import ConfigError
from .engines import decoder_layer_classes


def check_liger(cfg) -> None:
    """--use_liger_kernel needs its package and a GPU: refused before anything loads. (What
    --compile cannot do is refused with the other settings, in recipes/core/config.py.)"""
    if not cfg.use_liger_kernel:
        return
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--use_liger_kernel True needs the liger-kernel package (pip install "
            "liger-kernel), which is not installed; or pass --use_liger_kernel False"
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError(
            "--use_liger_kernel True needs a CUDA GPU (Liger's kernels are Triton GPU "
            "kernels); no GPU here: pass --use_liger_kernel False"
        )


def apply_liger(model, cfg) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on this model instance (checked by check()).

    The loss: with camelid's chunked loss (--loss_chunk_size > 0, the default) the model is
    called without labels and returns one position's logits (recipes/core/loss.py), so Liger's
    fused linear cross-entropy would never run; it is left off and the chunked loss stays. With
    --loss_chunk_size 0 the labels go to the model, and Liger's fused linear cross-entropy
    replaces transformers' loss (the same token sum / num_items_in_batch)."""
    if not cfg.use_liger_kernel:
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger would skip it with a log line
        raise ConfigError(
            f"--use_liger_kernel True: Liger has no kernels for model type "
            f"{model_type!r}; pass --use_liger_kernel False"
        )
    fused = cfg.loss_chunk_size == 0
    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=fused,
    )


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers, `model.model.layers[i]` for Llama-style models."""
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def compile_layers(model, cfg, main: bool = True, *, backend: str = "inductor") -> int:
    """Compile each decoder layer in place (see the module docstring); returns how many. With
    `main`, one line after the first forward reports compile time and graph breaks."""
    if not cfg.compile:
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    report = GraphBreakReport(len(layers))
    handles = []

    def started(_module, _args):
        if report.started is None:
            report.started = time.perf_counter()

    def finished(_module, _args, _output):
        for h in handles:
            h.remove()
        report.seconds = time.perf_counter() - report.started
        if main:
            print(report.line(), flush=True)

    # on the root, outside the compiled regions (a hook on a layer would be traced: a layer's
    # hooks run inside its compiled call); the first forward holds the layers' compilation
    handles.append(model.register_forward_pre_hook(started, prepend=True))
    handles.append(model.register_forward_hook(finished))
    model._camelid_compile_report = report
    return len(layers)


class GraphBreakReport:
    """Graph breaks (and compiled graphs) that dynamo counted since the layers were compiled."""

    def __init__(self, n_layers: int):
        from torch._dynamo.utils import counters

        self.n_layers = n_layers
        self.started: float | None = None
        self.seconds: float | None = None
        self._before = Counter(counters["graph_break"])
        self._graphs_before = counters["stats"]["unique_graphs"]

    def breaks(self) -> Counter:
        from torch._dynamo.utils import counters

        return Counter(counters["graph_break"]) - self._before

    def graphs(self) -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"] - self._graphs_before

    def line(self) -> str:
        breaks = self.breaks()
        total = sum(breaks.values())
        reasons = "; ".join(
            f"{n}x {' '.join(str(reason).split())[:120]}" for reason, n in breaks.most_common(5)
        )
        more = f"; +{len(breaks) - 5} more reasons" if len(breaks) > 5 else ""
        timing = f" in {self.seconds:.1f} s (first forward)" if self.seconds is not None else ""
        return (
            f"compile: {self.n_layers} decoder layers compiled{timing}, {self.graphs()} graph(s); "
            f"graph breaks: {total}" + (f" ({reasons}{more})" if total else "")
        )
