"""Every attention backend equals the explicit-mask XLA reference, in outputs and gradients, on every layout.

Kernels run on CPU: Pallas in interpret mode, cuDNN's causal/length/window arguments through XLA's
implementation of the same call. Rows of the padded, packed and shared-prefix layouts (odd lengths, GQA,
with and without a sliding window, with and without a logit soft cap) share one batch, so a mismatch names
the layout of the rows it is in.
"""

import dataclasses
import functools
import typing

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from copg_jax.batch import TokenBatch, attention_mask
from copg_jax.data.layout import packed_layout, padded_layout, shared_prefix_layout
from copg_jax.logprobs import sequence_logprobs
from copg_jax.models import ModelConfig, from_config
from copg_jax.models import attention as attn
from copg_jax.models.decoder import REMAT_POLICIES
from copg_jax.run_config import ModelSection
from copg_jax.sharding import make_mesh

T, H, KV, D, K = 37, 4, 2, 8, 2
SCALE = 0.3
WINDOW = 5
SOFTCAP = 5.0  # Gemma 2 uses 50 on its logits; this one is well inside the logits of LOUD queries
LOUD = 10.0  # query magnitude of the soft-capped cases: scaled logits of std LOUD * SCALE * D**0.5 ~ 8.5


def _examples(seed: int, num_prompts: int = 3):
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(1, 50, rng.integers(lo, hi)).astype(np.int32)

    return [(ids(1, 6), [ids(1, 8) for _ in range(K)]) for _ in range(num_prompts)]


def _concat(**batches: TokenBatch) -> tuple[TokenBatch, list[str]]:
    """Rows of several layouts (same T) in one TokenBatch, and the layout name of each row."""
    names = [name for name, b in batches.items() for _ in range(b.input_ids.shape[0])]
    fields = {
        f: np.concatenate([getattr(b, f) for b in batches.values()]) for f in TokenBatch.__dataclass_fields__
    }
    return TokenBatch(**fields), names


@pytest.fixture(scope="module")
def batches():
    ex = _examples(0)
    padded = padded_layout(ex, K, T)
    packed = packed_layout(ex, K, T, 2)
    shared = shared_prefix_layout(ex, K, T, 2, split_length=None)
    shared_one_token = shared_prefix_layout(
        [(np.array([7], np.int32), ex[0][1])], K, T, 1, split_length=None
    )  # no prefix segment
    return {
        "padded": _concat(padded=padded),
        "no_prefix": _concat(padded=padded, packed=packed),
        "mixed": _concat(
            padded=padded, packed=packed, shared_prefix=shared, one_token_prompt=shared_one_token
        ),
    }


def _qkv(n: int, t: int = T, dtype=jnp.float32, d: int = D):
    keys = jax.random.split(jax.random.key(n * 1000 + t), 4)
    q = jax.random.normal(keys[0], (n, t, H, d), dtype)
    k = jax.random.normal(keys[1], (n, t, KV, d), dtype)
    v = jax.random.normal(keys[2], (n, t, KV, d), dtype)
    cotangent = jax.random.normal(keys[3], (n, t, H, d), dtype)
    return q, k, v, cotangent


def _pattern(tokens: TokenBatch, window=None, backend="auto", softcap=None) -> attn.AttentionPattern:
    ids = (jnp.asarray(x) for x in (tokens.segment_ids, tokens.prefix_ids, tokens.positions))
    return attn.AttentionPattern(*ids, window, backend, softcap=softcap)


def _inputs(tokens: TokenBatch, names, window, dtype=jnp.float32, softcap=None):
    """(q, k, v, cotangent, pattern) of a batch; soft-capped cases get LOUD queries, whose logits the cap
    changes (`test_softcap_changes_outputs_and_gradients`), so that a backend ignoring it fails."""
    q, k, v, cotangent = _qkv(len(names), dtype=dtype)
    return (q if softcap is None else q * LOUD), k, v, cotangent, _pattern(tokens, window, softcap=softcap)


