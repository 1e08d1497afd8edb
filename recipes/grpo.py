"""Online RL after SFT: GRPO or RLOO. For each prompt, sample --num_generations completions with
the current weights, score them with --reward_funcs (module:function), and take one step on the
clipped policy loss (TRL GRPOTrainer's, with its option names), optionally with a KL to the
frozen starting model (--beta). Any strategy: single process, DDP, FSDP2, ZeRO-2 or ZeRO-3.

    python -m recipes.core.rewards.arithmetic --out prompts.json
    torchrun --nproc_per_node 4 recipes/grpo.py --model_name_or_path SFT --data_path prompts.json \\
        --reward_funcs recipes.core.rewards.arithmetic:correct [--advantage rloo] [--beta 0.04]

The objective: recipes/core/objectives/grpo.py. setup -> train -> save -> cleanup:
recipes/core/recipe.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import recipe

main = recipe.script("grpo", __name__)
