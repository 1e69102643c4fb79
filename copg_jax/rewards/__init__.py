"""Reward sources: a Python function by import path, a sequence-classification reward model, code tests.

All are batched callables `fn(prompts, completions) -> list[float]`; `score_rows` records per-row failures.
"""

from copg_jax.rewards.base import RewardFn, RewardResult, score_rows, score_rows_shared
from copg_jax.rewards.config import RewardConfig, build_reward

__all__ = ["RewardConfig", "RewardFn", "RewardResult", "build_reward", "score_rows", "score_rows_shared"]
