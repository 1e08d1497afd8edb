"""lm-evaluation-harness on camelid models, with local tasks that need no hub.

    python -m recipes.eval --model MODEL [--adapter ADAPTER] --lm_eval camelid_alpaca_mc \
        [--lm_eval_limit 100] [--out eval.json]

Runs `lm_eval.simple_evaluate` through its Hugging Face backend ("hf") on the model folder and
on the model with each adapter (lm-eval's `peft=` model argument), and returns lm-eval's
results, one entry per row.

Local tasks (`LOCAL_TASKS`, tag `camelid` for all of them) are multiple-choice tasks made
from two Alpaca files in the folder `--lm_eval_data` names (alpaca_gpt4_data_en_1k.json and
Stanford Alpaca's alpaca_data.json):
`build_alpaca_mc` makes the items, `prepare_tasks` writes them as JSON Lines beside the task
YAML (filled in from recipes/lm_eval_tasks/*.yaml.template) into a cache folder keyed by the
data's hash, and lm-eval reads them with its `json` dataset loader. Any other lm-eval task name
works too, where its dataset can be fetched (built-in tasks download theirs from the hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
import tempfile
from pathlib import Path

from fastchat_data.io import default_cache_dir, replace_dir_atomic, sha256_file
from recipes.core.config import ConfigError

TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
VERSION = 1  # the local tasks' version in lm-eval's table: bump it when the items change
GPT4 = "alpaca_gpt4_data_en_1k.json"
DAVINCI = "alpaca_data.json"
# task name -> which answers its items are made of
LOCAL_TASKS = {"camelid_alpaca_mc": "gpt4", "camelid_alpaca_mc_davinci": "davinci"}
LOCAL_TAG = "camelid"
N_CHOICES = 4


def alpaca_prompt(instruction: str, input: str) -> str:
    text = f"### Instruction:\n{instruction.strip()}\n\n"
    if input.strip():
        text += f"### Input:\n{input.strip()}\n\n"
    return text + "### Response:"


def build_alpaca_mc(
    gpt4: list[dict], davinci: list[dict], answers: str = "gpt4", *, n_choices: int = N_CHOICES
) -> list[dict]:
    """Multiple-choice items, one per instruction of `gpt4` (the Alpaca GPT-4 sample): the
    question is the instruction (and its input) in Alpaca's prompt format, the choices are its
    own answer and the answers of n_choices - 1 other instructions next to it in length (a
    run of neighbours in which its rank is random, so length does not give the answer away),
    shuffled; the randomness is seeded by the instruction's hash. `answers` "gpt4": the GPT-4
    answers; "davinci": the text-davinci-003 answers that `davinci` (Stanford Alpaca's
    alpaca_data.json) holds for the same instruction and input. A repeated instruction makes
    one item (its first answer). Deterministic: the same files make the same items."""
    if answers not in ("gpt4", "davinci"):
        raise ValueError(f"answers must be gpt4 or davinci, not {answers!r}")
    by_key = {(r["instruction"].strip(), r["input"].strip()): r["output"] for r in davinci}
    rows, seen = [], set()
    for r in gpt4:
        key = (r["instruction"].strip(), r["input"].strip())
        answer = r["output"] if answers == "gpt4" else by_key.get(key)
        if key in seen or not answer or not answer.strip():
            continue  # a repeated instruction would be its own distractor; no answer, no item
        seen.add(key)
        rows.append((key, answer.strip()))
    if len(rows) < n_choices:
        raise ConfigError(f"only {len(rows)} usable instructions: too few for {n_choices} choices")
    by_length = sorted(range(len(rows)), key=lambda j: (len(rows[j][1]), j))
    items = []
    for i, (key, answer) in enumerate(rows):
        seed = int.from_bytes(hashlib.sha256("\x00".join(key).encode()).digest()[:8], "big")
        rng = random.Random(seed)
        # the other answers, one per distinct text, in length order, around this one
        texts, pool = {answer}, []
        for j in by_length:
            if j == i or rows[j][1] not in texts:
                texts.add(rows[j][1])
                pool.append(j)
        pos = pool.index(i)
        # a run of n_choices neighbours in length with this answer at a random rank in it,
        # so neither the longest, the shortest nor the middle choice is more often right
        start = min(max(pos - rng.randrange(n_choices), 0), len(pool) - n_choices)
        choices = [rows[j][1] for j in pool[start : start + n_choices] if j != i]
        label = rng.randrange(n_choices)
        choices.insert(label, answer)
        items.append(
            {
                "id": i,
                "instruction": key[0],
                "input": key[1],
                "question": alpaca_prompt(*key),
                "choices": choices,
                "label": label,
            }
        )
    return items


_SELF = sha256_file(Path(__file__))  # the code that makes the items, as imported


def prepare_tasks(
    data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder holding the local tasks' YAML and JSON Lines files, for lm-eval's
    TaskManager(include_path=...); built from the shared data once and reused while the data,
    the templates and this module (which makes the items) stay the same."""
    if data_dir is None:
        raise ConfigError(
            f"--lm_eval_data: the local camelid tasks are made from {GPT4} and "
            f"{DAVINCI}; give the folder that holds them"
        )
    data_dir = Path(data_dir)
    sources = [data_dir / GPT4, data_dir / DAVINCI]
    for source in sources:
        if not source.is_file():
            raise ConfigError(f"--lm_eval_data: {source} does not exist")
    templates = {name: (TEMPLATES / f"{name}.yaml.template").read_text() for name in LOCAL_TASKS}
    key = hashlib.sha256(
        json.dumps([VERSION, _SELF, [sha256_file(p) for p in sources], templates]).encode()
    ).hexdigest()[:16]
    out = Path(cache_dir or default_cache_dir()) / "lm_eval_tasks" / key
    if all((out / f"{name}.yaml").exists() for name in LOCAL_TASKS):
        return out
    gpt4, davinci = (json.loads(p.read_text(encoding="utf-8")) for p in sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp_root:
        tmp = Path(tmp_root) / "tasks"
        tmp.mkdir()
        for name, answers in LOCAL_TASKS.items():
            items = build_alpaca_mc(gpt4, davinci, answers)
            data_file = out / f"{name}.jsonl"  # its final place: the YAML names it
            lines = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
            (tmp / data_file.name).write_text(lines, encoding="utf-8")
            yaml = string.Template(templates[name]).substitute(
                data_file=json.dumps(str(data_file)), version=VERSION
            )
            (tmp / f"{name}.yaml").write_text(yaml, encoding="utf-8")
        replace_dir_atomic(tmp, out)
    return out


def _is_local(name: str) -> bool:
    return name in LOCAL_TASKS or name == LOCAL_TAG


def _lm_eval():
    try:
        import lm_eval.tasks  # binds lm_eval too; TaskManager lives in lm_eval.tasks
    except ImportError as e:
        raise ConfigError(
            f"--lm_eval needs lm-evaluation-harness ({e}): pip install 'camelid[eval]'"
        ) from e
    return lm_eval


def task_manager(tasks: list[str], data_dir=None, cache_dir=None):
    """lm-eval's TaskManager with the local tasks, and the built-in ones only when a task
    asked for is not local (indexing those takes seconds). Unknown names are a ConfigError."""
    TaskManager = _lm_eval().tasks.TaskManager

    local = [t for t in tasks if _is_local(t)]
    include = str(prepare_tasks(data_dir, cache_dir)) if local else None
    builtin = len(local) < len(tasks)
    tm = TaskManager(include_path=include, include_defaults=builtin)
    known = set(tm.all_tasks)
    missing = [t for t in tasks if t not in known and not tm.match_tasks([t])]
    if missing:
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(missing)}; local tasks: "
            f"{', '.join(LOCAL_TASKS)} (tag {LOCAL_TAG}); `lm_eval ls tasks` lists "
            "the built-in ones"
        )
    return tm


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def model_args(model: str, adapter: str | None, quantization: str = "none") -> dict:
    """lm-eval HF backend arguments: the model on the GPU in bf16 if there is one (as
    recipes.eval loads it), the adapter through peft, the adapter's tokenizer when it has one
    (training saves it there)."""
    import torch

    cuda = torch.cuda.is_available()
    args = {
        "pretrained": model,
        "device": "cuda" if cuda else "cpu",
        "dtype": "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32",
    }
    if adapter:
        from recipes.core.lora import read_adapter_config

        read_adapter_config(adapter)  # not an adapter folder: a clear error
        args["peft"] = adapter
        if (Path(adapter) / "tokenizer_config.json").exists():
            args["tokenizer"] = adapter
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        args["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if args["dtype"] == "bfloat16" else torch.float32,
        )
    return args