BACKEND_FNS = {
    "xla": lambda q, k, v, p: attn.xla_attention(q, k, v, p, scale=SCALE),
    "blockwise": lambda q, k, v, p: attn.blockwise_attention(q, k, v, p, scale=SCALE, block_q=8, block_k=16),
    "pallas_gpu": lambda q, k, v, p: attn.pallas_gpu_attention(
        q, k, v, p, scale=SCALE, interpret=True, block_q=16, block_k=16
    ),
    "cudnn": lambda q, k, v, p: attn.cudnn_attention(
        q, k, v, p, scale=SCALE, interpret=True, implementation="xla"
    ),
    "splash": lambda q, k, v, p: attn.splash_attention(q, k, v, p, scale=SCALE, interpret=True),
}


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(backend: str, q, k, v, cotangent, pattern):
    """(out, dq, dk, dv) of BACKEND_FNS[backend]; jitted once per backend, shapes and window (the reference
    is shared by every test of a batch)."""
    out, vjp = jax.vjp(lambda q, k, v: BACKEND_FNS[backend](q, k, v, pattern), q, k, v)
    return (out, *vjp(cotangent))


def assert_matches_reference(backend, tokens, names, window, dtype=jnp.float32, atol=2e-5, softcap=None):
    """The backend's output and (q, k, v) gradients equal the reference's; failures name the rows' layouts."""
    args = _inputs(tokens, names, window, dtype, softcap)
    got, want = _out_and_grads(backend, *args), _out_and_grads("xla", *args)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        g, w = (np.asarray(x, np.float32).reshape(len(names), -1) for x in (g, w))
        err = np.abs(g - w).max(axis=1)
        bad = sorted({names[r] for r in np.flatnonzero(err > atol * (1.0 + np.abs(w).max(axis=1)))})
        assert not bad, f"{label} differs from the reference in {bad} rows (max error {err.max():.2e})"


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (WINDOW, None), (WINDOW, SOFTCAP)])
@pytest.mark.parametrize(
    ("backend", "batch"),
    [
        ("blockwise", "mixed"),
        ("pallas_gpu", "mixed"),
        ("cudnn", "padded"),  # the cuDNN call itself (soft-capped: pallas_gpu); other layouts: below
        ("splash", "no_prefix"),  # the splash kernel itself; shared prefixes take blockwise (below)
    ],
)
def test_backend_equals_reference(backend, batch, window, softcap, batches):
    tokens, names = batches[batch]
    assert_matches_reference(backend, tokens, names, window, softcap=softcap)


