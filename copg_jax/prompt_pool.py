"""Prompts to sample and the reward that scores their samples (online rollouts, evaluation by generation),
read and checked together.

`read_pool` reads nothing but what this process has: it tokenises the rows as training tokenises prompts and
builds the reward, which checks the row fields it takes (`rewards.base.check_fields`). `PromptPool.agree`
then checks, on every process together, that all read the same prompts. A training run reads its pools
before its data and reference caches (`train.reward_pools`), so that a reward that cannot be built, or
prompt rows it cannot score, stop the run before that work, not an hour into it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from copg_jax.data.config import DataConfig
from copg_jax.generate import prompt_token_ids, prompts_digest
from copg_jax.rewards import RewardConfig, RewardFn, build_reward, row_fields
from copg_jax.sharding import same_everywhere


@dataclasses.dataclass(frozen=True)
class PromptPool:
    """Prompts and their reward.

    Attributes:
      rows: the {prompt, ...} rows.
      prompt_ids: [P_i] int32 ids of each prompt, tokenised and cut as training prompts are.
      reward_fn: the batched reward of their samples.
      fields: name -> one value per row of the rows' other fields, for a reward function that takes them.
      what: what the prompts are, for messages.
      tests_field: the rows' code tests, which the processes must agree on as on the prompts.
    """

    rows: list[dict]
    prompt_ids: list[np.ndarray]
    reward_fn: RewardFn
    fields: dict[str, list]
    what: str
    tests_field: str

    def agree(self) -> None:
        """Refuses, on every process together, prompts that differ between processes (each samples its share
        of them). Every process calls it at the same point."""
        digest = prompts_digest(self.rows, self.prompt_ids, self.tests_field)
        same_everywhere(self.what, digest, len(self.rows))


def read_pool(
    rows: list[dict], tokenizer, data_cfg: DataConfig, reward: RewardConfig, where: str, what: str
) -> PromptPool:
    """The pool of `rows` (read from `where`), tokenised by `tokenizer` under `data_cfg`, scored by `reward`.

    Raises:
      ValueError: a prompt that cannot be tokenised; a reward that cannot be built or takes a field some row
        lacks (each naming what it is about).
    """
    prompt_ids = prompt_token_ids(rows, tokenizer, data_cfg)
    reward_fn = build_reward(reward, rows, where)
    return PromptPool(rows, prompt_ids, reward_fn, row_fields(rows), what, reward.tests_field)
