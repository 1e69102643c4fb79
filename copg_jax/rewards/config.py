"""The `reward:` settings (score command, online rollouts) and the function that builds a reward from them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from copg_jax.config import show
from copg_jax.rewards.base import Batched, RewardFn, WeightedSum, check_fields

# Largest code-test limit (seconds, MiB, processes or workers): more is a typo, and inf crashed select().
MAX_LIMIT = 10**6


@dataclasses.dataclass
class RewardConfig:
    """Exactly one reward source: a Python function, a reward model, or code tests."""

    fn: str | list[str] = ""
    """`package.module:function` called as fn(prompts, completions) -> list[float] (batched); parameters
    `finished` and the names of the prompt rows' other fields (or `**kwargs`: all of them) get those, one
    value per row (`copg_jax.rewards.base`). A list of them is their sum weighted by `weights` (TRL's
    `reward_funcs`, e.g. a format reward and an accuracy reward)."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """With several `fn`: one weight each ([] = 1 each)."""
    model: str = ""
    """Local folder of an HF *ForSequenceClassification checkpoint (config, safetensors, tokenizer)."""
    code_tests: bool = False
    """Completions are Python code; a row's `tests_field` lists its tests; reward = pass rate."""
    tests_field: str | list[str] = "tests"
    """Row key holding a prompt's tests: `assert f(1) == 2` strings, {call, args, kwargs, expected} or
    {stdin, stdout} objects (code tests only; `copg_jax.rewards.code_tests`). A list of keys: the tests of
    all of them (LiveCodeBench's [public_test_cases, private_test_cases]), each key on every row."""
    function_field: str = "metadata"
    """Code tests: the row key whose `func_name` (JSON text or a record) names the function that
    LiveCodeBench's functional tests call (its `metadata` column); a test that names its own (DeepCoder's
    rows) uses that."""
    all_or_nothing: bool = False
    """Code tests: reward 1 when every test passes, else 0 (instead of the pass fraction)."""
    batch_size: int = 32
    """Rows per reward call."""
    call_timeout_s: float = 0.0
    """Python function: seconds one call (of `batch_size` rows) may take; past it its rows fail
    (RewardTimeout, counted as failed rewards; the other calls' rows are scored) and the call is left
    running on its thread, which cannot be stopped. With a limit the function runs on a thread of its own,
    where signal handlers (a SIGALRM timeout of its own) and objects tied to the importing thread (sqlite
    connections) fail, so it is opt-in. A call stuck in C code holding the interpreter lock (a regular
    expression backtracking on a hostile completion) is noticed only when it returns. 0 = no limit, on the
    caller's thread (a reward that never returns then hangs the command)."""
    max_length: int = 1024
    """Reward model: tokens kept per prompt+completion (cut from the left, keeping the completion's end;
    each call that cuts sequences warns with their count)."""
    label: int | None = None
    """Reward model: which output of a classifier with several (num_labels > 1) is the reward (its logit);
    required there, as no output is the reward by convention. None for the usual one output."""
    timeout_s: float = 10.0
    """Code tests: wall-clock seconds per test."""
    cpu_seconds: int = 5
    """Code tests: CPU seconds per test."""
    memory_mb: int = 1024
    """Code tests: address-space limit per process in MiB."""
    processes: int = 8
    """Code tests: processes and threads a test may have at once (the whole test then stays under
    processes x memory_mb of address space)."""
    tmp_mb: int = 64
    """Code tests: size of each test's private /tmp in MiB (the only writable place)."""
    workers: int = 2
    """Code tests: tests run in parallel."""
    sandbox: str = "bwrap"
    """Code tests: "bwrap" (bubblewrap; an error when it does not work here) or "none" (explicit opt-out:
    completions run as this user with per-process limits only -- trusted code only)."""

    def __post_init__(self):
        chosen = [
            name
            for name, on in (("fn", self.fn), ("model", self.model), ("code_tests", self.code_tests))
            if on
        ]
        if len(chosen) > 1:
            raise ValueError(f"reward: set exactly one of fn / model / code_tests, got {chosen}")
        if self.sandbox not in ("bwrap", "none"):
            raise ValueError(f"reward.sandbox={self.sandbox!r}; expected 'bwrap' or 'none'")
        for name in ("timeout_s", "cpu_seconds", "memory_mb", "processes", "tmp_mb", "workers"):
            value = getattr(self, name)
            if not value <= MAX_LIMIT:  # inf and nan too
                raise ValueError(f"reward.{name}={show(value)} must be a finite number, at most {MAX_LIMIT}")
            if not value > 0:
                raise ValueError(f"reward.{name}={show(value)} must be > 0")
        if isinstance(self.fn, list):
            if not self.fn or not all(isinstance(f, str) and f for f in self.fn):
                raise ValueError(f"reward.fn={self.fn}: a list of package.module:function names")
            if self.weights and len(self.weights) != len(self.fn):
                raise ValueError(f"reward.weights: {len(self.weights)} weights for {len(self.fn)} functions")
        elif self.weights:
            raise ValueError("reward.weights: weights apply to several reward.fn (a list), not to one")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"reward.weights={self.weights}: must be finite")
        fields = self.tests_fields()
        if not fields or not all(isinstance(f, str) and f for f in fields) or len(set(fields)) < len(fields):
            raise ValueError(f"reward.tests_field={self.tests_field}: a row key, or a list of distinct ones")
        if self.batch_size < 1:
            raise ValueError(f"reward.batch_size={self.batch_size} must be >= 1")
        if self.label is not None and not (self.model and self.label >= 0):
            raise ValueError(
                f"reward.label={self.label}: an output index (>= 0) of a reward model (reward.model)"
            )
        if self.max_length < 2:  # a score is read after at least one token of context
            raise ValueError(f"reward.max_length={self.max_length} must be >= 2")
        if not 0 <= self.call_timeout_s <= MAX_LIMIT:
            raise ValueError(f"reward.call_timeout_s={show(self.call_timeout_s)} must be in [0, {MAX_LIMIT}]")

    def tests_fields(self) -> list[str]:
        """The row keys of a prompt's code tests (`tests_field` as a list)."""
        return [self.tests_field] if isinstance(self.tests_field, str) else list(self.tests_field)

    def row_keys(self) -> tuple[str, ...]:
        """The row keys this reward reads beside the prompt (and the fields a Python function takes): the
        tests fields, then the function field for code tests; the (first) tests field otherwise, which the
        processes and a resume compare as they always did."""
        fields = self.tests_fields()
        return (*fields, self.function_field) if self.code_tests else (fields[0],)


