"""Training stages: SFT (`sft`), GRPO reinforcement learning (`rl`) and its reward (`rewards`).

`python -m egm sft` / `python -m egm rl` (egm.train.cli) are the rules' commands; recipes in
config/recipes/ map onto TRL's configs in `recipes`; docs/training.md describes it all.
"""
