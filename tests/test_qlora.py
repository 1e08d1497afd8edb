"""QLoRA on CPU, end to end on the tiny model and real data.

The story the evaluation table tells: a tiny Llama is first fully fine-tuned on English
Alpaca (it learns the instruction format), then adapted by 4-bit QLoRA to Chinese Alpaca;
on held-out Chinese instructions the adapter must beat the base zero-shot and few-shot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import (
    QLORA,
    REPO,
    assert_same_curve,
    command,
    env,
    flags,
    forked_job,
    losses,
    moved,
    ranks,
    run_in_repo,
    train,
    with_assets,
)

from recipes import eval as evaluation
from recipes.core import recipe
from recipes.core.config import ConfigError, load_config
from recipes.core.data import collate
from recipes.core.lora import load_adapter, load_base, verify_adapter
from recipes.core.recipe import QLoraConfig

QLORA_TINY = flags(config="qlora_tiny_cpu.yaml", report_to="none")


@pytest.fixture(scope="module")
def zh_split(data_dir, tmp_path_factory):
    """Chinese Alpaca: 900 to train on, 100 held out."""
    records = json.loads((data_dir / "alpaca_gpt4_data_zh_1k.json").read_text())
    root = tmp_path_factory.mktemp("zh")
    (root / "train.json").write_text(json.dumps(records[:900], ensure_ascii=False))
    (root / "heldout.json").write_text(json.dumps(records[900:], ensure_ascii=False))
    return root / "train.json", root / "heldout.json"


@pytest.fixture(scope="module")
def english_base(llama_dir, data_dir, tmp_path_factory):
    """The tiny Llama after a full fine-tune on English Alpaca: a base that means something."""
    out = tmp_path_factory.mktemp("en-base")
    en = data_dir / "alpaca_gpt4_data_en_1k.json"
    train(
        "single",
        1,
        out,
        *flags(config="tiny_cpu.yaml", data_path=en, max_steps=30, save_steps=1000),
        "--model_name_or_path",
        llama_dir,
    )
    return out / "model"


@pytest.fixture(scope="module")
def adapted(english_base, zh_split, tmp_path_factory):
    """QLoRA on Chinese Alpaca, run in-process so the trained model can be inspected."""
    out = tmp_path_factory.mktemp("qlora")
    cfg, _ = load_config(
        [
            *QLORA_TINY,
            *flags(model_name_or_path=english_base, data_path=zh_split[0], output_dir=out),
            # 30 + 24 steps (were 60 + 40): the loss still falls by 1.8 where 0.3 is asked, and
            # the adapter's held-out perplexity is 0.07 of the base's where 0.8 is asked
            *flags(max_steps=24, save_steps=1000),
        ],
        cls=QLoraConfig,
    )
    run = recipe.setup(recipe.get("qlora"), cfg)
    recipe.train(run)
    adapter = recipe.save(run)
    yield run, adapter
    recipe.cleanup(run)


def batch_loss(model, tokenizer, heldout, n=8):
    from fastchat_data.build import read_trainable
    from fastchat_data.report import Report
    from fastchat_data.tokenize import ConversationTokenizer

    encoder = ConversationTokenizer(tokenizer, "vicuna_v1.1", max_length=512)
    convs = list(read_trainable([str(heldout)], Report("t")))[:n]
    rows = [vars(e) for e in encoder.encode_batch(convs)]
    batch = collate(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], tokenizer.eos_token_id
    )
    with torch.no_grad():
        return model(**batch).loss.item()


def test_loss_falls_and_the_adapter_holds_real_weights(adapted):
    run, adapter = adapted
    curve = losses(adapter.parent)
    assert len(curve) == 24 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    summary = verify_adapter(adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    # LoRA r=16 on the 7 linear layers of 2 decoder layers, A and B each
    assert summary["tensors"] == len(weights) == 2 * 7 * 2
    assert summary["bytes"] >= 4 * summary["parameters"]  # fp32, nothing empty
    assert all(
        w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k
    )  # B starts at 0: trained
    assert json.loads((adapter / "camelid.json").read_text())["template"] == "vicuna_v1.1"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and "lm_head" not in config["target_modules"]
    assert not any(
        k.endswith("model.safetensors") and "adapter" not in k for k in os.listdir(adapter)
    )


def test_reloaded_adapter_gives_the_same_loss(adapted, zh_split):
    """Both in train mode (the tiny recipe has no dropout): in eval mode bitsandbytes' CPU
    path repacks 4-bit weights for a kernel that needs widths divisible by 32, which the tiny
    model's 344-wide MLP is not (real models' are)."""
    run, adapter = adapted
    trained = run.engine.module.train()
    before = batch_loss(trained, run.tokenizer, zh_split[1])
    reloaded = load_adapter(
        load_base(
            run.model_path,
            torch.device("cpu"),
            quantization=run.cfg.quantization,
            double_quant=run.cfg.double_quant,
            bf16=run.cfg.bf16,
        ),
        adapter,
    ).train()
    assert batch_loss(reloaded, run.tokenizer, zh_split[1]) == pytest.approx(before, abs=1e-6)


def test_merged_folder_matches_base_plus_adapter(adapted, tmp_path):
    """Merging adds scale*B@A into each full-precision weight: the same function, computed in
    another order. In fp32 the reassociation error is ~1e-7 relative per layer; through two
    layers and the head that stays under 1e-4 on these O(10) logits."""
    from transformers import AutoModelForCausalLM

    from recipes.merge import merge

    run, adapter = adapted
    merged_dir = merge(str(adapter), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    with_adapter = load_adapter(
        AutoModelForCausalLM.from_pretrained(run.model_path), adapter
    ).eval()
    x = torch.randint(
        3, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a, b = merged(x).logits, with_adapter(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
    base = AutoModelForCausalLM.from_pretrained(run.model_path)
    with torch.no_grad():
        assert (base(x).logits - a).abs().max() > 1e-2  # the merge changed the model


def test_eval_table_adapter_beats_zero_and_few_shot(adapted, english_base, zh_split, tmp_path):
    _, adapter = adapted
    out = tmp_path / "eval.json"
    res = forked_job(
        [
            *(sys.executable, "-m", "recipes.eval"),
            *flags(model=english_base, data=zh_split[1], adapter=adapter),
            *flags(shots=3, shots_from=zh_split[0], max_samples=30, generate=3),
            *flags(max_new_tokens=24, out=out),
        ],
        "single",
        1,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean ppl" in res.stdout and "few-shot (3 examples)" in res.stdout
    rows = {
        r["model"].split(" (")[0].split(" /")[0]: r for r in json.loads(out.read_text())["rows"]
    }
    zero, few = rows["zero-shot"], rows["few-shot"]
    tuned = next(r for k, r in rows.items() if k.startswith("adapter"))
    assert zero["samples"] == few["samples"] == tuned["samples"] == 30
    assert tuned["mean_perplexity"] < 0.8 * min(zero["mean_perplexity"], few["mean_perplexity"])
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(tuned)
    print(res.stdout)


def qlora_run_args(llama_dir, zh_split) -> list:
    """16 steps of QLoRA at global batch 8 (4 per device x 2 accumulation on one process)."""
    return [
        *QLORA_TINY,
        *flags(model_name_or_path=llama_dir, data_path=zh_split[0]),
        *flags(max_steps=16, save_steps=4, save_total_limit=0, logging_steps=1),
    ]


@pytest.fixture(scope="module")
def qlora_whole(llama_dir, zh_split, tmp_path_factory):
    """An uninterrupted one-process QLoRA run: the curve killed and moved runs must follow."""
    out = tmp_path_factory.mktemp("qlora-whole") / "run"
    train("ddp", 1, out, *qlora_run_args(llama_dir, zh_split), recipe=QLORA)
    return out


@pytest.mark.slow
def test_resume_after_kill_9_continues_the_same_losses(llama_dir, zh_split, qlora_whole, tmp_path):
    args = qlora_run_args(llama_dir, zh_split)
    out = tmp_path / "killed"
    slowed = command("ddp", 1, out, *args, recipe=QLORA, faults={"step_delay": 0.4})
    proc = subprocess.Popen(
        slowed,
        env=env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 16
    res = train("ddp", 1, out, *args, recipe=QLORA)
    assert "resumed from" in res.stdout
    assert losses(out) == losses(qlora_whole)  # bit-identical


@pytest.mark.slow
def test_a_qlora_run_moves_from_one_process_to_two(llama_dir, zh_split, qlora_whole, tmp_path):
    """The adapter, its optimizer state and the data position, written by one process, resume
    on two (4 per device x 1 accumulation: the same global batch) on the same curve: one job
    whose ranks see different data, saving real adapter weights."""
    out = moved(qlora_whole, tmp_path / "moved", step=8)
    args = [*qlora_run_args(llama_dir, zh_split), *flags(gradient_accumulation_steps=1)]
    res = train("ddp", 2, Path(out), *args, recipe=QLORA)
    assert "(step 8)" in res.stdout, res.stdout
    assert "note: moved: written by ddp x 1, resumed by ddp x 2" in res.stdout
    assert_same_curve(losses(Path(out)), losses(qlora_whole), at=8)
    r0, r1 = ranks(Path(out))
    assert r0["world_size"] == r1["world_size"] == 2
    assert not set(r0["sample_ids"]) & set(r1["sample_ids"])  # ranks see different data
    assert verify_adapter(Path(out) / "adapter")["tensors"] == 28


@pytest.mark.slow
def test_lora_under_zero3_saves_the_same_real_weights_as_one_process(llama_dir, zh_split, tmp_path):
    """Under ZeRO-3 an adapter's parameters are partitioned; saved without a gather they would
    be empty. The exported adapter must equal a 1-process run's with the same global batch."""
    args = [
        *QLORA_TINY,
        *flags(quantization="none", optim="adamw_torch"),
        *flags(model_name_or_path=llama_dir, data_path=zh_split[0]),
        *flags(max_steps=5, per_device_train_batch_size=4),
    ]
    train("single", 1, tmp_path / "one", *args, "--gradient_accumulation_steps", 2, recipe=QLORA)
    train("zero3", 2, tmp_path / "z3", *args, "--gradient_accumulation_steps", 1, recipe=QLORA)
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    z3 = load_file(str(tmp_path / "z3" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == z3.keys() and len(one) == 28
    for k in one:
        assert one[k].shape == z3[k].shape and one[k].numel() > 0
        # Adam turns the last-bit differences of a reordered loss sum into updates of up to
        # 2 x lr where a coordinate's gradient is near zero: 1e-5-scale after 5 steps at 3e-3
        # (measured 1.5e-5 with the chunked loss, 7e-6 with transformers'); a zero (unsaved)
        # tensor would differ by the whole 1e-2-scale weights
        assert torch.allclose(one[k], z3[k], atol=5e-5), k


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_methods_train_save_and_reload(method, llama_dir, zh_split, tmp_path):
    data = flags(model_name_or_path=llama_dir, data_path=zh_split[0])
    settings = flags(peft_method=method, max_steps=4, learning_rate="3e-2")
    res = train("single", 1, tmp_path, *QLORA_TINY, *data, *settings, recipe=QLORA)
    assert "exported adapter" in res.stdout
    assert verify_adapter(tmp_path / "adapter")["tensors"] >= 1
    from transformers import AutoModelForCausalLM

    model = load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")
    assert model.peft_config["default"].num_virtual_tokens == 20


def test_int8_base_and_paged_8bit_optimizer(llama_dir, zh_split, tmp_path):
    data = flags(model_name_or_path=llama_dir, data_path=zh_split[0])
    settings = flags(quantization="int8", optim="paged_adamw_8bit", max_steps=3)
    res = train("single", 1, tmp_path, *QLORA_TINY, *data, *settings, recipe=QLORA)
    assert "8-bit base + lora" in res.stdout
    assert verify_adapter(tmp_path / "adapter")["tensors"] == 28


@pytest.mark.slow
def test_accelerate_launch_runs_the_recipe(tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    res = run_in_repo(
        [
            accelerate,
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            str(QLORA),
            *with_assets([*QLORA_TINY, "--max_steps", 2, "--output_dir", tmp_path]),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    lora = verify_adapter(tmp_path / "adapter")
    assert lora["tensors"] == 28
    # the 4-bit weights count as the parameters they hold (not as their packed bytes)
    total = sum(p.numel() for p in base.parameters()) + lora["parameters"]
    assert f"{total / 1e6:.1f}M parameters" in res.stdout


def test_defaults_run_on_the_tiny_model_and_demo_data(tmp_path):
    """`python recipes/qlora.py` on the tiny model and identity data with the reference
    recipe's settings (r 64, alpha 16, paged AdamW, 1 x 4 batches)."""
    res = train("ddp", 1, tmp_path, "--max_steps", 3, recipe=QLORA)
    assert "4-bit nf4 base + lora" in res.stdout and "global batch 4" in res.stdout
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 64


# -- bad input: one clear message before any training step ---------------------------------


def test_unknown_target_module_is_named(llama_dir, tmp_path):
    settings = flags(model_name_or_path=llama_dir, lora_target_modules="q_proj,query_key_value")
    res = train("single", 1, tmp_path, *QLORA_TINY, *settings, check=False, recipe=QLORA)
    assert res.returncode == 2
    assert "query_key_value not in LlamaForCausalLM" in res.stderr and "q_proj" in res.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_model_bitsandbytes_cannot_quantize(llama_dir, tmp_path):
    import shutil

    quantized = tmp_path / "gptq"
    shutil.copytree(llama_dir, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(cfg))
    res = train(
        "single",
        1,
        tmp_path / "out",
        *QLORA_TINY,
        "--model_name_or_path",
        quantized,
        check=False,
        recipe=QLORA,
    )
    assert res.returncode == 2 and "already quantized (gptq)" in res.stderr


def test_adapter_for_another_base_is_refused(adapted, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastchat_data.tiny import tiny_model

    _, adapter = adapted
    other = tiny_model("llama", "small", texts=corpus, vocab_size=4000, cache_dir=REPO / ".cache")
    with pytest.raises(ConfigError, match="does not fit"):
        load_adapter(AutoModelForCausalLM.from_pretrained(other), adapter)
    res = run_in_repo(
        [
            sys.executable,
            "-m",
            "recipes.merge",
            *flags(adapter=str(adapter), base=str(other), out=str(tmp_path / "m")),
        ]
    )
    assert res.returncode == 2 and "does not fit" in res.stderr


def test_config_conflicts_are_refused():
    for argv, message in [
        (["--strategy", "zero3"], "paged_adamw_32bit is a bitsandbytes optimizer"),
        (
            ["--strategy", "zero3", "--optim", "adamw_torch"],
            "base trains with strategy single, ddp",
        ),
        (["--strategy", "fsdp"], "adapters train with strategy single, ddp"),
        (["--peft_method", "prompt_tuning", "--packing", "True"], "cannot pack"),
        (["--quantization", "int4"], "quantization 'int4'"),
        (["--lora_rank", "8"], "did you mean lora_r"),
        (["--data_path", f"{__file__},missing.json"], "data_path: missing.json does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(argv, cls=QLoraConfig)


# -- chat and metrics ------------------------------------------------------------------------


def test_chat_streams_multi_turn_with_reset_and_exit(adapted):
    run, adapter = adapted
    res = run_in_repo(
        [
            sys.executable,
            "-m",
            "recipes.chat",
            *flags(model=run.model_path, adapter=str(adapter), max_new_tokens="8"),
        ],
        input="你好\n再說一次\n/reset\n你好\n/exit\nnever read\n",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    answers = [line for line in res.stdout.split("ASSISTANT: ")[1:]]
    assert len(answers) == 3 and "(new conversation)" in res.stdout
    assert (
        answers[0].split("\n")[0] == answers[2].split("\n")[0]
    )  # greedy, same prompt after /reset


def test_eval_few_shot_masks_the_examples_answers():
    from fastchat_data.tokenize import IGNORE_INDEX as X

    labels = [X, 5, 6, X, X, 7, X, 8, 9]
    assert evaluation.only_last_replies(labels, 2) == [X, X, X, X, X, X, X, 8, 9]
