"""The Align-Pro training stages (reward, guidance search, SFT, RL, RLHF oracle) as TRL-style config/trainer pairs.

Training needs the ``train`` extra (TRL, accelerate, datasets): ``pip install 'alignpro-plugins[train]'``.
"""

from alignpro_plugins.extras import require

for _module in ("trl", "accelerate", "datasets"):
    require(_module, "Training (the trainers package)")
