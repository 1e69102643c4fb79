"""Chunked log-probs vs a naive full-logits reference, layout invariance, remat and mesh invariance."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_configs import QWEN2

from copg_jax.batch import TokenBatch
from copg_jax.logprobs import keeps_logits, sequence_logprobs
from copg_jax.models import from_config
from copg_jax.sharding import logical_sharding, make_mesh

CFG = QWEN2
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 96, n).tolist() for n in (4, 3)]
COMPLETIONS = [[RNG.integers(0, 96, n).tolist() for n in lengths] for lengths in ((3, 5), (2, 4))]
K = 2


def layout(rows: list[list[tuple]], width: int) -> TokenBatch:
    """Rows of pieces (tokens, first position, segment, prefix, slot, index of the first predicted token)."""
    arrays = {k: np.zeros((len(rows), width), np.int32) for k in ("ids", "pos", "seg", "prefix", "tgt")}
    slots = np.full((len(rows), width), -1, np.int32)
    for r, pieces in enumerate(rows):
        t = 0
        for tokens, pos0, seg, prefix, slot, first in pieces:
            n = len(tokens)
            arrays["ids"][r, t : t + n] = tokens
            arrays["pos"][r, t : t + n] = pos0 + np.arange(n)
            arrays["seg"][r, t : t + n] = seg
            arrays["prefix"][r, t : t + n] = prefix
            arrays["tgt"][r, t : t + n - 1] = tokens[1:]
            slots[r, t + first - 1 : t + n - 1] = slot
            t += n
    a = {k: jnp.asarray(v) for k, v in arrays.items()}
    return TokenBatch(a["ids"], a["pos"], a["seg"], a["prefix"], a["tgt"], jnp.asarray(slots))


def padded() -> TokenBatch:
    rows = [
        [(p + c, 0, 1, 0, b * K + k, len(p))]
        for b, (p, cs) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
        for k, c in enumerate(cs)
    ]
    return layout(rows, 12)


def packed() -> TokenBatch:
    pieces = [
        (p + c, 0, 0, 0, b * K + k, len(p))
        for b, (p, cs) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
        for k, c in enumerate(cs)
    ]
    rows = [pieces[:2], pieces[2:]]
    return layout([[(*x[:2], s + 1, *x[3:]) for s, x in enumerate(row)] for row in rows], 20)


def shared_prefix() -> TokenBatch:
    rows = []
    for b, (p, cs) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        row = [(p[:-1], 0, 1, 0, -1, len(p))]
        row += [([p[-1]] + c, len(p) - 1, 2 + k, 1, b * K + k, 1) for k, c in enumerate(cs)]
        rows.append(row)
    return layout(rows, 16)


@nnx.jit(static_argnames=("chunk_size",))
def logprobs(model, tokens, chunk_size=None):
    return sequence_logprobs(model, tokens, 4, chunk_size=chunk_size)


@nnx.jit
def naive(model, tokens: TokenBatch):
    hidden = model(tokens.input_ids, tokens.positions, tokens.segment_ids, tokens.prefix_ids)
    logps = jax.nn.log_softmax(model.logits(hidden), axis=-1)
    picked = jnp.take_along_axis(logps, tokens.targets[..., None], axis=-1)[..., 0]
    return jnp.where(tokens.target_slots >= 0, picked, 0.0)


def loss_and_grads(model, tokens, **kwargs):
    weights = jnp.arange(1.0, 5.0)

    def loss(m):
        return jnp.sum(sequence_logprobs(m, tokens, 4, **kwargs)[1] * weights)

    return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize(
    "head_remat, tied, chunk_size, cap",
    [("none", False, 5, None), ("full", True, 2, None), ("auto", False, None, None), ("none", True, 5, 0.1),
     ("full", False, 2, 0.1)],
)  # fmt: skip
def test_chunked_matches_naive_with_gradients(head_remat, tied, chunk_size, cap):
    """Rows hold at most 5 targets of 12 positions: with chunks of 5 (or 2) the last 2 (or 3) chunks hold no
    target and are skipped, forward and backward, whether the softmax is kept or recomputed; with Gemma 2's
    soft cap on the output logits (0.1: about the logits' scale here, so that tanh bends them) as well."""
    model = from_config(dataclasses.replace(CFG, tie_embeddings=tied, final_softcap=cap), rngs=nnx.Rngs(0))
    tokens = padded()
    token_logps, seq_logps, lengths = logprobs(model, tokens, chunk_size=chunk_size)
    expected = naive(model, tokens)
    if cap is not None:  # the cap matters: the uncapped model's log-probs are far from these
        uncapped = naive(from_config(dataclasses.replace(CFG, tie_embeddings=tied), rngs=nnx.Rngs(0)), tokens)
        assert np.abs(np.asarray(uncapped) - np.asarray(expected)).max() > 0.05
    np.testing.assert_allclose(token_logps, expected, atol=1e-5)
    np.testing.assert_allclose(seq_logps, expected.sum(axis=1), atol=1e-5)
    np.testing.assert_array_equal(lengths, [3, 5, 2, 4])

    value, grads = loss_and_grads(model, tokens, chunk_size=chunk_size, head_remat=head_remat)
    ref = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(naive(m, tokens).sum(axis=1) * jnp.arange(1.0, 5.0))))
    ref_value, ref_grads = ref(model)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_a_float32_model_under_64_bit_mode_gives_its_float32_logprobs_and_gradients():
    """jax_enable_x64 (the usual way to debug numerics) made the skipped chunks' zeros float64 beside
    float32 log-probs: sequence_logprobs raised a TypeError in lax.cond."""
    model = from_config(CFG, rngs=nnx.Rngs(0))
    tokens = padded()
    want = logprobs(model, tokens, chunk_size=5)[1]
    with jax.enable_x64(True):
        got = logprobs(model, tokens, chunk_size=5)[1]
        grads = loss_and_grads(model, tokens, chunk_size=5, head_remat="full")[1]
    assert got.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("build", [packed, shared_prefix], ids=["packed", "shared_prefix"])
