"""The `reward:` settings (score command, online rollouts) and the function that builds a reward from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from copg_jax.rewards.base import RewardFn


@dataclasses.dataclass
class RewardConfig:
    """Exactly one reward source: a Python function, a reward model, or code tests."""

    fn: str = ""
    """`package.module:function` called as fn(prompts, completions) -> list[float] (batched)."""
    model: str = ""
    """Local folder of an HF LlamaForSequenceClassification checkpoint (config, safetensors, tokenizer)."""
    code_tests: bool = False
    """Completions are Python code; a row's `tests_field` lists test snippets; reward = pass rate."""
    tests_field: str = "tests"
    """Row key holding a prompt's test snippets (code tests only)."""
    all_or_nothing: bool = False
    """Code tests: reward 1 when every test passes, else 0 (instead of the pass fraction)."""
    batch_size: int = 32
    """Rows per reward call."""
    max_length: int = 1024
    """Reward model: tokens kept per prompt+completion (cut from the left, keeping the completion's end)."""
    timeout_s: float = 10.0
    """Code tests: wall-clock seconds per test."""
    cpu_seconds: int = 5
    """Code tests: CPU seconds per test."""
    memory_mb: int = 1024
    """Code tests: address-space limit per test in MiB."""
    workers: int = 2
    """Code tests: tests run in parallel."""

    def __post_init__(self):
        chosen = [
            name
            for name, on in (("fn", self.fn), ("model", self.model), ("code_tests", self.code_tests))
            if on
        ]
        if len(chosen) > 1:
            raise ValueError(f"reward: set exactly one of fn / model / code_tests, got {chosen}")


def build_reward(cfg: RewardConfig, rows: Sequence[dict] | None = None) -> RewardFn:
    """The batched reward function `cfg` describes.

    Args:
      cfg: reward settings.
      rows: prompt rows ({prompt, <tests_field>}); needed for code tests only (each row's tests).
    Raises:
      ValueError: no source set, or a code-test row without tests (naming the row).
    """
    if cfg.fn:
        from copg_jax.rewards.python_fn import load_python_reward

        return load_python_reward(cfg.fn)
    if cfg.model:
        from copg_jax.rewards.reward_model import load_reward_model

        return load_reward_model(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length)
    if cfg.code_tests:
        from copg_jax.rewards.code_tests import CodeTestReward, SandboxLimits, prompt_key

        tests_by_prompt: dict[str, list[str]] = {}
        first_row: dict[str, int] = {}
        for i, row in enumerate(rows or []):
            tests = row.get(cfg.tests_field)
            if isinstance(tests, str):
                tests = [tests]
            if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
                raise ValueError(
                    f"row {i}: code tests need {cfg.tests_field!r} = a non-empty list of strings"
                )
            key = prompt_key(row["prompt"])
            if key in tests_by_prompt and tests_by_prompt[key] != tests:
                # rewards see (prompt, completion) only, so one prompt can have one set of tests
                raise ValueError(
                    f"rows {first_row[key]} and {i} have the same prompt but different {cfg.tests_field!r}"
                )
            tests_by_prompt[key] = tests
            first_row.setdefault(key, i)
        limits = SandboxLimits(cfg.timeout_s, cfg.cpu_seconds, cfg.memory_mb)
        return CodeTestReward(tests_by_prompt, limits, cfg.workers, cfg.all_or_nothing)
    raise ValueError("reward: no source set; give one of reward.fn, reward.model, reward.code_tests")
