"""The online-RL walk-through, on CPU, nothing downloaded:

1. arithmetic word problems from a seed (recipes/core/rewards/arithmetic.py): 512 to train on,
   64 held out (another seed, no prompt in common);
2. SFT: the tiny Llama, full fine-tuned on the training problems with their answers;
3. GRPO of that SFT model on the same prompts, rewarded by `close` (partial credit for a
   number near the answer) and `format` (a number and nothing else);
4. the mean held-out rewards of the SFT and the GRPO model, answering greedily.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastchat_data.options import entry_point, option, parse
from recipes.core.quiet import quiet, verbose_option, verbose_requested
from recipes.demo import args

REPO = Path(__file__).resolve().parents[1]
REWARDS = "recipes.core.rewards.arithmetic"


@dataclass
class RLDemoOptions:
    out: str = option(str(REPO / "runs" / "rl-demo"), "the demo's folder")
    sft_steps: int = option(150, "SFT steps", minimum=1)
    grpo_steps: int = option(40, "GRPO steps", minimum=1)
    verbose: bool = verbose_option()


@torch.no_grad()
def held_out_rewards(model_path: Path, records: list[dict], template: str, *, new_tokens: int = 8):
    """Mean of each arithmetic reward over greedy answers to `records`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastchat_data.schema import USER, Conversation, Message
    from fastchat_data.tokenize import ConversationTokenizer
    from recipes.core.generate import stop_ids
    from recipes.core.rewards import arithmetic

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = ConversationTokenizer(tokenizer, template)
    stops, _ = stop_ids(encoder.template, tokenizer)
    answers = []
    for r in records:
        ids = encoder.encode_prompt(Conversation("q", [Message(USER, r["prompt"])]))
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    prompts, expected = [r["prompt"] for r in records], [r["answer"] for r in records]
    scores = {
        name: sum(getattr(arithmetic, name)(prompts, answers, answer=expected)) / len(records)
        for name in ("correct", "close", "format")
    }
    return scores, answers[:3]


@entry_point
def main(argv: list[str] | None = None) -> int:
    quiet(verbose_requested(argv))
    opts = parse(RLDemoOptions, argv, prog="python -m recipes.rl_demo", description=__doc__)
    from fastchat_data.io import write_records
    from fastchat_data.tiny import TEMPLATE_WORDS, tiny_model
    from recipes import full_finetune, grpo
    from recipes.core.rewards.arithmetic import problems

    out = Path(opts.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    print("\n== 1. problems: python -m recipes.core.rewards.arithmetic", flush=True)
    train = problems(512, seed=0)
    seen = {r["prompt"] for r in train}
    held_out = [r for r in problems(256, seed=1) if r["prompt"] not in seen][:64]
    prompts = out / "data" / "prompts.json"
    prompts.write_text(json.dumps(train))
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": r["prompt"]},
                {"from": "gpt", "value": r["answer"]},
            ]
        }
        for r in train
    ]
    write_records(out / "data" / "sft.json", conversations)
    texts = [r["prompt"] + " " + r["answer"] for r in train] + [str(i) for i in range(41)] * 20
    model = tiny_model("llama", "tiny", texts=texts + TEMPLATE_WORDS * 20, vocab_size=1000)

    print(f"\n== 2. SFT: python recipes/full_finetune.py ({opts.sft_steps} steps)", flush=True)
    code = full_finetune.main(
        args(
            f"--config tiny_cpu.yaml --strategy single --max_steps {opts.sft_steps} "
            "--model_max_length 128 --learning_rate 2e-3 --overwrite_output_dir True "
            "--report_to none --logging_steps 50",
            model_name_or_path=model,
            data_path=out / "data" / "sft.json",
            output_dir=out / "sft",
        )
    )
    if code:
        return code
    sft_model = out / "sft" / "model"

    print(f"\n== 3. GRPO: python recipes/grpo.py ({opts.grpo_steps} steps)", flush=True)
    code = grpo.main(
        args(
            f"--config grpo_tiny_cpu.yaml --strategy single --max_steps {opts.grpo_steps} "
            "--model_max_length 128 --max_completion_length 8 --num_generations 8 "
            "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 "
            "--learning_rate 2e-4 --lr_scheduler_type constant --beta 0.02 --temperature 1.0 "
            "--overwrite_output_dir True --report_to none --logging_steps 5 --save_steps 1000",
            model_name_or_path=sft_model,
            data_path=prompts,
            output_dir=out / "grpo",
            reward_funcs=f"{REWARDS}:close,{REWARDS}:format",
        )
    )
    if code:
        return code

    print("\n== 4. held-out rewards (64 problems, greedy answers)", flush=True)
    rows = {}
    for name, path in (("sft", sft_model), ("grpo", out / "grpo" / "model")):
        rows[name], examples = held_out_rewards(path, held_out, "vicuna_v1.1")
        print(
            f"{name:<6}"
            + "".join(f"  {k} {v:.3f}" for k, v in rows[name].items())
            + f"   e.g. {examples}",
            flush=True,
        )
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    print(
        f"written: {out / 'eval.json'}; GRPO's loss and reward curves: {out / 'grpo' / 'loss.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
