"""--compile True (torch.compile per decoder layer) and --use_liger_kernel on CPU.

Tolerance for compiled vs eager losses: inductor fuses and reorders fp32 work (the RMSNorm
variance, softmax and pointwise chains become one C++ loop each, reductions may be split), so
an op's result may differ from eager by a few fp32 ulps (~1e-7 relative). Over 3 AdamW steps at
lr 1e-3 that measured |loss_compiled - loss_eager| <= 1e-6 (loss ~6.5; 0 under FSDP2). 1e-4
leaves two orders of magnitude for other CPUs / thread counts, and is still 1000x smaller than
the loss change per step (>= 0.1 here): a layer compiled wrong, skipped, or not trained (its
gradients lost) moves step 2's loss by far more than that.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from train_utils import flags, losses, train

from recipes.core.compile import compile_layers
from recipes.core.config import ConfigError
from recipes.core.recipe import QLoraConfig, TrainConfig

BASE = ["--config", "tiny_cpu.yaml", "--learning_rate", "1e-3", "--save_steps", "100"]
TOL = 1e-4  # see the module docstring
NOTE = re.compile(
    r"^compile: 2 decoder layers compiled in [\d.]+ s \(first forward\), (\d+) graph\(s\); "
    r"graph breaks: (\d+)",
    re.M,
)


def steps(n: int, ranks: int = 1) -> list:
    # global batch 8 = 4 x 2 accumulation x 1 rank = 4 x 1 x 2 ranks
    return [
        *BASE,
        *flags(max_steps=n, per_device_train_batch_size=4, gradient_accumulation_steps=2 // ranks),
    ]


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    out = tmp_path_factory.mktemp("eager")
    train("single", 1, out, *steps(3))
    return out


def export_keys(out) -> list[str]:
    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        return sorted(f.keys())


def checkpoint_keys(out) -> list[str]:
    (dcp,) = (out / "checkpoints").glob("step-*/dcp")
    return sorted(FileSystemReader(str(dcp)).read_metadata().state_dict_metadata)


def check_compiled_run(res, out, eager) -> None:
    """The graph-break note, eager's losses, and eager's checkpoint / export keys."""
    (note,) = NOTE.findall(res.stdout)
    graphs, _breaks = map(int, note)
    assert graphs >= 1, res.stdout[-2000:]  # the layers really ran compiled code
    ref, got = losses(eager), losses(out)
    assert len(got) == 3 and ref[-1] < ref[0] - 0.1
    assert max(abs(a - b) for a, b in zip(ref, got)) < TOL, (ref, got)
    # compiled in place: no `_orig_mod.` in checkpoints or the exported model
    assert checkpoint_keys(out) == checkpoint_keys(eager)
    assert export_keys(out) == export_keys(eager)
    assert not any("_orig_mod" in k for k in checkpoint_keys(out) + export_keys(out))


def test_compiled_layers_with_checkpointing_train_like_eager(eager, tmp_path):
    res = train(
        "single", 1, tmp_path, *steps(3), "--compile", "True", "--gradient_checkpointing", "True"
    )
    check_compiled_run(res, tmp_path, eager)


@pytest.mark.slow
def test_compiled_layers_under_fsdp2_train_like_eager(eager, tmp_path):
    res = train("fsdp", 2, tmp_path, *steps(3, ranks=2), "--compile", "True")
    check_compiled_run(res, tmp_path, eager)


def test_graph_breaks_are_counted_and_named(llama_dir, capsys):
    """A layer whose hook dynamo cannot trace (it runs inside the layer's compiled call):
    the note counts the break and gives its reason."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    assert compile_layers(model, TrainConfig(compile=True), backend="eager") == 2
    model.model.layers[0].register_forward_pre_hook(lambda *_: torch._dynamo.graph_break())
    model(torch.randint(3, 100, (1, 8)))
    model(torch.randint(3, 100, (1, 8)))  # a second forward prints nothing more
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("compile:")]
    (note,) = NOTE.findall(line)
    assert int(note[1]) >= 1 and "graph_break" in line, line


@pytest.mark.parametrize(
    ("settings", "cls", "message"),
    [
        ({"strategy": "zero3"}, TrainConfig, "ZeRO-3 gathers each parameter in module hooks"),
        ({"strategy": "zero3_offload"}, TrainConfig, "--strategy fsdp"),
        ({"strategy": "single"}, QLoraConfig, "an adapter's quantized"),
    ],
    ids=["zero3", "zero3_offload", "adapter"],
)
def test_compile_refused_where_it_cannot_work(settings, cls, message):
    with pytest.raises(ConfigError, match=message):
        cls(compile=True, **settings).check()
    cls(compile=False, **settings).check()  # without: fine


def test_liger_kernel_refused_without_package_or_gpu(tmp_path):
    try:
        import liger_kernel  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    assert not (installed and torch.cuda.is_available()), "this test covers the refusal only"
    res = train("single", 1, tmp_path / "run", *steps(2), "--use_liger_kernel", "True", check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    want = "needs the liger-kernel package" if not installed else "needs a CUDA GPU"
    assert f"--use_liger_kernel True {want}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
