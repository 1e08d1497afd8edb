"""What a run trains, chosen independently of the objective: the full model, or an adapter
(LoRA, prompt tuning, P-tuning) on a frozen base, optionally quantized (QLoRA). A form builds
the model and its engine, and exports the result as a plain Hugging Face folder that loads
with no camelid import."""

from __future__ import annotations

import json
from pathlib import Path

from fastchat_data.io import save_tokenizer
from fastchat_data.outputs import StagedDir

from .attention import attention_kwargs
from .checkpoint import agree_written
from .compile import apply_liger, compile_layers
from .config import ConfigError, data_paths
from .engines import make_engine
from .loading import enable_activation_checkpointing, load_model
from .lora import add_adapter, load_base, verify_adapter
from .run_folder import RUN_INFO, written_by_command

QUANTIZED = {"none": "", "int8": "8-bit ", "nf4": "4-bit nf4 ", "fp4": "4-bit fp4 "}


def _finish_export(engine, tokenizer, folder: Path, *, info: dict) -> dict:
    """Tokenizer (with the training template as its chat template) and camelid.json."""
    info = dict(info)
    if info.get("template") is not None:
        from .generate import save_for_inference

        info.update(save_for_inference(tokenizer, info["template"], folder))
    else:
        save_tokenizer(tokenizer, folder)
    return info


def _written_by_rank0(world, write, out: Path) -> Path | None:
    """`write()` on rank 0; every rank learns whether it failed (see agree_written)."""
    error = None
    if world.main:
        try:
            write()
        except OSError as e:
            error = e
    agree_written(world, error, f"the export {out}")
    return out if world.main else None


def _export_folder(run, out: Path) -> StagedDir:
    """Where an export is staged: guarded against the run's inputs, owned by the run, and
    replaced whole only if a recipe wrote it."""
    return StagedDir(
        out, inputs=_export_inputs(run), owner=run.folder.root, marker=written_by_command("recipe")
    )


def _export_inputs(run) -> list:
    """What an export must never overwrite: the run's starting model and its data."""
    return [run.model_path, *data_paths(run.cfg.data_path)]


def loaded(load, path: str):
    """`load()`, with what a broken model folder raises as one line naming it."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        why = " ".join(str(e).split())[:240]
        raise ConfigError(
            f"model_name_or_path: {path}: the model cannot be loaded ({why})"
        ) from None


class FullModel:
    """Every weight trained; exported as a Hugging Face model folder (OUT/model)."""

    adapter = False
    exported = "exported model"

    def build(self, run):
        cfg = run.cfg
        # FSDP2 and ZeRO-3 load sharded (no rank holds the whole model); others one copy per rank
        # an objective may bring its own model class (the reward model's score head)
        load = getattr(run.objective, "load_model", None) or (
            lambda run: load_model(run.model_path, cfg, run.world)
        )
        model = loaded(lambda: load(run), run.model_path)
        apply_liger(model, cfg)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.config.use_cache = False
        # after activation checkpointing, before the engine shards (torchtune's order)
        compile_layers(model, cfg, main=run.world.main)
        engine = make_engine(
            model, cfg, run.world, total_steps=run.total_steps, weights_from=run.model_path
        )
        return model, engine, ""

    def export(self, run, info: dict, max_shard_size: str = "2GB") -> Path | None:
        """The final model, written by rank 0 from a state dict gathered onto its CPU (never
        whole on a GPU): safetensors sharded by size, config, tokenizer, chat template."""
        engine, world = run.engine, run.world
        state_dict = engine.full_state_dict()  # collective: every rank takes part
        out = run.folder.model

        def write():
            with _export_folder(run, out) as tmp:
                engine.module.config.use_cache = True
                # save_pretrained takes the gathered state dict; the (sharded) module the config
                engine.module.save_pretrained(
                    tmp,
                    state_dict=state_dict,
                    safe_serialization=True,
                    max_shard_size=max_shard_size,
                )
                record = _finish_export(engine, run.tokenizer, tmp, info=info)
                (tmp / RUN_INFO).write_text(json.dumps(record, indent=2, ensure_ascii=False))

        return _written_by_rank0(world, write, out)


class Adapter:
    """A trainable PEFT adapter on a frozen base; exported as a peft folder (OUT/adapter)."""

    adapter = True
    exported = "exported adapter"

    def build(self, run):
        cfg = run.cfg
        # an objective may bring its own model class (the reward model's score head) and the
        # adapter's peft task with it (SEQ_CLS: the new head trains whole)
        base_loader = getattr(run.objective, "base_loader", None)
        base = loaded(
            lambda: load_base(
                run.model_path,
                run.world.device,
                quantization=cfg.quantization,
                double_quant=cfg.double_quant,
                bf16=cfg.bf16,
                attention=attention_kwargs(cfg),
                from_pretrained=base_loader(run) if base_loader else None,
            ),
            run.model_path,
        )
        apply_liger(base, cfg)  # on the base model, before the adapter wraps its layers
        model = add_adapter(base, cfg, getattr(run.objective, "peft_task", "CAUSAL_LM"))
        engine = make_engine(model, cfg, run.world, total_steps=run.total_steps, adapter=True)
        return model, engine, f"{QUANTIZED[cfg.quantization]}base + {cfg.peft_method}, "

    def export(self, run, info: dict) -> Path | None:
        """The adapter as a plain peft folder plus the tokenizer, written by rank 0 and checked
        to hold real weights. Under ZeRO-3 its parameters are gathered first, one at a time."""
        engine, world = run.engine, run.world
        state_dict = engine.full_state_dict(trainable_only=True)  # collective under ZeRO-3
        out = run.folder.adapter

        def write():
            with _export_folder(run, out) as tmp:
                engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                record = _finish_export(engine, run.tokenizer, tmp, info=info)
                record["weights"] = verify_adapter(tmp)
                (tmp / RUN_INFO).write_text(json.dumps(record, indent=2, ensure_ascii=False))

        return _written_by_rank0(world, write, out)


def model_form(cfg) -> FullModel | Adapter:
    return FullModel() if cfg.peft_method == "none" else Adapter()
