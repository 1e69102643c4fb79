"""Mixtures of experts: the grouped-matmul kernels (the GPU Pallas pair, megablox's TPU weight gradient; in
interpret mode on CPU) against jax.lax.ragged_dot, alone and in a whole model; float32 weight gradients under
bf16 compute; routing and the loader's refusals. Parity with transformers: test_models.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax._src.interpreters import partial_eval as pe
from jaxprs import equations

from copg_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained
from copg_jax.models.adapters import add_adapters, resolve_targets
from copg_jax.models.grouped_matmul import grouped_matmul, pad_rows, row_block, tile_layout
from copg_jax.models.lora import LoRASpec
from copg_jax.models.moe import MoE, _sharded_expert_mlps, expert_mlps, grouped_impl, route
from copg_jax.rewards.reward_model import score_model_from_decoder

MIXTRAL = ModelConfig(
    model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, num_experts=4, experts_per_token=2, expert_intermediate_size=16,
    norm_topk_prob=True,
)  # fmt: skip


def test_tile_layout_puts_every_group_at_a_tile_boundary():
    sizes = jnp.asarray([70, 0, 5, 64], jnp.int32)
    dest, tile_group, lo, hi = tile_layout(sizes, 139, block=64)
    np.testing.assert_array_equal(lo, [0, 2, 2, 3])
    np.testing.assert_array_equal(hi, [2, 2, 3, 4])
    np.testing.assert_array_equal(dest[:70], np.arange(70))  # group 0 in tiles 0 and 1
    np.testing.assert_array_equal(dest[70:75], 128 + np.arange(5))  # group 2 from tile 2
    np.testing.assert_array_equal(dest[75:], 192 + np.arange(64))  # group 3 fills tile 3
    assert tile_group.shape == (-(-(139 + 4 * 63) // 64),)  # the static bound
    np.testing.assert_array_equal(tile_group[:4], [0, 0, 2, 3])
    assert (tile_group[4:] == -1).all()  # past the last group: skipped by the kernels
    x = jnp.arange(1, 140, dtype=jnp.float32)[:, None]  # pad_rows: the rows in their places, zeros between
    padded, layout, block = pad_rows(x, sizes)
    assert block == 32 and padded.shape == (layout.tile_group.shape[0] * 32, 1)
    np.testing.assert_array_equal(padded[layout.dest], x)
    assert np.count_nonzero(padded) == 139 and padded[96, 0] == 71  # group 2 from tile 3 (tiles of 32)
    # rows past the groups (another device's experts): after the last group's tiles, in tiles of no group
    past = tile_layout(sizes, 150, block=64)
    np.testing.assert_array_equal(past.dest[:139], dest)
    np.testing.assert_array_equal(past.dest[139:], 256 + np.arange(11))
    np.testing.assert_array_equal(past.tile_group[:4], [0, 0, 2, 3])
    assert (past.tile_group[4:] == -1).all() and past.tile_group.shape[0] * 64 >= 256 + 11


@pytest.mark.parametrize("impl", ["pallas", "megablox"])
@pytest.mark.parametrize("past", [0, 9])
def test_grouped_matmul_kernels_equal_ragged_dot_with_gradients(past, impl):
    """Groups spanning several row tiles, an empty group, a one-row group, and (`past`) rows past the
    groups, which expert parallelism leaves for other devices' experts: values and both gradients (the
    input's through the transposed kernel, the weights' summed over each group's tiles) equal ragged_dot's,
    which gives those rows zeros; the empty group's weight gradient is zero. "pallas": the GPU kernels;
    "megablox": ragged_dot with the TPU kernel for the weights' gradient."""
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([40, 0, 30, 1, 7], jnp.int32)  # row tiles of 16: group 0 spans three
    rows, d, f = int(sizes.sum()) + past, 32, 48
    assert row_block(rows, 5) == 16
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, d, f)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(rows, f)), jnp.float32)

    def loss(x, w, impl):
        return (grouped_matmul(x, w, sizes, impl=impl, interpret=True) * cotangent).sum()

    want, (want_dx, want_dw) = jax.value_and_grad(loss, (0, 1))(x, w, "ragged_dot")
    got, (dx, dw) = jax.value_and_grad(loss, (0, 1))(x, w, impl)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, atol=1e-4)
    assert not np.any(np.asarray(dw[1])) and np.abs(np.asarray(dw[0])).min() > 0
    assert not np.any(np.asarray(dx[rows - past :]))


