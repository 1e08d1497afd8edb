"""The preference-tuning walk-through (`make dpo-demo`), on CPU, nothing downloaded:

1. preference pairs from Alpaca: for the same instruction, GPT-4's answer (chosen) against
   text-davinci-003's (rejected); 100 pairs held out (python -m fastchat_data pair);
2. SFT: the ~17M "small" tiny Llama, full fine-tuned on other Alpaca instructions;
3. DPO of that SFT model on the training pairs (python recipes/dpo.py);
4. `recipes.eval --pairs`: how often the SFT and the DPO model prefer the chosen answer of
   the held-out pairs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from fastchat_data.options import entry_point
from recipes.core.quiet import verbose_option
from recipes.demo import Step, data_dir_option, out_option, run_steps, start


@dataclass
class DPODemoOptions:
    out: str = out_option("dpo-demo")
    data_dir: str | None = data_dir_option("alpaca_data.json, ...")
    verbose: bool = verbose_option()


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts, out = start(DPODemoOptions, argv, "python -m recipes.dpo_demo", doc=__doc__)
    from fastchat_data.preference import pair
    from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model
    from recipes import dpo, full_finetune
    from recipes import eval as evaluation

    data = shared_data_dir(opts.data_dir)
    pairs, heldout = out / "data" / "pairs.json", out / "data" / "heldout_pairs.json"
    print("\n== 1. pairs: python -m fastchat_data pair (GPT-4 chosen, text-davinci-003 rejected)")
    pair(
        str(data / "alpaca_gpt4_data_en_1k.json"),
        str(data / "alpaca_data.json"),
        str(pairs),
        heldout=100,
        heldout_out=str(heldout),
    )
    # SFT data: Alpaca instructions that are in no pair, answered by text-davinci-003
    paired = {
        r["prompt"].split("\nInput:\n")[0].strip()
        for f in (pairs, heldout)
        for r in json.loads(f.read_text())
    }
    alpaca = json.loads((data / "alpaca_data.json").read_text())
    sft = [r for r in alpaca[:3000] if r["instruction"].strip() not in paired][:2000]
    (out / "data" / "sft.json").write_text(json.dumps(sft))
    model = tiny_model("llama", "small", texts=reference_corpus(data), vocab_size=4000)

    sft_model = out / "sft" / "model"
    return run_steps(
        Step(
            "\n== 2. SFT: python recipes/full_finetune.py "
            "(2,000 other Alpaca instructions, 100 steps)",
            full_finetune.main,
            "--config tiny_cpu.yaml --strategy single --max_steps 100 --model_max_length 384 "
            "--learning_rate 2e-3 --overwrite_output_dir True --report_to none --logging_steps 40",
            model_name_or_path=model,
            data_path=out / "data" / "sft.json",
            output_dir=out / "sft",
        ),
        Step(
            "\n== 3. DPO: python recipes/dpo.py --config dpo_tiny_cpu.yaml",
            dpo.main,
            "--config dpo_tiny_cpu.yaml --strategy single --max_steps 80 --model_max_length 384 "
            "--overwrite_output_dir True --report_to none --logging_steps 10",
            model_name_or_path=sft_model,
            data_path=pairs,
            output_dir=out / "dpo",
        ),
        Step(
            "\n== 4. held-out pairs: python -m recipes.eval --pairs ...",
            evaluation.main,
            "--max_length 384",
            model=sft_model,
            compare=out / "dpo" / "model",
            pairs=heldout,
            out=out / "eval.json",
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
