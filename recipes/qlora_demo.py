"""The QLoRA walk-through (`make qlora-demo`), on CPU in about 6 minutes:

1. a base that means something: the ~17M "small" tiny Llama, full fine-tuned on English Alpaca
   and Chinese ShareGPT conversations (1,000 each);
2. QLoRA adapts it to Chinese Alpaca instructions (4-bit nf4 base + LoRA on all linear layers),
   with the reference's own prompt: a Chinese system text before "USER: ... ASSISTANT:";
3. `recipes.eval` compares the base zero-shot, few-shot and with the adapter on held-out
   Chinese instructions (mean perplexity, ROUGE, BLEU);
4. `recipes.merge` folds the adapter into the base; one chat turn with the merged model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from fastchat_data.options import entry_point
from recipes.core.quiet import verbose_option
from recipes.demo import Step, data_dir_option, out_option, run_steps, start

# NTU ADL 2023 HW3's instruction prompt, as a camelid template file
ADL_PROMPT = (
    'system: "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。'
    '你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"\n'
    "user: USER\nassistant: ASSISTANT\nsep: ' '\nsep2: '{eos}'\n"
)


@dataclass
class QLoraDemoOptions:
    out: str = out_option("qlora-demo")
    data_dir: str | None = data_dir_option("alpaca_gpt4_data_*_1k.json, ...")
    verbose: bool = verbose_option()


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts, out = start(QLoraDemoOptions, argv, "python -m recipes.qlora_demo", doc=__doc__)
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model
    from recipes import eval as evaluation
    from recipes import full_finetune, merge, qlora

    data = shared_data_dir(opts.data_dir)
    zh = json.loads((data / "alpaca_gpt4_data_zh_1k.json").read_text())
    train_zh, heldout_zh = out / "data" / "zh_train.json", out / "data" / "zh_heldout.json"
    train_zh.write_text(json.dumps(zh[:900], ensure_ascii=False))
    heldout_zh.write_text(json.dumps(zh[900:], ensure_ascii=False))
    template = out / "data" / "adl_hw3_prompt.yaml"
    template.write_text(ADL_PROMPT)
    model = tiny_model("llama", "small", texts=reference_corpus(data), vocab_size=4000)
    base, adapter = out / "base" / "model", out / "qlora" / "adapter"
    mix = f"{data / 'alpaca_gpt4_data_en_1k.json'},{data / 'sharegpt_gpt4_zh_1k.jsonl'}"
    code = run_steps(
        Step(
            "\n== 1. full fine-tune, English Alpaca + Chinese ShareGPT "
            "(python recipes/full_finetune.py)",
            full_finetune.main,
            "--config tiny_cpu.yaml --strategy single --max_steps 150 --learning_rate 2e-3 "
            "--overwrite_output_dir True --report_to none --logging_steps 25",
            model_name_or_path=model,
            data_path=mix,
            output_dir=out / "base",
        ),
        Step(
            "\n== 2. QLoRA on Chinese Alpaca "
            "(python recipes/qlora.py --config qlora_tiny_cpu.yaml)",
            qlora.main,
            "--config qlora_tiny_cpu.yaml --max_steps 60 --overwrite_output_dir True "
            "--logging_steps 10",
            model_name_or_path=base,
            data_path=train_zh,
            template=template,
            output_dir=out / "qlora",
        ),
        Step(
            "\n== 3. evaluate (python -m recipes.eval)",
            evaluation.main,
            "--shots 3 --generate 20 --max_new_tokens 64",
            model=base,
            data=heldout_zh,
            adapter=adapter,
            shots_from=train_zh,
            template=template,
            out=out / "eval.json",
        ),
    )
    if code:
        return code
    print("\n== 4. merge (python -m recipes.merge) and chat (python -m recipes.chat)", flush=True)
    merged = merge.merge(str(adapter), str(out / "merged"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.core.generate import reply

    question = zh[950]["instruction"]
    answer = reply(
        AutoModelForCausalLM.from_pretrained(merged),
        AutoTokenizer.from_pretrained(merged),
        [],
        question=question,
        template=str(template),
    )
    print(f"USER: {question}\nASSISTANT: {answer}\n\nmerged model: {merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
