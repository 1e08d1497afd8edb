"""Vicuna-style full fine-tune: one recipe for 1 process, DDP, FSDP2 and DeepSpeed ZeRO-2/3.

    torchrun --nproc_per_node 4 recipes/full_finetune.py --config vicuna_7b.yaml \
        --model_name_or_path MODEL --data_path DATA
    make train-vicuna NGPU=4 STRATEGY=fsdp   (launch/ picks torchrun or the deepspeed launcher)

setup -> train -> save -> cleanup, shared by every recipe: recipes/core/recipe.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import recipe

main = recipe.script("sft", __name__)