def test_layouts_match_padded(build):
    model = from_config(CFG, rngs=nnx.Rngs(0))
    _, expected, expected_lengths = logprobs(model, padded())
    _, seq_logps, lengths = logprobs(model, build(), chunk_size=8)
    np.testing.assert_allclose(seq_logps, expected, atol=1e-5)
    np.testing.assert_array_equal(lengths, expected_lengths)


def test_remat_policies_keep_gradients():
    model = from_config(dataclasses.replace(CFG, num_layers=1), rngs=nnx.Rngs(0))
    tokens = shared_prefix()
    value, grads = loss_and_grads(model, tokens)
    for policy in ("full", "dots_saveable", "minimal"):
        value_r, grads_r = loss_and_grads(model, tokens, remat_policy=policy)
        np.testing.assert_allclose(value_r, value, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        from_config(CFG, remat="some")
    with pytest.raises(ValueError, match="unknown head_remat 'some'"):
        keeps_logits("some", 1)
    assert keeps_logits("auto", 2**28) and not keeps_logits("auto", 2**28 + 1)


def _stack_layers(state: nnx.State) -> dict:
    """{path: array} of an unrolled model's state in a scanned one's layout: layers.{i}.x -> layers.x[i]."""
    flat = {k: v.get_value() for k, v in nnx.to_flat_state(state)}
    out = {k: v for k, v in flat.items() if k[0] != "layers"}
    for k in flat:
        if k[:2] == ("layers", 0):
            out[("layers", *k[2:])] = jnp.stack([flat[("layers", i, *k[2:])] for i in range(CFG.num_layers)])
    return out


# two kinds of layer (a window and its own RoPE base on layer 0: Gemma 3's local layers) and soft caps
KINDS = dataclasses.replace(
    CFG,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=3,
    local_rope_theta=100.0,
    attn_softcap=1.0,
    post_norms=True,
)


@pytest.mark.parametrize(
    "cfg, remat_policy",
    [(CFG, "none"), (CFG, "full"), (KINDS, "minimal_attention")],
    ids=["none", "full", "kinds"],
)
def test_scanned_layers_match_unrolled(cfg, remat_policy):
    """Same init, same log-probs and gradients, with the blocks run by lax.scan over stacked parameters
    (layers of different kinds by lax.switch, each branch rematerialised)."""
    tokens = shared_prefix()
    unrolled = from_config(cfg, rngs=nnx.Rngs(0))
    scanned = from_config(cfg, rngs=nnx.Rngs(0), scan_layers=True)
    assert scanned.layers.mlp.up.kernel.get_metadata()["logical_axes"] == ("layers", "embed", "mlp")
    value, grads = loss_and_grads(unrolled, tokens)
    value_s, grads_s = loss_and_grads(scanned, tokens, remat_policy=remat_policy)
    if cfg is KINDS:  # the kinds matter: layer 0 as a global layer gives other log-probs
        uniform = from_config(dataclasses.replace(cfg, layer_types=()), rngs=nnx.Rngs(0), scan_layers=True)
        assert abs(float(loss_and_grads(uniform, tokens)[0]) - float(value)) > 1e-3
    np.testing.assert_allclose(value_s, value, rtol=1e-6)
    expected = _stack_layers(grads)
    actual = {k: v.get_value() for k, v in nnx.to_flat_state(grads_s)}
    assert expected.keys() == actual.keys()
    for k in expected:
        scale = max(1.0, float(np.abs(expected[k]).max()))  # the caps make gradients up to ~10 here
        np.testing.assert_allclose(actual[k], expected[k], atol=1e-6 * scale, err_msg=str(k))


# a mixture of experts (Qwen2-MoE's: 4 experts, 2 a token, a gated shared expert)
MOE = dataclasses.replace(
    CFG, model_type="qwen2_moe", num_experts=4, experts_per_token=2, expert_intermediate_size=16,
    shared_expert_size=24,
)  # fmt: skip


@pytest.mark.parametrize("rows", [4, 2])
def test_mesh_matches_single_device(rows):
    """4 rows split over data x fsdp = 4; 2 rows, which do not split, replicated: the model's activation
    constraints leave them whole (padded by XLA, the padding rows' token 0 reached the embedding gradient)."""
    tokens = packed()
    if rows == 4:
        tokens = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]]), tokens)
    value, grads = loss_and_grads(from_config(CFG, rngs=nnx.Rngs(0)), tokens)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = from_config(CFG, rngs=nnx.Rngs(0), mesh=mesh)
    assert model.layers[0].mlp.up.kernel[...].sharding.spec == jax.P(("fsdp", "expert"), "tensor")
    spec = logical_sharding(mesh, ("batch", "length")) if rows == 4 else jax.NamedSharding(mesh, jax.P())
    sharded = jax.tree.map(lambda x: jax.device_put(x, spec), tokens)
    with jax.set_mesh(mesh):
        value_m, grads_m = loss_and_grads(model, sharded)
    np.testing.assert_allclose(value_m, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_m, grads)


