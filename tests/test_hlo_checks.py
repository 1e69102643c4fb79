"""benchmarks/hlo_checks.py on XLA:CPU programs (gpu_aot.py's GPU compile needs the CUDA plugin, not in CI):
the [T, T] search finds the explicit-mask reference's score matrices, flattened or not, and nothing in the
blockwise kernel's program, so the "no [T, T] buffer" verdicts of the GPU tables can fail."""

import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from copg_jax.data.layout import packed_layout
from copg_jax.models import attention as attn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import hlo_checks  # noqa: E402

T = 384  # no dim of q/k/v ([2, T, 4, 16]) is a multiple of T but T itself


def _attention_hlo(backend: str) -> str:
    rng = np.random.default_rng(0)
    examples = [(rng.integers(1, 50, 40), [rng.integers(1, 50, 130)] * 2) for _ in range(2)]
    tokens = packed_layout(examples, 2, T, 2)
    pattern = attn.AttentionPattern(*(jnp.asarray(x) for x in (tokens.segment_ids, tokens.prefix_ids,
                                                               tokens.positions)), None, backend)  # fmt: skip
    q = jax.random.normal(jax.random.key(0), (2, T, 4, 16))
    kv = jax.random.normal(jax.random.key(1), (2, T, 2, 16))

    def loss(q, k, v):
        return attn.attention(q, k, v, pattern, scale=0.25).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()


def test_square_buffers_find_the_reference_scores_and_none_in_blockwise():
    found = hlo_checks.square_buffers(_attention_hlo("xla"), T)
    assert f"[2,2,2,{T},{T}] x" in found[0], found  # [rows, KV, group, T, T] scores, the most frequent
    assert hlo_checks.square_buffers(_attention_hlo("blockwise"), T) == []


def test_square_buffers_see_flattened_scores_and_skip_model_widths():
    lines = [f"%a = f32[{8 * T},{T}] fusion(.)", f"%b = bf16[2,{T},2048] add(.)", f"%c = f32[{T}] x"]
    hlo = "\n".join([*lines, f"%d = pred[{T},{T}] y"])
    assert hlo_checks.square_buffers(hlo, T) == [f"[{8 * T},{T}] x1", f"[{T},{T}] x1"]
    widths = types.SimpleNamespace(hidden_size=T, intermediate_size=64, vocab_size=100, num_heads=4,
                                   num_kv_heads=2, head_dim=16)  # fmt: skip
    assert hlo_checks.model_square_buffers(hlo, T, widths) is None
    assert hlo_checks.describe(None) == "n/a (T is a model width)" and hlo_checks.describe([]) == "none"


def test_custom_calls_are_counted():
    hlo = 'custom_call_target="__cudnn$fmhaSoftmax"\ncustom_call_target="__gpu$xla.gpu.triton" x\n' * 2
    assert hlo_checks.custom_calls(hlo) == {"__cudnn$fmhaSoftmax": 2, "__gpu$xla.gpu.triton": 2}


def test_collective_bytes_count_each_collective_once_by_its_result():
    """The byte counts of benchmarks/expert_parallel.py: a synchronous collective by its result, an
    asynchronous one by its -done (the -start tuple also holds the operand), tuples of results summed."""
    hlo = """
  %all-gather.8 = f32[2,32,8]{2,0,1} all-gather(%copy.3), channel_id=30, dimensions={1}
  %all-gather-start.1 = (bf16[1,8192,2048]{2,1,0}, bf16[8,8192,2048]{2,1,0}) all-gather-start(%b)
  %all-gather-done.1 = bf16[8,8192,2048]{2,1,0} all-gather-done(%all-gather-start.1), metadata={}
  %all-gather-done.2 = (s32[8,16]{1,0}, bf16[8,16]{1,0}) all-gather-done(%all-gather-start.2)
  %reduce-scatter-start = ((bf16[8,64]{1,0}), bf16[1,64]{1,0}) reduce-scatter-start(%g), channel_id=1
  %reduce-scatter-done = bf16[1,64]{1,0} reduce-scatter-done(%reduce-scatter-start)
  %all-reduce.1 = (f32[20,32]{1,0}, f32[5]{0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %fusion.1 = f32[2,32,8]{2,1,0} fusion(%all-gather.8), kind=kLoop
"""
    assert hlo_checks.collective_bytes(hlo) == {
        "all-gather": 2 * 32 * 8 * 4 + 8 * 8192 * 2048 * 2 + 8 * 16 * (4 + 2),
        "reduce-scatter": 64 * 2,
        "all-reduce": (20 * 32 + 5) * 4,
    }
    assert hlo_checks.collective_bytes_by_dtype(hlo) == {
        ("all-gather", "f32"): 2 * 32 * 8 * 4,
        ("all-gather", "bf16"): 8 * 8192 * 2048 * 2 + 8 * 16 * 2,
        ("all-gather", "s32"): 8 * 16 * 4,
        ("reduce-scatter", "bf16"): 64 * 2,
        ("all-reduce", "f32"): (20 * 32 + 5) * 4,
    }