def _closed_form(q, k, v, mask, cap):
    """softmax(cap * tanh(SCALE * q k^T / cap) + mask) v in float64 numpy, per query head (GQA).

    Args:
      q: [N, T, H, D]; k, v: [N, T, KV, D]; mask: [N, T, T] bool.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, H // KV, axis=2) for x in (k, v))
    s = np.einsum("nqhd,nshd->nhqs", q, k) * SCALE
    s = np.where(mask[:, None], cap * np.tanh(s / cap), -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("nhqs,nshd->nqhd", p / p.sum(axis=-1, keepdims=True), v)


def test_softcapped_reference_equals_the_closed_form(batches):
    tokens, names = batches["mixed"]
    q, k, v, _, pattern = _inputs(tokens, names, WINDOW, softcap=SOFTCAP)
    pos = np.asarray(tokens.positions)
    mask = np.asarray(attention_mask(tokens.segment_ids, tokens.prefix_ids))[:, 0]
    mask = mask & (pos[:, :, None] - pos[:, None, :] < WINDOW)
    got = jax.jit(BACKEND_FNS["xla"])(q, k, v, pattern)
    np.testing.assert_allclose(got, _closed_form(q, k, v, mask, SOFTCAP), atol=1e-5)


def test_softcap_changes_outputs_and_gradients(batches):
    """On the inputs of the soft-capped backend cases, the cap moves the reference's output and gradients
    in every row (but an empty one, whose tokens attend to themselves alone) far beyond the tolerance of
    `assert_matches_reference`, so a backend ignoring it cannot pass."""
    tokens, names = batches["mixed"]
    q, k, v, cotangent, capped = _inputs(tokens, names, WINDOW, softcap=SOFTCAP)
    uncapped = dataclasses.replace(capped, softcap=None)
    got = _out_and_grads("xla", q, k, v, cotangent, capped)
    want = _out_and_grads("xla", q, k, v, cotangent, uncapped)
    rows = (np.asarray(tokens.segment_ids) != 0).any(axis=1)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        g, w = (np.asarray(x).reshape(len(names), -1)[rows] for x in (g, w))
        moved = np.abs(g - w).max(axis=1) / (1.0 + np.abs(w).max(axis=1))
        assert moved.min() > 100 * 2e-5, (label, moved)


def test_softcapped_cudnn_takes_pallas_gpu(batches):
    """cuDNN's fused attention has no logit soft cap: with one, every layout (padded included, known or
    not) runs the pallas_gpu kernels, with no run-time choice."""
    tokens, names = batches["padded"]
    q, k, v, _, pattern = _inputs(tokens, names, WINDOW, softcap=SOFTCAP)
    for layout in ("any", "padded"):
        jaxpr = jax.make_jaxpr(BACKEND_FNS["cudnn"])(q, k, v, dataclasses.replace(pattern, layout=layout))
        assert "cond" not in _primitives(jaxpr.jaxpr)
        calls = _pallas_calls(jaxpr.jaxpr)
        assert len(calls) == 1 and "flash_fwd" in str(calls[0].params["name"]), (layout, calls)


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_layouts_the_kernel_cannot_take_fall_back_exactly(backend, batches):
    tokens, names = batches["mixed"]
    assert_matches_reference(backend, tokens, names, None)


def test_fused_paths_are_taken_where_the_layout_allows(batches):
    routes = jax.jit(lambda pattern: (attn._padded_rows(pattern)[0], attn._no_prefix(pattern)))
    for name, (tokens, _) in batches.items():
        for window in (None, WINDOW):
            padded, no_prefix = routes(_pattern(tokens, window))
            assert bool(padded) == (name == "padded") and bool(no_prefix) == (name != "mixed"), (name, window)


def _equations(jaxpr) -> list:
    """The equations of a jaxpr and of the jaxprs nested in it (jit, custom_vjp, cond), kernel bodies
    (pallas_call) aside."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        if eqn.primitive.name != "pallas_call":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found += _equations(sub)
    return found


def _primitives(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in _equations(jaxpr)]


def _pallas_calls(jaxpr) -> list:
    return [eqn for eqn in _equations(jaxpr) if eqn.primitive.name == "pallas_call"]


LAYOUT_BUILDERS = {
    "padded": lambda ex: padded_layout(ex, K, T),
    "packed": lambda ex: packed_layout(ex, K, T, 2),
    "shared_prefix": lambda ex: shared_prefix_layout(ex, K, T, 2, split_length=None),
}