@pytest.mark.parametrize("impl", ["ragged_dot", "megablox", "pallas"])
def test_float32_expert_weights_get_float32_gradient_sums_of_bfloat16_rows(impl):
    """bfloat16 rows through float32 experts (bf16 compute, float32 master weights): the output and the rows'
    gradient are the bfloat16 op's, the weights' gradient is summed in float32 (within 1e-6 of the float64 sum
    of the bfloat16 products) where ragged_dot of the cast weights rounds it to bfloat16 (off by > 1e-4)."""
    rng = np.random.default_rng(2)
    sizes = jnp.asarray([40, 0, 30, 1, 7], jnp.int32)
    rows, d, f = int(sizes.sum()) + 5, 32, 48  # 5 rows past the groups, as expert parallelism leaves them
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(5, d, f)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(rows, f)), jnp.bfloat16)
    got, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, impl=impl, interpret=True), x, w)
    want, plain_vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w.astype(x.dtype), sizes), x, w)
    (dx, dw), (plain_dx, plain_dw) = vjp(g), plain_vjp(g)
    assert got.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    exact = impl != "pallas"  # the GPU kernels' own float32 accumulation order: within bfloat16's rounding
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(plain_dx, np.float32), **tol)
    ends = np.cumsum(np.asarray(sizes))
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    ref = np.stack([x64[e - n : e].T @ g64[e - n : e] for e, n in zip(ends, np.asarray(sizes), strict=True)])
    err = lambda a: np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max()  # noqa: E731
    assert err(dw) < 1e-6, err(dw)
    assert err(plain_dw) > 1e-4  # the check can fail: bfloat16's rounding is ~4e-3
    assert not np.any(np.asarray(dw[1]))  # the empty group


@pytest.mark.parametrize("impl", ["ragged_dot", "megablox"])
def test_rows_a_kernel_leaves_unwritten_past_the_groups_reach_no_token(impl, monkeypatch):
    """XLA:TPU's ragged dot (megablox's scheme) writes only the groups' row tiles. Under expert parallelism
    another device's assignments are rows past the groups: simulated here by a ragged_dot that leaves NaN
    there, the experts' outputs and every gradient equal the true ragged_dot's."""
    rng = np.random.default_rng(3)
    m, k, d, f = 24, 2, 32, 16
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    # experts 0-1 held here (local ids 0, 1); the assignments to 2-3 are another device's: id 2, weight 0
    experts = jnp.asarray(rng.integers(0, 4, (m, k)), jnp.int32)
    here = experts < 2
    local, weights = jnp.where(here, experts, 2), jnp.where(here, rng.random((m, k)), 0.0).astype(jnp.float32)
    params = [jnp.asarray(rng.normal(size=s), jnp.float32) * 0.3 for s in ((2, d, f), (2, d, f), (2, f, d))]

    def loss(x, *params):
        y = expert_mlps(x, local, weights, *params, "silu", impl, interpret=True)
        return (y * jnp.arange(d)).sum()

    want = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, *params)
    true_ragged_dot = jax.lax.ragged_dot

    def unwritten_past_groups(lhs, rhs, group_sizes, **kw):
        rows = jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes)
        return jnp.where(rows[:, None], true_ragged_dot(lhs, rhs, group_sizes, **kw), jnp.nan)

    monkeypatch.setattr(jax.lax, "ragged_dot", unwritten_past_groups)
    got = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, *params)
    assert int((~here).sum()) > 8  # the check can fail: rows past the groups exist
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


