"""Reward sources: a Python function by import path, a sequence-classification reward model, code tests.

All are batched callables `fn(prompts, completions) -> list[float]`; `score_rows` records per-row failures and
passes a Python function the prompt rows' fields it takes (`row_fields`, `take_fields`).
"""

from copg_jax.rewards.base import (
    RewardFn,
    RewardResult,
    fields_taken,
    refuse_all_failed,
    row_fields,
    score_rows,
    score_rows_shared,
    take_fields,
    with_completion_ids,
)
from copg_jax.rewards.config import RewardConfig, build_reward

__all__ = [
    "RewardConfig",
    "RewardFn",
    "RewardResult",
    "build_reward",
    "fields_taken",
    "refuse_all_failed",
    "row_fields",
    "score_rows",
    "score_rows_shared",
    "take_fields",
    "with_completion_ids",
]