def test_mesh_step_never_gathers_a_whole_batch_activation():
    """On a (2, 2, 2) mesh the embedding lookup reads its rows from the table gathered along the width (the
    vocabulary left split over `tensor`), so its output and its gradient are split by rows as the hidden
    states are. XLA had taken the rows from the table split along the width and, unable to reshard that
    output by rows, replicated it whole on every device ("involuntary full rematerialization"): collectives
    whose result was the whole batch's [N, T, D] activations, forward and backward, growing with the global
    batch on a pod."""
    tokens = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]]), packed())
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(from_config(CFG, rngs=nnx.Rngs(0), mesh=mesh))
    sharded = jax.tree.map(lambda x: jax.device_put(x, logical_sharding(mesh, ("batch", "length"))), tokens)

    def loss(state, tokens):
        return jnp.sum(sequence_logprobs(nnx.merge(graphdef, state), tokens, 4)[1])

    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss)).lower(state, sharded).compile().as_text()
    n, t = tokens.input_ids.shape
    collectives = re.findall(
        r"= \w+\[([\d,]+)\]\S* (all-gather|all-reduce|all-to-all|collective-permute)\(", text
    )
    assert collectives
    assert not [c for c in collectives if c[0].startswith(f"{n},{t},")], collectives


@pytest.mark.parametrize("expert", [1, 2])
def test_mixture_of_experts_on_a_mesh_scanned_and_rematerialised_equals_one_device(expert):
    """Experts routed per device shard of rows, each device running its slice of the expert width with the
    down projection's partial sums added over the tensor axis: log-probs and every gradient (router,
    experts, shared expert) equal one device's, with the layers scanned and rematerialised. With expert
    parallelism (an expert axis of 2) each device holds 2 of the 4 experts: the compiled step gathers only
    those over fsdp, never all 4, and moves the tokens instead (all-gathered over the expert axis, their
    outputs reduce-scattered back)."""
    tokens = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]]), packed())
    value, grads = loss_and_grads(from_config(MOE, rngs=nnx.Rngs(0)), tokens)
    mesh = make_mesh(data=2 // expert, fsdp=2, tensor=2, expert=expert)
    model = from_config(MOE, rngs=nnx.Rngs(0), mesh=mesh, scan_layers=True)
    assert model.layers.mlp.w_down[...].sharding.spec == jax.P(None, "expert", "tensor", "fsdp")
    sharded = jax.tree.map(lambda x: jax.device_put(x, logical_sharding(mesh, ("batch", "length"))), tokens)
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
        logprobs = sequence_logprobs(nnx.merge(graphdef, state), tokens, 4, remat_policy="full")[1]
        return jnp.sum(logprobs * jnp.arange(1.0, 5.0))

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss)).lower(state, sharded).compile()
        value_m, grads_m = step(state, sharded)
    text = step.as_text()
    np.testing.assert_allclose(value_m, value, rtol=1e-5)
    expected, actual = _stack_layers(grads), {k: v.get_value() for k, v in nnx.to_flat_state(grads_m)}
    assert expected.keys() == actual.keys() and ("layers", "mlp", "router", "kernel") in actual
    for k in expected:
        assert np.abs(expected[k]).max() > 0, k
        np.testing.assert_allclose(actual[k], expected[k], atol=1e-5, err_msg=str(k))
    ops = {
        (shape, op) for shape, op in re.findall(r"= f32\[([\d,]+)\]\S* (all-gather|reduce-scatter)\(", text)
    }
    # the expert weights [(layers,) E, 32, 16 / 2] gathered over fsdp: E = 4 on every device, or 2 of them
    gathered = {shape.split(",")[-3] for shape, op in ops if op == "all-gather" and shape.endswith(",32,8")}
    assert gathered == {str(4 // expert)}
    # 20 tokens (one row) per device; with the expert axis, the 2 x 20 of two devices, and 20 back
    assert ({("2,20,32", "all-gather"), ("1,20,32", "reduce-scatter")} <= ops) == (expert > 1)
