"""A bfloat16-compute model's parameter gradients leave their matmuls and sums in float32 (`models.mixed`), so
that the partitioner's cross-device sums of them are float32 ones; the forward pass and the activations'
gradients are the plain ops', and the remat policies that keep weight matmuls still keep them."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxprs import equations
from tiny_configs import QWEN2

from copg_jax import train as tr
from copg_jax.batch import ScoredBatch, TokenBatch
from copg_jax.config import apply_overrides, from_dict
from copg_jax.data.refcache import _logprob_fn
from copg_jax.logprobs import sequence_logprobs
from copg_jax.models import from_config, mixed
from copg_jax.models.adapters import add_adapters
from copg_jax.models.lora import LoRASpec
from copg_jax.run_config import Config

KEYS = jax.random.split(jax.random.key(0), 4)
X = jax.random.normal(KEYS[0], (64, 48), jnp.bfloat16)


def _plain(op):
    return {
        "matmul": lambda x, w: x @ w.astype(x.dtype),
        "scale": lambda x, w: x * w.astype(x.dtype),
        "shift": lambda x, w: x + w.astype(x.dtype),
    }[op]


def _float64_param_gradient(op, x, g):
    """The parameter's gradient from the bfloat16 x and cotangent g, summed in float64."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    if op == "matmul":
        return x.T @ g
    return (x * g).sum(0) if op == "scale" else g.sum(0)


@pytest.mark.parametrize(("op", "param_shape"), [("matmul", (48, 32)), ("scale", (48,)), ("shift", (48,))])
def test_parameter_gradient_in_float32_the_rest_as_the_plain_op(op, param_shape):
    w = jax.random.normal(KEYS[1], param_shape, jnp.float32)
    out_shape = (64, 32) if op == "matmul" else (64, 48)
    g = jax.random.normal(KEYS[2], out_shape, jnp.bfloat16)
    fn = getattr(mixed, op)
    got, vjp = jax.vjp(fn, X, w)
    want, plain_vjp = jax.vjp(_plain(op), X, w)
    (dx, dw), (plain_dx, plain_dw) = vjp(g), plain_vjp(g)
    # forward and the activation's gradient: bit for bit the plain op's, in the compute dtype
    assert got.dtype == dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(plain_dx, np.float32))
    # the parameter's gradient: float32 sums of the bfloat16 products, where the plain op rounds to bfloat16
    # (run op by op here, so that its bfloat16 result is materialised as it is on an accelerator)
    ref = _float64_param_gradient(op, X, g)
    err = lambda d: np.abs(np.asarray(d, np.float64) - ref).max() / np.abs(ref).max()  # noqa: E731
    assert dw.dtype == jnp.float32 and err(dw) < 1e-6, err(dw)
    assert err(plain_dw) > 1e-4  # the check can fail: bfloat16's rounding is ~4e-3
    # jitted: the same, up to the order of the float32 sums
    jitted = jax.jit(lambda x, w: jax.vjp(fn, x, w)[1](g)[1])(X, w)
    assert jitted.dtype == jnp.float32 and err(jitted) < 1e-6, err(jitted)


def test_embedding_lookup_reads_rows_in_the_compute_dtype_and_scatters_its_gradient_in_float32():
    """`mixed.take` casts the table before the lookup (on a mesh the table is then gathered in bfloat16): the
    same rows as the lookup cast after; its gradient is the float32 scatter-add of the rows' cotangents (a
    token repeated 48 times sums 48 of them), against float64."""
    table = jax.random.normal(KEYS[1], (10, 48), jnp.float32)
    ids = jnp.asarray([[3, 3, 3, 7], [3, 0, 3, 9]] * 16)
    g = jax.random.normal(KEYS[2], (*ids.shape, 48), jnp.bfloat16)
    got, vjp = jax.vjp(lambda t: mixed.take(t, ids, jnp.bfloat16), table)
    want = jnp.take(table, ids, axis=0).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    (grad,) = vjp(g)
    ref = np.zeros((10, 48))
    np.add.at(ref, np.asarray(ids), np.asarray(g, np.float64))
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-5)
    assert np.abs(ref[[1, 2, 4, 5, 6, 8]]).max() == 0 and np.abs(ref[3]).max() > 1


