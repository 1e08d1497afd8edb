"""QLoRA: a 4-bit nf4 base (double quantization) with LoRA on all its linear layers.

    accelerate launch recipes/qlora.py --config qlora_7b.yaml --model_name_or_path M --data_path D
    accelerate launch --multi_gpu --num_processes 2 recipes/qlora.py ...   (DDP QLoRA)
    python -m launch.train --recipe qlora --ngpu 2 --strategy ddp ...

Also plain LoRA (--quantization none), 8-bit loading (--quantization int8), prompt tuning and
P-tuning (--peft_method prompt_tuning | p_tuning). Checkpoints hold the adapter only, and a
relaunch resumes exactly. setup -> train -> save -> cleanup: recipes/core/recipe.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by accelerate launch / torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import recipe

main = recipe.script("qlora", __name__)
