"""Preference tuning after SFT: DPO (sigmoid), length-normalised DPO and IPO, on the full model
or a LoRA / QLoRA adapter, under every strategy the SFT recipes run under.

    python -m fastchat_data pair --out pairs.json        (the Alpaca GPT-4 vs davinci pairs)
    torchrun --nproc_per_node 4 recipes/dpo.py --model_name_or_path SFT_MODEL --data_path pairs.json
    make train-dpo NGPU=4 STRATEGY=zero3 MODEL=... DATA=...     (the same launcher as SFT)
    python recipes/dpo.py --peft_method lora --quantization nf4 ...   (QLoRA DPO, one GPU)

The objective: recipes/core/objectives/dpo.py. setup -> train -> save -> cleanup:
recipes/core/recipe.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import recipe

main = recipe.script("dpo", __name__)