def test_float32_parameters_of_a_float32_model_take_the_plain_ops():
    w = jnp.ones((48, 32), jnp.float32)
    jaxpr = str(
        jax.make_jaxpr(jax.grad(lambda x, w: mixed.matmul(x, w).sum(), argnums=1))(X.astype(jnp.float32), w)
    )
    assert "custom_vjp" not in jaxpr and "param_matmul" not in jaxpr


CFG = QWEN2
MIXTRAL = dataclasses.replace(
    CFG, model_type="mixtral", qkv_bias=False, num_experts=4, experts_per_token=2,
    expert_intermediate_size=16, norm_topk_prob=True,
)  # fmt: skip
GPT2 = dataclasses.replace(
    CFG, model_type="gpt2", num_kv_heads=4, norm="layer", activation="gelu_tanh", gated_mlp=False,
    mlp_bias=True, out_bias=True, position_embedding="learned",
)  # fmt: skip


def _tokens() -> TokenBatch:
    """4 rows of 13 positions (52 tokens: no parameter's width), one prompt token + 12 completion targets."""
    rng = np.random.default_rng(0)
    n, t = 4, 13
    ids = rng.integers(1, 96, (n, t)).astype(np.int32)
    return TokenBatch(
        input_ids=ids,
        positions=np.tile(np.arange(t, dtype=np.int32), (n, 1)),
        segment_ids=np.ones((n, t), np.int32),
        prefix_ids=np.zeros((n, t), np.int32),
        targets=np.roll(ids, -1, axis=1),
        target_slots=np.where(np.arange(t) < t - 1, np.arange(n)[:, None], -1).astype(np.int32),
    )


def _loss_of_state(model):
    graphdef, state = nnx.split(model)
    tokens = _tokens()

    def loss(state):
        return jnp.sum(sequence_logprobs(nnx.merge(graphdef, state), tokens, 4)[1])

    return loss, state


def _parameter_shapes(state) -> set[tuple[int, ...]]:
    """Shapes a parameter's gradient can take where it is computed: the parameter's, one layer's (scanned
    blocks stack them), and a kernel's as the 2-D matrix its matmul uses."""
    shapes = set()
    for leaf in jax.tree.leaves(state):
        for full in (leaf.shape, leaf.shape[1:]):
            shapes.add(tuple(full))
            shapes.update((math.prod(full[:i]), math.prod(full[i:])) for i in range(1, len(full)))
    return shapes


