"""lm-evaluation-harness through `python -m recipes.eval --lm_eval`, offline, on local tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import flags

pytest.importorskip("lm_eval")

from recipes import harness  # noqa: E402
from recipes.core.config import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMIT = 20


def offline_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CAMELID_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_eval(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    """`python -m recipes.eval ARGS` from the repository, offline, with its cache in `cache`."""
    return subprocess.run(
        [sys.executable, "-m", "recipes.eval", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=offline_env(cache),
        timeout=600,
    )


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory) -> Path:
    """A peft LoRA adapter folder for the tiny Llama, as training exports it (with the
    tokenizer), its B matrices random too so that it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lm_eval") / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_dir),
        LoraConfig(
            r=8,
            lora_alpha=64,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(out)
    return out


def test_items_from_shared_data(data_dir, tmp_path):
    gpt4 = json.loads((data_dir / harness.GPT4).read_text())
    davinci = json.loads((data_dir / harness.DAVINCI).read_text())
    answer_of = {
        (r["instruction"].strip(), r["input"].strip()): r["output"].strip() for r in davinci
    }
    for answers in ("gpt4", "davinci"):
        items = harness.build_alpaca_mc(gpt4, davinci, answers)
        assert items == harness.build_alpaca_mc(gpt4, davinci, answers)  # deterministic
        assert len(items) == 986  # 1,000 minus 14 repeated instructions
        assert len({(it["instruction"], it["input"]) for it in items}) == len(items)
        own = {}  # an instruction repeated in the GPT-4 file: its first answer
        for r in gpt4:
            own.setdefault((r["instruction"].strip(), r["input"].strip()), r["output"].strip())
        for it in items:
            key = (it["instruction"], it["input"])
            right = (own if answers == "gpt4" else answer_of)[key]
            assert len(it["choices"]) == harness.N_CHOICES == len(set(it["choices"]))
            assert it["choices"][it["label"]] == right
            assert it["question"].startswith(f"### Instruction:\n{key[0]}")
            assert it["question"].endswith("### Response:") and (key[1] in it["question"])
        labels = [it["label"] for it in items]
        assert all(labels.count(k) > len(items) / 6 for k in range(harness.N_CHOICES))  # spread
        # the answer's length rank among its choices is about uniform: guessing by length
        # (the longest, the shortest, the second longest...) does about as well as chance
        ranks = [
            sorted(range(4), key=lambda k: (len(it["choices"][k]), k)).index(it["label"])
            for it in items
        ]
        assert all(0.18 < ranks.count(r) / len(items) < 0.32 for r in range(4)), ranks

    folder = harness.prepare_tasks(data_dir, tmp_path)
    for name in harness.LOCAL_TASKS:
        yaml = (folder / f"{name}.yaml").read_text()
        assert f'test: "{folder / name}.jsonl"' in yaml and "${" not in yaml
        assert sum(1 for _ in open(folder / f"{name}.jsonl")) == 986
    stamp = (folder / "camelid_alpaca_mc.jsonl").stat().st_mtime_ns
    assert harness.prepare_tasks(data_dir, tmp_path) == folder  # reused, not rebuilt
    assert (folder / "camelid_alpaca_mc.jsonl").stat().st_mtime_ns == stamp


def test_cli_model_and_adapter(llama_dir, adapter, data_dir, tmp_path):
    """The exported model and base + adapter, perplexity and lm-eval side by side."""
    out = tmp_path / "eval.json"
    res = run_eval(
        flags(
            model=str(llama_dir),
            adapter=str(adapter),
            data=str(data_dir / "fastchat_dummy_conversation.json"),
            max_samples="4",
            lm_eval="camelid_alpaca_mc",
            lm_eval_limit=str(LIMIT),
            out=str(out),
            lm_eval_data=str(data_dir),
        ),
        tmp_path / "cache",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "mean ppl" in res.stdout  # the perplexity table is still there
    tables = [line for line in res.stdout.splitlines() if line.startswith("|camelid_alpaca_mc")]
    assert len(tables) == 2 and all("|acc " in line for line in tables), res.stdout
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2
    rows = result["lm_eval"]
    assert [r["adapter"] for r in rows] == [None, str(adapter)]
    assert "peft" not in rows[0]["model_args"] and rows[1]["model_args"]["peft"] == str(adapter)
    for row in rows:
        task = row["results"]["camelid_alpaca_mc"]
        for metric in ("acc,none", "acc_norm,none"):
            assert 0.0 <= task[metric] <= 1.0
            assert task[metric] * LIMIT == pytest.approx(round(task[metric] * LIMIT))  # k of 20
        assert task["sample_len"] == LIMIT
        assert row["n-samples"]["camelid_alpaca_mc"] == {"original": 986, "effective": LIMIT}
        assert row["table"] in res.stdout


def test_adapter_changes_the_scores(llama_dir, adapter, data_dir, tmp_path):
    """lm-eval really scores through the adapter: the choices' log-likelihoods move."""
    rows = harness.run(
        str(llama_dir),
        [str(adapter)],
        ["camelid_alpaca_mc"],
        limit=3,
        data_dir=data_dir,
        cache_dir=tmp_path,
        log_samples=True,
    )
    base, tuned = (r["samples"]["camelid_alpaca_mc"] for r in rows)
    assert [s["doc_id"] for s in base] == [s["doc_id"] for s in tuned] == [0, 1, 2]
    for b, t in zip(base, tuned):
        assert len(b["loglikelihoods"]) == len(t["loglikelihoods"]) == harness.N_CHOICES
        assert all(x < 0 for x in b["loglikelihoods"] + t["loglikelihoods"])
        assert max(abs(x - y) for x, y in zip(b["loglikelihoods"], t["loglikelihoods"])) > 0.1


def test_usage_errors(llama_dir, data_dir, capsys):
    from recipes import eval as evaluation

    code = evaluation.main(["--model", str(llama_dir)])  # neither --data nor --lm_eval
    assert code == 2 and "--lm_eval" in capsys.readouterr().err
    code = evaluation.main(["--model", str(llama_dir), "--lm_eval", "camelid"])  # no task data
    assert code == 2 and "--lm_eval_data" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="at least 1"):
        harness.run(str(llama_dir), [], ["camelid_alpaca_mc"], limit=0, data_dir=data_dir)
    with pytest.raises(ConfigError, match="not an adapter folder"):
        harness.model_args(str(llama_dir), str(llama_dir))
    with pytest.raises(ConfigError, match="no_such_dir.*does not exist"):
        harness.run(str(llama_dir), ["no_such_dir"], ["camelid_alpaca_mc"], data_dir=data_dir)


@pytest.mark.slow  # lm-eval indexes its thousands of built-in task files, twice
def test_task_errors(llama_dir, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown lm-eval task.*no_such_task.*camelid_alpaca_mc"):
        harness.task_manager(["camelid_alpaca_mc", "no_such_task"], data_dir, tmp_path)
    # a built-in task needs the hub: a clear error before any model is loaded, exit code 2
    res = run_eval(["--model", str(llama_dir), "--lm_eval", "arc_easy"], tmp_path / "cache")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "arc_easy" in res.stderr and "hub" in res.stderr, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr  # failed before the model was loaded