@pytest.mark.parametrize("layout", list(LAYOUT_BUILDERS))
@pytest.mark.parametrize(
    ("backend", "fused_layouts"), [("cudnn", {"padded"}), ("splash", {"padded", "packed"})]
)
def test_a_known_layout_picks_the_kernel_statically(backend, fused_layouts, layout):
    """With the rows' layout given (the trainer passes data.layout) cudnn / splash trace one kernel, no
    `lax.cond` over both: the fused one for the layouts it serves, the general one (pallas_gpu, blockwise)
    for the others; each equals the reference in outputs and gradients. Unknown layouts are refused."""
    tokens = LAYOUT_BUILDERS[layout](_examples(2))
    q, k, v, cotangent = _qkv(tokens.input_ids.shape[0])
    known = dataclasses.replace(_pattern(tokens, WINDOW), layout=layout)
    prims = _primitives(jax.make_jaxpr(lambda q: BACKEND_FNS[backend](q, k, v, known))(q).jaxpr)
    assert "cond" not in prims
    kernels = [
        e.params["name"] for e in _pallas_calls(jax.make_jaxpr(BACKEND_FNS[backend])(q, k, v, known).jaxpr)
    ]
    fused = layout in fused_layouts
    if backend == "cudnn":  # fused: cuDNN's call (XLA on CPU), else the Triton kernels
        assert bool(kernels) != fused, kernels
    else:  # fused: the splash kernels, else blockwise (plain JAX)
        assert bool(kernels) == fused, kernels
    got, want = (
        _out_and_grads(backend, q, k, v, cotangent, known),
        _out_and_grads("xla", q, k, v, cotangent, known),
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
    if fused:  # rows of another layout under this promise: NaN, not attention over the wrong mask
        mixed, _ = _concat(
            mixed=tokens,
            other=shared_prefix_layout(_examples(3), K, T, tokens.input_ids.shape[0], split_length=None),
        )
        broken = dataclasses.replace(_pattern(mixed, WINDOW), layout=layout)
        q2, k2, v2, _ = _qkv(mixed.input_ids.shape[0])
        assert np.isnan(BACKEND_FNS[backend](q2, k2, v2, broken)).all()
    anything = _pattern(tokens, WINDOW)
    assert "cond" in _primitives(jax.make_jaxpr(lambda q: BACKEND_FNS[backend](q, k, v, anything))(q).jaxpr)
    with pytest.raises(ValueError, match="unknown attention layout 'rows'"):
        BACKEND_FNS[backend](q, k, v, dataclasses.replace(known, layout="rows"))


def test_bfloat16_blockwise_stays_within_bfloat16_error(batches):
    tokens, names = batches["mixed"]
    assert_matches_reference("blockwise", tokens, names, WINDOW, dtype=jnp.bfloat16, atol=3e-2)


def test_arbitrary_ids_are_exact_without_the_contiguity_contract():
    """Non-contiguous segments, prefixes naming later or absent segments: bounds fall back to all blocks."""
    rng = np.random.default_rng(1)
    n = 3
    segment_ids = rng.integers(0, 3, (n, T)).astype(np.int32)
    prefix_ids = rng.integers(0, 4, (n, T)).astype(np.int32)
    positions = rng.integers(0, 9, (n, T)).astype(np.int32)
    tokens = TokenBatch(segment_ids, positions, segment_ids, prefix_ids, segment_ids, segment_ids)
    assert_matches_reference("blockwise", tokens, [f"random row {r}" for r in range(n)], WINDOW)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
def test_block_bounds_cover_every_allowed_pair_and_skip(layout):
    ex = _examples(2, num_prompts=6)
    t, block = 96, 8
    tokens = {
        "padded": lambda: padded_layout(ex, K, t),
        "packed": lambda: packed_layout(ex, K, t, 2),
        "shared_prefix": lambda: shared_prefix_layout(ex, K, t, 2, split_length=None),
    }[layout]()
    bounds = jax.jit(attn._block_bounds, static_argnums=(2, 3))(
        tokens.segment_ids, tokens.prefix_ids, block, block
    )
    kv_lo, kv_hi, q_lo, q_hi = (np.asarray(x) for x in bounds)
    mask = np.asarray(attention_mask(tokens.segment_ids, tokens.prefix_ids))[:, 0]
    rows, qs, ks = np.nonzero(mask)
    assert (kv_lo[rows, qs // block] <= ks // block).all() and (ks // block < kv_hi[rows, qs // block]).all()
    assert (q_lo[rows, ks // block] <= qs // block).all() and (qs // block < q_hi[rows, ks // block]).all()
    visited = (kv_hi - kv_lo).sum()
    causal = kv_hi.sum()  # every block up to the diagonal
    if layout != "padded":  # several segments per row: whole blocks of other segments are skipped
        assert visited < causal, (visited, causal)


def test_log_sum_exp_cotangent_enters_the_backward_pass(batches):
    """`_flash` returns (out, lse); a loss on lse gets the gradient of the reference log-sum-exp."""
    tokens, _ = batches["mixed"]
    n = tokens.input_ids.shape[0]
    q, k, v, _ = _qkv(n)
    pattern = _pattern(tokens)
    weights = jax.random.normal(jax.random.key(9), (n, H, T))
    kernel = attn._Blockwise(SCALE, None, 16, 16)
    (qp, kp, vp), ids = attn._pad_rows(q, k, v, pattern, 16)
    layout_ids = attn._layout_ids(*ids, 16, 16)

    def flash_lse(q):
        return (attn._flash(kernel, q, kp, vp, layout_ids)[1][:, :, :T] * weights).sum()

    def reference_lse(q):
        s = jnp.einsum("nqkgd,nskd->nkgqs", q.reshape(n, T, KV, H // KV, D), k, precision="highest") * SCALE
        mask = attention_mask(pattern.segment_ids, pattern.prefix_ids)[:, :, None]
        lse = jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1).reshape(n, H, T)
        return (lse * weights).sum()

    got = jax.jit(jax.grad(flash_lse))(qp)[:, :T]
    want = jax.jit(jax.grad(reference_lse))(q)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_sharded_kernel_runs_per_shard(batches):
    tokens, names = batches["mixed"]  # 6 + 2 + 2 + 1 = 11 rows: pad to a multiple of the mesh
    n = 12
    ids = [
        np.pad(np.asarray(x), ((0, n - len(names)), (0, 0)))
        for x in (tokens.segment_ids, tokens.prefix_ids, tokens.positions)
    ]
    pattern = attn.AttentionPattern(*map(jnp.asarray, ids), None, "pallas_gpu", softcap=SOFTCAP)  # carried
    q, k, v, _ = _qkv(n)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: attn.attention(q, k, v, pattern, scale=SCALE))(q, k, v)
    np.testing.assert_allclose(got, BACKEND_FNS["xla"](q, k, v, pattern), atol=2e-5)


def test_attention_dispatches_every_backend_by_name(batches):
    """`attention` runs each backend named in the pattern (on CPU: interpret mode, XLA for cuDNN's call)."""
    tokens, names = batches["mixed"]
    q, k, v, _ = _qkv(len(names))
    want = BACKEND_FNS["xla"](q, k, v, _pattern(tokens, WINDOW))
    for backend in ("blockwise", "pallas_gpu", "cudnn", "splash"):  # auto and xla: the reference on CPU
        got = jax.jit(lambda q, k, v, p: attn.attention(q, k, v, p, scale=SCALE))(
            q, k, v, _pattern(tokens, WINDOW, backend)
        )
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=backend)


def test_auto_choice_per_platform():
    pick = attn.resolve_backend
    longest = attn.CPU_XLA_MAX_LENGTH
    assert pick("auto", platform="cpu", length=longest, dtype=jnp.float32, head_dim=64) == "xla"
    assert pick("auto", platform="cpu", length=longest + 1, dtype=jnp.float32, head_dim=64) == "blockwise"
    assert pick("auto", platform="gpu", length=4096, dtype=jnp.bfloat16, head_dim=128) == "cudnn"
    assert pick("auto", platform="gpu", length=4096, dtype=jnp.float32, head_dim=128) == "pallas_gpu"
    assert pick("auto", platform="tpu", length=4096, dtype=jnp.bfloat16, head_dim=128) == "splash"
    assert pick("splash", platform="cpu", length=8, dtype=jnp.float32, head_dim=8) == "splash"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        pick("flash", platform="cpu", length=8, dtype=jnp.float32, head_dim=8)


@pytest.mark.parametrize("device", [("NVIDIA H200", "gpu"), ("NVIDIA H100 80GB HBM3", "cuda")])
def test_the_traced_for_mesh_decides_the_platform(device, batches):
    """A step traced for a mesh of GPUs this CPU process does not have (ahead-of-time, deviceless) gets the
    GPU kernels, compiled for the device (not interpret mode); without a mesh the default device decides."""
    tokens, names = batches["mixed"]
    q, k, v, _ = _qkv(len(names))
    fn = functools.partial(attn.attention, pattern=_pattern(tokens), scale=SCALE)
    gpu = jax.sharding.AbstractMesh(
        (1,), ("data",), abstract_device=jax.sharding.AbstractDevice(device[0], 132, device[1])
    )
    with jax.sharding.use_abstract_mesh(gpu):
        assert attn.target_platform() == "gpu"
        calls = _pallas_calls(jax.make_jaxpr(fn)(q, k, v).jaxpr)  # float32: auto -> pallas_gpu on GPU
    assert len(calls) == 1 and "flash_fwd" in str(calls[0].params["name"]), calls
    assert not calls[0].params["interpret"]
    assert attn.target_platform() == "cpu"
    assert not _pallas_calls(jax.make_jaxpr(fn)(q, k, v).jaxpr)  # auto -> xla on CPU at this length


def test_config_names_match_the_backends_and_policies():
    hints = typing.get_type_hints(ModelSection)
    assert typing.get_args(hints["attention"]) == attn.BACKENDS
    assert set(typing.get_args(hints["remat"])) == {"none", *REMAT_POLICIES}


def _export(fn, platform: str, t: int, d: int):
    """Lowers fn's forward and backward (window, soft cap) for `platform` from this CPU machine (Pallas ->
    Triton / Mosaic)."""
    q = jax.ShapeDtypeStruct((2, t, H, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, t, KV, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, t), jnp.int32)

    def step(q, k, v, seg, pre, pos):
        pattern = attn.AttentionPattern(seg, pre, pos, WINDOW, softcap=SOFTCAP)  # tanh lowers too
        loss = lambda q, k, v: fn(q, k, v, pattern).astype(jnp.float32).sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    checks = [
        jax.export.DisabledSafetyCheck.custom_call(c) for c in ("__gpu$xla.gpu.triton", "tpu_custom_call")
    ]
    return jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(
        q, kv, kv, ids, ids, ids
    )


def test_pallas_gpu_kernels_lower_to_triton():
    """The three Triton kernels build for CUDA (bf16, GQA, odd length, a head_dim padded 80 -> 128)."""
    fn = lambda q, k, v, p: attn.pallas_gpu_attention(q, k, v, p, scale=SCALE, block_q=128, block_k=64)  # noqa: E731
    text = _export(fn, "cuda", t=300, d=80).mlir_module()
    for name in ("flash_fwd", "flash_dq", "flash_dkv"):
        assert f'name = "{name}"' in text


def test_splash_lowers_to_mosaic_for_tpu():
    fn = lambda q, k, v, p: attn.splash_attention(q, k, v, p, scale=SCALE)  # noqa: E731
    assert "tpu_custom_call" in _export(fn, "tpu", t=256, d=128).mlir_module()


# ------------------------------------------------------------------------------------------- whole model


MODEL_HF = dict(
    model_type="mistral",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=H,
    num_key_value_heads=KV,
    sliding_window=WINDOW,
    initializer_range=0.2,
)


def _model_loss_and_grads(attention: str, tokens: TokenBatch, num_slots: int):
    """((weighted sum of sequence log-probs, token log-probs), parameter gradients) of the tiny Mistral."""
    model = from_config(ModelConfig.from_hf(MODEL_HF), rngs=nnx.Rngs(0), attention=attention)
    graphdef, params = nnx.split(model)

    def loss(params):
        token_logps, seq_logps, _ = sequence_logprobs(nnx.merge(graphdef, params), tokens, num_slots)
        return (seq_logps * jnp.arange(num_slots)).sum(), token_logps

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.fixture(scope="module")
def model_reference(batches):
    tokens, names = batches["mixed"]
    return _model_loss_and_grads("xla", jax.tree.map(jnp.asarray, tokens), len(names) * K)


@pytest.mark.parametrize("backend", ["blockwise", "pallas_gpu"])  # cudnn and splash: the same dispatch, below
def test_model_logprobs_and_gradients_do_not_depend_on_the_backend(backend, batches, model_reference):
    tokens, names = batches["mixed"]
    (loss, token_logps), grads = _model_loss_and_grads(
        backend, jax.tree.map(jnp.asarray, tokens), len(names) * K
    )
    (want_loss, want_logps), want_grads = model_reference
    np.testing.assert_allclose(token_logps, want_logps, atol=2e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4), grads, want_grads)


def _step_hlo(attention: str, remat: str, t: int):
    """The compiled forward + backward of sequence_logprobs for rows of t tokens (tiny model, 2 rows)."""
    cfg = ModelConfig.from_hf(dict(MODEL_HF, sliding_window=None))
    model = from_config(cfg, rngs=nnx.Rngs(0), attention=attention, remat=remat)
    graphdef, params = nnx.split(model)
    ex = [(np.arange(1, t // 4, dtype=np.int32), [np.arange(1, t - t // 4, dtype=np.int32) % 60 + 1])] * 2
    tokens = jax.tree.map(jnp.asarray, padded_layout(ex, 1, t))

    def loss(params):
        return sequence_logprobs(nnx.merge(graphdef, params), tokens, 2)[1].sum()

    return jax.jit(jax.grad(loss)).lower(params).compile()


def test_blockwise_step_holds_no_t_by_t_tensor():
    t = 512  # blocks of 256: every tile is [.., 256, 256] at most
    blockwise, reference = _step_hlo("blockwise", "none", t), _step_hlo("xla", "none", t)

    def square(compiled):
        return [line for line in compiled.as_text().splitlines() if f"{t},{t}]" in line]

    assert square(reference), "the reference step should hold [T, T] masks/probabilities (the check can fail)"
    assert not square(blockwise), square(blockwise)[:3]
    memory = blockwise.memory_analysis().temp_size_in_bytes, reference.memory_analysis().temp_size_in_bytes
    assert memory[0] < memory[1] / 2, memory


@pytest.mark.parametrize("policy", ["attention", "minimal_attention"])
def test_attention_remat_policies_keep_output_and_lse_not_probabilities(policy, batches, capsys):
    """Under these policies a block's backward pass reuses the saved out + lse: no second forward loop."""
    tokens, names = batches["mixed"]
    q, k, v, _ = _qkv(len(names))
    pattern = _pattern(tokens)

    def loss(q, policy):
        fn = jax.checkpoint(
            lambda q: jnp.sin(BACKEND_FNS["blockwise"](q, k, v, pattern)).sum(), policy=policy
        )
        return fn(q)

    jax.ad_checkpoint.print_saved_residuals(lambda q: loss(q, REMAT_POLICIES[policy]), q)
    saved = capsys.readouterr().out
    assert f"named '{attn.ATTENTION_OUT}'" in saved and f"named '{attn.ATTENTION_LSE}'" in saved, saved

    def query_block_loops(
        policy,
    ):  # lax.map / lax.scan over query blocks: forward, backward, recomputed forward
        return str(jax.make_jaxpr(jax.grad(lambda q: loss(q, policy)))(q)).count("scan[")

    assert query_block_loops(REMAT_POLICIES[policy]) == 2
    assert (
        query_block_loops(REMAT_POLICIES["full"]) == 3
    )  # the check can fail: full remat re-runs the forward