@pytest.mark.parametrize(
    ("cfg", "scan", "lora", "grouped"),
    [
        (CFG, False, None, None),
        (GPT2, True, None, None),
        (CFG, True, LoRASpec(2, 4.0, targets=("attn.qkv", "mlp.down")), None),
        (CFG, False, LoRASpec(2, 4.0, targets=("attn.v",), dora=True), None),
        (MIXTRAL, True, None, "ragged_dot"),
        (MIXTRAL, False, None, "pallas"),
    ],
    ids=["qwen2", "gpt2-scanned", "qwen2-scanned-lora", "qwen2-dora", "mixtral-scanned", "mixtral-pallas"],
)
def test_every_parameter_gradient_of_a_bfloat16_model_is_summed_in_float32(cfg, scan, lora, grouped):
    """No matmul (dense or grouped: a mixture's experts) or sum of the gradient program yields a
    parameter-shaped result in bfloat16: the partitioner reduces each of these across the devices that hold
    the batch, in its dtype."""
    model = from_config(
        cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32, scan_layers=scan, remat="minimal",
        grouped_matmul=grouped or "auto",  # the Pallas kernels: in interpret mode, only traced here
    )  # fmt: skip
    model = model if lora is None else add_adapters(model, lora, jax.random.key(1))
    loss, state = _loss_of_state(model)
    shapes = _parameter_shapes(state)
    found, upcast = [], []
    for eqn in equations(jax.make_jaxpr(jax.grad(loss))(state).jaxpr):
        if eqn.primitive.name in ("dot_general", "ragged_dot_general", "reduce_sum"):
            found += [
                (eqn.primitive.name, v.aval)
                for v in eqn.outvars
                if tuple(v.aval.shape) in shapes and jnp.issubdtype(v.aval.dtype, jnp.floating)
            ]
        # a parameter-shaped bfloat16 value made float32: a gradient rounded first (the forward pass only
        # narrows the parameters; a kernel's float32 result, as the Pallas weight gradient's, is cast too)
        if eqn.primitive.name == "convert_element_type" and tuple(eqn.outvars[0].aval.shape) in shapes:
            if eqn.invars[0].aval.dtype == jnp.bfloat16 and eqn.outvars[0].aval.dtype == jnp.float32:
                upcast.append(eqn.outvars[0].aval.str_short())
    bf16 = [f"{name} -> {aval.str_short()}" for name, aval in found if aval.dtype != jnp.float32]
    assert not bf16 and not upcast, (bf16, upcast)
    # the check looked at the kernels' gradients (the Pallas kernels' are no dot_general)
    assert len(found) >= (1 if grouped == "pallas" else 3) * cfg.num_layers
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(jax.eval_shape(jax.grad(loss), state)))


@pytest.mark.parametrize(("policy", "kept"), [("minimal", True), ("dots_saveable", True), ("full", False)])
def test_remat_policies_still_keep_the_weight_matmuls(policy, kept, capsys):
    """The policies that keep weight matmuls keep them by name under bfloat16 compute (jax.checkpoint cannot
    see the dot inside `mixed.matmul`'s custom VJP: without the name they would be recomputed)."""
    model = from_config(
        dataclasses.replace(CFG, num_layers=1), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32,
        remat=policy,
    )  # fmt: skip
    loss, state = _loss_of_state(model)
    jax.ad_checkpoint.print_saved_residuals(loss, state)
    saved = capsys.readouterr().out
    assert (f"named '{mixed.PARAM_MATMUL}'" in saved) == kept, saved


def test_the_train_step_computes_the_reference_passes_log_probs_at_the_start():
    """At step 0 the policy is the reference: the train step's log-probs of a bfloat16 model equal those of
    the pass that fills the reference cache, so the log-ratios start at 0 exactly. (The step used to cast
    every parameter to bfloat16 first, which the reference pass does not: a LayerNorm's float32 scale and
    bias were then rounded in one and not in the other.)"""
    hf = {
        "model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
    }  # fmt: skip
    base = {"model": {"config": hf, "tokenizer": "unused", "dtype": "bfloat16"}, "data": {"path": "/x.jsonl"}}
    cfg = from_dict(Config, apply_overrides(base, ["loss.name=copg"]))
    model = from_config(tr.model_config(cfg), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    for norm in (model.final_norm, model.layers[0].attn_norm):  # scales and biases off bfloat16's grid
        norm.scale[...] = norm.scale[...] + 1e-3 * jnp.arange(32, dtype=jnp.float32)
        norm.bias[...] = norm.bias[...] + 1e-3 * jnp.arange(32, dtype=jnp.float32)
    tokens = _tokens()
    ref_logps, lengths = _logprob_fn(model, 4)(tokens)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = ScoredBatch(
        tokens=tokens, rewards=jnp.array([[1.0, 0.0], [0.0, 1.0]]), completion_mask=jnp.ones((2, 2), bool),
        ref_logps=ref_logps.reshape(2, 2), completion_lengths=lengths.reshape(2, 2),
    )  # fmt: skip
    _, metrics = jax.jit(tr.make_loss_fn(graphdef, cfg))(params, batch)
    assert float(metrics["logps/policy"]) == float(metrics["logps/ref"]) != 0.0
    assert float(metrics["kl/seq"]) == 0.0
