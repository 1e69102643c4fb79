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
import json

import numpy as np
import xxhash

from copg_jax.data.config import DataConfig
from copg_jax.data.formats import distinct_prompts
from copg_jax.generate import prompt_token_ids, prompts_digest, read_prompts
from copg_jax.rewards import RewardConfig, RewardFn, build_reward, fields_taken, row_fields
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
      read_keys: the row keys the reward reads beside the prompt (`RewardConfig.row_keys`: code tests and
        the function they call), which the processes and a resume must agree on as on the prompts.
    """

    rows: list[dict]
    prompt_ids: list[np.ndarray]
    reward_fn: RewardFn
    fields: dict[str, list]
    what: str
    read_keys: tuple[str, ...]

    def digest(self) -> bytes:
        """16 bytes of what the processes must agree on: the prompts, their ids and the keys the reward
        reads (`read_keys`), and the fields the reward takes (plain data exactly; other objects, a dataset's
        images, by type: their reprs hold memory addresses)."""
        taken = {name: self.fields[name] for name in fields_taken(self.reward_fn, self.fields)}
        digest = xxhash.xxh3_128(prompts_digest(self.rows, self.prompt_ids, self.read_keys))
        digest.update(json.dumps(taken, sort_keys=True, default=lambda x: type(x).__name__).encode())
        return digest.digest()

    def agree(self) -> None:
        """Refuses, on every process together, a pool that differs between processes (each samples and
        scores its share of it). Every process calls it at the same point."""
        same_everywhere(self.what, self.digest(), len(self.rows))


def prompt_rows(
    prompts_path: str, prompt_col: str, data_cfg: DataConfig, data_path: str, split: str, setting: str
) -> list:
    """The {prompt, ...} rows of `prompts_path` (its column `prompt_col`), or else the distinct prompts of
    the scored data at `data_path` (rows the data pipeline rejects left out, as in training), each with its
    other keys (code tests, a reward's fields); `split` of either where it has splits.

    Raises:
      ValueError: as `generate.read_prompts` and `data.formats.distinct_prompts` (a bad row, no prompt).
      FileNotFoundError: no `prompts_path`, named as `setting` (`rollout.prompts_path`, say).
    """
    if prompts_path:
        try:
            return read_prompts(prompts_path, prompt_col, split, data_cfg.cache_dir, data_cfg)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{setting}: {e}") from None
    return distinct_prompts(data_cfg, data_path, split)


def read_pool(
    rows: list[dict], tokenizer, data_cfg: DataConfig, reward: RewardConfig, where: str, what: str
) -> PromptPool:
    """The pool of `rows` (read from `where`), tokenised by `tokenizer` under `data_cfg`, scored by `reward`.

    Raises:
      ValueError: a prompt that cannot be tokenised; a reward that cannot be built or takes a field some row
        lacks (each naming what it is about). Building a reward model or code tests may raise what reading
        their files raises.
    """
    prompt_ids, left_out = prompt_token_ids(rows, tokenizer, data_cfg, f"{what} of {where}")
    reward_fn = build_reward(reward, rows, where)  # over all the rows read: its errors name them as read
    if left_out:
        dropped = set(left_out)
        rows = [row for i, row in enumerate(rows) if i not in dropped]
        if not rows:
            raise ValueError(f"{what} of {where}: no prompt is left (each was a bad row)")
    return PromptPool(rows, prompt_ids, reward_fn, row_fields(rows), what, reward.row_keys())