@pytest.mark.parametrize("impl", ["pallas", "megablox"])
def test_a_model_through_the_kernels_equals_ragged_dot(impl):
    """The grouped matmuls GPUs and TPUs get (forced here, the kernels in interpret mode) give the whole
    model's logits and gradients of ragged_dot's, whose parity with transformers test_models.py holds."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 24)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(24), ids.shape)
    segments = jnp.ones_like(ids)

    def loss(model):
        return model.logits(model(ids, positions, segments, jnp.zeros_like(ids)))[..., :8].sum()

    outputs = []
    for grouped in ("ragged_dot", impl):
        cfg = dataclasses.replace(MIXTRAL, num_layers=1)
        model = from_config(cfg, rngs=nnx.Rngs(0), grouped_matmul=grouped)
        assert all(m.grouped == grouped for _, m in nnx.iter_modules(model) if isinstance(m, MoE))
        outputs.append(nnx.jit(nnx.value_and_grad(loss))(model))
    (want, want_grads), (got, grads) = outputs
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, want_grads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("grouped", ["ragged_dot", "megablox", "pallas"])
def test_matmul_keeping_remat_policies_keep_the_expert_matmuls(grouped, dtype, capsys):
    """Grouped matmuls are no dot_general, so "minimal" keeps them by name, and the backward pass re-runs
    none of them (the custom VJPs recompute only their residuals, which are their inputs): 3 forward + 6
    backward per layer, against 3 more re-run under "full"; with float32 experts under bfloat16 compute too
    (the ragged dot's own custom VJP, `grouped_matmul.ragged_matmul`)."""
    ids = jnp.ones((2, 8), jnp.int32)
    args = (ids, jnp.broadcast_to(jnp.arange(8), ids.shape), ids, jnp.zeros_like(ids))

    def backward_program(policy):
        cfg = dataclasses.replace(MIXTRAL, num_layers=1)
        model = from_config(
            cfg, rngs=nnx.Rngs(0), remat=policy, dtype=dtype, param_dtype=jnp.float32, grouped_matmul=grouped
        )
        graphdef, state = nnx.split(model)

        def loss(state):
            return nnx.merge(graphdef, state)(*args).sum()

        jaxpr = jax.make_jaxpr(jax.grad(loss))(state).jaxpr
        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))  # as lowering drops dead code
        jax.ad_checkpoint.print_saved_residuals(loss, state)
        return sum(e.primitive.name in ("pallas_call", "ragged_dot_general") for e in equations(jaxpr))

    assert backward_program("full") == 12
    assert "named 'expert_matmul'" not in capsys.readouterr().out
    assert backward_program("minimal") == 9
    assert capsys.readouterr().out.count("named 'expert_matmul'") == 3


def _abstract_mesh(kind: str, platform: str):
    device = jax.sharding.AbstractDevice(kind, 1, platform)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device))


def test_auto_picks_each_platforms_grouped_matmul():
    """auto: the Pallas kernels on GPU, megablox's weight gradient on TPU (XLA:TPU computes ragged_dot's over
    every expert), ragged_dot elsewhere and for sizes the kernels do not tile; a forced kernel that does not
    tile, or that is another platform's, is named. Traced for a TPU (ahead of time), the experts' backward
    pass runs megablox compiled, not interpreted."""
    assert grouped_impl("auto", 2048, 1408) == "ragged_dot"  # CPU: the reference
    with _abstract_mesh("NVIDIA H200", "cuda"):
        assert grouped_impl("auto", 2048, 1408) == "pallas"
        with pytest.raises(ValueError, match="'megablox' is a TPU kernel, and this step is traced for gpu"):
            grouped_impl("megablox", 2048, 1408)
    with _abstract_mesh("TPU v5 lite", "tpu"):
        assert grouped_impl("auto", 2048, 1408) == grouped_impl("auto", 32, 16) == "megablox"
        assert grouped_impl("auto", 2048, 1000) == "ragged_dot"  # 1000: past one tile, no tile divides it
        with pytest.raises(ValueError, match="megablox's tgmm does not tile experts of 2048 -> 1000"):
            grouped_impl("megablox", 2048, 1000)
        with pytest.raises(ValueError, match="'pallas' is a GPU kernel, and this step is traced for tpu"):
            grouped_impl("pallas", 2048, 1408)
        x = jnp.ones((8, 32), jnp.bfloat16)
        args = (x, jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2), jnp.bfloat16))
        weights = (jnp.ones((4, 32, 16)), jnp.ones((4, 32, 16)), jnp.ones((4, 16, 32)))
        grad = jax.grad(lambda w: _sharded_expert_mlps(*args, *w, "silu", "auto").astype(jnp.float32).sum())
        jaxpr = jax.make_jaxpr(grad)(weights).jaxpr
        calls = [e for e in equations(jaxpr) if e.primitive.name == "pallas_call"]
    assert len(calls) == 3 and not any(e.params["interpret"] for e in calls)  # one weight gradient each
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in calls)
    with pytest.raises(ValueError, match="unknown grouped matmul 'dense'"):
        grouped_impl("dense", 32, 16)
    with pytest.raises(ValueError, match="unknown grouped matmul 'dense'"):
        from_config(MIXTRAL, grouped_matmul="dense")