def _jsonable(obj):
    """lm-eval's results, minus what JSON cannot hold (numpy numbers, NaN as null)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def run(
    model: str,
    adapters: list[str] = (),
    tasks: list[str] = ("camelid_alpaca_mc",),
    *,
    limit: int | None = None,
    batch_size: int = 4,
    quantization: str = "none",
    num_fewshot: int | None = None,
    data_dir=None,
    cache_dir=None,
    log_samples: bool = False,
) -> list[dict]:
    """One row per model variant (the model alone, then with each adapter):
    {"model", "adapter", "tasks", "limit", "model_args", "results", "groups", "n-samples",
    "versions", "table"}: lm-eval's own dicts and table (lm_eval.utils.make_table).
    `log_samples`: also "samples", task -> per item {"doc_id", "target", "loglikelihoods"}
    (multiple-choice tasks: one per choice)."""
    lm_eval = _lm_eval()
    from lm_eval.utils import make_table

    tasks = list(tasks)
    if not tasks:
        raise ConfigError("--lm_eval needs at least one task name")
    if limit is not None and limit < 1:
        raise ConfigError(f"--lm_eval_limit must be at least 1, not {limit}")
    for p in [model, *adapters]:
        if not Path(p).exists():
            raise ConfigError(f"{p} does not exist")
    tm = task_manager(tasks, data_dir, cache_dir)
    try:  # the tasks' data first, before minutes of model loading
        (tm.load if hasattr(tm, "load") else tm.load_task_or_group)(tasks)  # older lm-eval
    except Exception as e:
        remote = [t for t in tasks if not _is_local(t)]
        why = f"{type(e).__name__}: {str(e)[:300]}"
        if remote and _offline():
            raise ConfigError(
                f"lm-eval task(s) {', '.join(remote)} could not be loaded ({why}): built-in "
                "tasks fetch their data from the Hugging Face hub, which is off here "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); the local tasks "
                f"({', '.join(LOCAL_TASKS)}) need no hub"
            ) from e
        raise ConfigError(f"lm-eval task(s) {', '.join(tasks)} could not be loaded ({why})") from e
    # The base model and every adapter are scored with these settings: only the model differs.
    settings = {
        "model": "hf",
        "tasks": tasks,
        "task_manager": tm,
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": num_fewshot,
        "log_samples": log_samples,
        "bootstrap_iters": 1000,
    }
    rows = []
    for adapter in [None, *adapters]:
        args = model_args(model, adapter, quantization)
        out = lm_eval.simple_evaluate(model_args=args, **settings)
        if out is None:  # lm-eval returns None on the non-zero ranks of a multi-process run
            continue
        table = make_table(out)
        if out.get("groups"):
            table += "\n" + make_table(out, "groups")
        rows.append(
            {
                "model": f"adapter {Path(adapter).parent.name}/{Path(adapter).name}"
                if adapter
                else f"model {Path(model).parent.name}/{Path(model).name}",
                "adapter": adapter,
                "tasks": tasks,
                "limit": limit,
                "model_args": _jsonable(args),
                **{
                    k: _jsonable(out.get(k, {}))
                    for k in ("results", "groups", "n-samples", "versions")
                },
                "table": table,
            }
        )
        if log_samples:
            rows[-1]["samples"] = {
                task: [
                    {
                        "doc_id": s["doc_id"],
                        "target": _jsonable(s["target"]),
                        "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
                    }  # r: [(ll, greedy)]
                    for s in samples
                ]
                for task, samples in out.get("samples", {}).items()
            }
    return rows


def format_tables(rows: list[dict]) -> str:
    return "\n".join(f"lm-eval, {r['model']}:\n{r['table']}" for r in rows)
