"""Reward from a Python callable named by import path, `package.module:function`."""

from __future__ import annotations

import importlib

from copg_jax.rewards.base import RewardFn


def load_python_reward(spec: str) -> RewardFn:
    """Imports `pkg.module:fn` (or `pkg.module:Class.attr`); `fn(prompts, completions) -> list[float]`.

    Raises:
      ValueError: when the spec is malformed, the module cannot be imported or the attribute is missing or
        not callable; the message names the spec.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"reward {spec!r} is not of the form 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a module failing at import (SyntaxError, its own errors) too
        raise ValueError(
            f"reward {spec!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}"
        ) from None
    name = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {name!r} has no attribute {part!r}")
        obj, name = getattr(obj, part), f"{name}.{part}"
    if not callable(obj):
        raise ValueError(f"reward {spec!r} is not callable (got {type(obj).__name__})")
    return obj