def test_routing_takes_the_top_k_of_the_softmax_and_renormalises_on_request():
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.15, 0.25]]))
    weights, experts, probs = route(logits, 2, normalize=False)
    np.testing.assert_allclose(probs, [[0.1, 0.5, 0.15, 0.25]], rtol=1e-6)
    np.testing.assert_array_equal(experts, [[1, 3]])
    np.testing.assert_allclose(weights, [[0.5, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(route(logits, 2, normalize=True)[0], [[2 / 3, 1 / 3]], rtol=1e-6)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="qwen3_moe", mlp_only_layers=[1]), r"dense MLP layers .* mlp_only_layers=\[1\]"),
        (dict(model_type="qwen2_moe", decoder_sparse_step=2), "decoder_sparse_step=2"),
        (dict(model_type="olmoe", clip_qkv=8.0), r"clip_qkv=8.0"),
        (dict(model_type="mixtral", router_jitter_noise=0.01), "router_jitter_noise=0.01"),
        (dict(model_type="mixtral", num_experts_per_tok=9), r"1 <= experts_per_token <= num_experts"),
    ],
)
def test_unsupported_moe_settings_are_named(changes, message):
    hf = dict(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_experts=4, moe_intermediate_size=16,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**hf, **changes})


def test_lora_on_the_experts_is_refused_and_flops_count_the_experts_a_token_uses():
    with pytest.raises(ValueError, match="'w1' names no module of a mixtral model"):
        resolve_targets("mixtral", ["w1"])
    with pytest.raises(
        ValueError, match=r"'all-linear' on a mixtral model also adapts \['mlp.gate', .*q_proj"
    ):
        resolve_targets("mixtral", "all-linear")  # PEFT adapts the experts and router as parameters
    dense = dataclasses.replace(MIXTRAL, num_experts=0, experts_per_token=0, expert_intermediate_size=0)
    d, f = MIXTRAL.hidden_size, MIXTRAL.expert_intermediate_size
    # a token runs 2 of the 4 experts (each as wide as the dense MLP) and the router
    extra = MIXTRAL.num_layers * (d * 4 + 3 * d * f * (2 - 1))
    assert MIXTRAL.flops_per_token(10) == dense.flops_per_token(10) + 6 * extra
    assert MIXTRAL.num_params() == dense.num_params() + MIXTRAL.num_layers * (d * 4 + 3 * d * f * 3)


def test_adapters_and_a_reward_model_from_a_policy_keep_every_setting_of_the_decoder():
    """A decoder rebuilt around another (LoRA adapters, a reward model's backbone) runs as configured: the
    adapted model once ran its experts through the default grouped matmul whatever it was built with."""
    settings = dict(
        dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="minimal", attention="xla", scan_layers=True,
        grouped_matmul="ragged_dot",
    )  # fmt: skip
    model = from_config(MIXTRAL, rngs=nnx.Rngs(0), **settings)
    assert model.settings == settings
    adapted = add_adapters(model, LoRASpec(rank=2, alpha=4.0, targets=("attn.q",)), jax.random.key(1))
    reward = score_model_from_decoder(model, nnx.Rngs(2))
    for built in (adapted, reward.backbone):
        assert built.settings == settings
        assert {m.grouped for _, m in nnx.iter_modules(built) if isinstance(m, MoE)} == {"ragged_dot"}


