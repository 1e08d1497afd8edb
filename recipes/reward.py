"""A reward model after SFT: the model with a one-output score head, trained on the preference
pairs DPO reads with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (TRL's
RewardTrainer), under every strategy the SFT recipes run under.

    python -m fastchat_data pair --out pairs.json        (the Alpaca GPT-4 vs davinci pairs)
    torchrun --nproc_per_node 4 recipes/reward.py --model_name_or_path SFT --data_path pairs.json
    python -m recipes.eval --model runs/reward/model --reward_model --pairs heldout_pairs.json

The objective: recipes/core/objectives/reward.py. setup -> train -> save -> cleanup:
recipes/core/recipe.py.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun / deepspeed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import recipe

main = recipe.script("reward", __name__)