def build_reward(
    cfg: RewardConfig, rows: Sequence[dict] | None = None, where: str = "the prompts"
) -> RewardFn:
    """The batched reward function `cfg` describes.

    Args:
      cfg: reward settings.
      rows: the prompt rows it will score ({prompt, <tests_field>, other fields}): each code-test row's
        tests; the fields a Python function takes are checked to be on every row (None: not checked).
      where: what the rows are, for messages.
    Raises:
      ValueError: no source set; a Python function taking a field some row lacks
        (`rewards.base.check_fields`); a code-test row without tests or with a malformed or unsupported
        test (naming the row and test).
      SandboxUnavailable: code tests with sandbox "bwrap" on a machine where bubblewrap does not work.
    """
    if cfg.fn:
        from copg_jax.rewards.python_fn import load_python_reward

        names = cfg.fn if isinstance(cfg.fn, list) else [cfg.fn]
        parts = []
        for name, weight in zip(names, cfg.weights or [1.0] * len(names), strict=True):
            fn = load_python_reward(name)
            if rows is not None:
                check_fields(fn, rows, name, where)
            parts.append((name, Batched(fn, cfg.batch_size, cfg.call_timeout_s), float(weight)))
        return parts[0][1] if isinstance(cfg.fn, str) else WeightedSum(parts)
    if cfg.model:
        from copg_jax.rewards.reward_model import load_reward_model

        return load_reward_model(
            cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length, label=cfg.label
        )
    if cfg.code_tests:
        from copg_jax.rewards.code_tests import (
            CodeTestReward,
            SandboxLimits,
            function_name,
            parse_test,
            prompt_key,
            row_test_specs,
        )

        tests_by_prompt: dict[str, list] = {}
        first_row: dict[str, int] = {}
        fields = cfg.tests_fields()
        for i, row in enumerate(rows or []):
            function = function_name(row.get(cfg.function_field))
            tests = []
            for field in fields:
                try:
                    specs = row_test_specs(row.get(field), function)
                except ValueError as e:
                    raise ValueError(f"row {i}: {field}: {e}") from None
                if not isinstance(specs, list) or (len(fields) == 1 and not specs):
                    wanted = "a non-empty list of tests" if len(fields) == 1 else "a list of tests"
                    raise ValueError(f"row {i}: code tests need {field!r} = {wanted}")
                for j, spec in enumerate(specs):
                    try:
                        tests.append(parse_test(spec))
                    except ValueError as e:
                        raise ValueError(f"row {i}: {field}[{j}]: {e}") from None
            if not tests:
                raise ValueError(f"row {i}: code tests need at least one test in {' / '.join(fields)}")
            key = prompt_key(row["prompt"])
            if key in tests_by_prompt and tests_by_prompt[key] != tests:
                # rewards see (prompt, completion) only, so one prompt can have one set of tests
                raise ValueError(
                    f"rows {first_row[key]} and {i} have the same prompt but different "
                    f"{' / '.join(map(repr, fields))}"
                )
            tests_by_prompt[key] = tests
            first_row.setdefault(key, i)
        limits = SandboxLimits(
            timeout_s=cfg.timeout_s,
            cpu_seconds=cfg.cpu_seconds,
            memory_mb=cfg.memory_mb,
            processes=cfg.processes,
            tmp_mb=cfg.tmp_mb,
        )
        return CodeTestReward(tests_by_prompt, limits, cfg.workers, cfg.all_or_nothing, cfg.sandbox)
    raise ValueError("reward: no source set; give one of reward.fn, reward.model, reward.code_tests")
