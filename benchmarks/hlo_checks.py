"""Checks on a compiled program's optimised HLO text (`compiled.as_text()`): [T, T] buffers, kernels, the
sizes of its buffers and of its collectives' results.

Used by benchmarks/gpu_aot.py (XLA:GPU without a GPU), benchmarks/step.py (on the device), benchmarks/moe.py
and benchmarks/expert_parallel.py, and tested on XLA:CPU programs in tests/test_hlo_checks.py.
"""

from __future__ import annotations

import collections
import re


def model_widths(mcfg) -> set[int]:
    """Feature sizes of the model's tensors (hidden, MLP, vocabulary, heads x head_dim)."""
    head_dim = mcfg.head_dim or mcfg.hidden_size // mcfg.num_heads
    return {mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size, mcfg.num_heads * head_dim,
            mcfg.num_kv_heads * head_dim}  # fmt: skip


def square_buffers(hlo: str, length: int) -> list[str]:
    """Array shapes of the optimised HLO text with one dimension T = `length` and another a multiple of T
    (a [.., T, T] mask or score matrix, also when XLA flattens its other axes into one), most frequent first.
    Meaningful only when T is none of the model's widths (`model_widths`)."""
    found = collections.Counter()
    for shape in re.findall(r"\b(?:pred|s8|u8|s32|u32|bf16|f16|f32)\[([\d,]+)\]", hlo):
        dims = [int(d) for d in shape.split(",") if d]
        if length in dims and sum(d % length == 0 for d in dims) >= 2:
            found[shape] += 1
    return [f"[{shape}] x{n}" for shape, n in found.most_common()]


def model_square_buffers(hlo: str, length: int, mcfg) -> list[str] | None:
    """`square_buffers` of a program of the model `mcfg`, or None when T is one of its widths (the search
    could not tell a [T, T] matrix from a [T, width] activation)."""
    return None if length in model_widths(mcfg) else square_buffers(hlo, length)


def describe(found: list[str] | None, most: int = 3) -> str:
    """One table cell for a `model_square_buffers` result: its `most` frequent shapes, "none" or "n/a"."""
    return "n/a (T is a model width)" if found is None else "; ".join(found[:most]) or "none"


BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
COLLECTIVE = re.compile(r" = (.+?) (all-gather|reduce-scatter|all-reduce|all-to-all)(-done)?\(")


def shape_bytes(dtype: str, dims: str) -> int:
    """Bytes of an HLO array shape, e.g. ("bf16", "8,1024") (an unlisted dtype counts 4 bytes an element)."""
    n = 1
    for v in filter(None, dims.split(",")):
        n *= int(v)
    return BYTES.get(dtype, 4) * n


def collective_bytes_by_dtype(hlo: str) -> dict[tuple[str, str], int]:
    """Bytes of the results of each kind of collective in the optimised HLO, per element type: {(kind, dtype):
    bytes} (an asynchronous one counted at its `-done`, whose value is the result; a tuple's results each)."""
    out: dict[tuple[str, str], int] = {}
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match:
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
                key = (match.group(2), dtype)
                out[key] = out.get(key, 0) + shape_bytes(dtype, dims)
    return out


def collective_bytes(hlo: str) -> dict[str, int]:
    """`collective_bytes_by_dtype` summed over the element types: {kind: bytes}."""
    out: dict[str, int] = {}
    for (kind, _), size in collective_bytes_by_dtype(hlo).items():
        out[kind] = out.get(kind, 0) + size
    return out


def custom_calls(hlo: str) -> dict:
    """Custom-call targets of the optimised HLO and how often each appears."""
    return dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo)))