def test_load_balancing_loss_equals_transformers_aux_loss(tmp_path):
    """With output_router_logits, transformers' Mixtral returns the Switch load-balancing loss over every
    layer's router and its attention mask's tokens; ours over the non-padding tokens is the same, and the
    coefficient reads and writes back through config.json."""
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.02, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    torch_model = transformers.MixtralForCausalLM(config).eval()
    torch_model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (3, 9)).astype(np.int32)
    mask = (np.arange(9)[None] < np.array([[9], [4], [6]])).astype(np.int32)
    with torch.no_grad():
        want = torch_model(
            torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)
        ).aux_loss
    model = from_pretrained(tmp_path, dtype=jnp.float32, scan_layers=True)  # stats summed by the scan
    assert model.config.router_aux_loss_coef == 0.02
    assert model.config.to_hf()["output_router_logits"] is True
    positions = jnp.broadcast_to(jnp.arange(9), ids.shape)
    _, aux = model(jnp.asarray(ids), positions, jnp.asarray(mask), jnp.zeros_like(ids), router_aux=True)
    np.testing.assert_allclose(float(aux), float(want), rtol=1e-5)

    # off in config.json (output_router_logits false): an export over it keeps its coefficient, which the
    # flag would turn on with, rather than the family's default
    import json

    base = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**base, "output_router_logits": False}))
    off = from_pretrained(tmp_path, dtype=jnp.float32)
    assert off.config.router_aux_loss_coef == 0.0
    save_pretrained(off, tmp_path / "export", base=str(tmp_path))
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (written["output_router_logits"], written["router_aux_loss_coef"]) == (False, 0.02)


def test_load_balancing_loss_and_its_gradient_are_the_same_in_every_layout():
    """The shared-prefix layout holds a prompt once for its K completions, which the padded and packed
    layouts (and transformers, TRL) hold once per completion: counted once, its tokens weighed 1/K of theirs
    in the load-balancing loss (+1.1% in the loss, up to 61% in its gradient for Qwen3-MoE), so
    router/aux_loss and the router's update depended on data.layout. Each token now counts once per sequence
    it is part of."""
    from copg_jax.batch import sequences_per_token
    from copg_jax.data.layout import padded_layout, shared_prefix_layout

    model = from_config(dataclasses.replace(MIXTRAL, num_layers=1), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(5)
    examples = [
        (rng.integers(1, 64, p).astype(np.int32), [rng.integers(1, 64, c).astype(np.int32) for c in cs])
        for p, cs in ((6, (2, 3, 1)), (1, (4, 2, 2)), (4, (3, 1, 2)))
    ]
    layouts = {
        "padded": padded_layout(examples, 3, 10),
        "shared_prefix": shared_prefix_layout(examples, 3, 24, 3, split_length=None),
    }
    graphdef, params = nnx.split(model)

    def aux(params, tokens):
        out = nnx.merge(graphdef, params)(
            jnp.asarray(tokens.input_ids), jnp.asarray(tokens.positions), jnp.asarray(tokens.segment_ids),
            jnp.asarray(tokens.prefix_ids), router_aux=True,
        )  # fmt: skip
        return out[1]

    results = {name: jax.jit(jax.value_and_grad(aux))(params, tokens) for name, tokens in layouts.items()}
    want, want_grad = results["padded"]
    value, grad = results["shared_prefix"]  # the packed layout counts tokens as the padded one does
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    shared = layouts["shared_prefix"]
    weights = np.asarray(sequences_per_token(jnp.asarray(shared.segment_ids), jnp.asarray(shared.prefix_ids)))
    assert weights.sum() == sum(
        len(p) + len(c) for p, cs in examples for c in cs
    )  # the padded layout's tokens
