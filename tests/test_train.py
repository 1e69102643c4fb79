"""The jitted CoPG update on a tiny random Llama: learning, grad accumulation, meshes, schedule."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copg_jax import checkpoint as ckpt
from copg_jax import train as tr
from copg_jax.batch import ScoredBatch
from copg_jax.config import apply_overrides, from_dict, to_dict
from copg_jax.data.layout import padded_layout
from copg_jax.losses import copg_loss
from copg_jax.metrics import table_peak_flops
from copg_jax.models import Decoder, ModelConfig, from_config
from copg_jax.models.moe import MoE
from copg_jax.run_config import Config, OptimSection
from copg_jax.sharding import make_mesh

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _cfg(*overrides) -> Config:
    base = {
        "model": {"config": TINY, "tokenizer": "unused", "dtype": "float32"},
        "optim": {"lr": 0.01, "max_grad_norm": 1.0, "schedule": "constant"},
        "train": {"steps": 10},
        "loss": {"beta": 0.5},
    }
    return from_dict(Config, apply_overrides(base, list(overrides)))


def _batch(seed: int, num_prompts: int = 4, k: int = 3, length: int = 16) -> ScoredBatch:
    """Host numpy ScoredBatch, padded layout, every completion present."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(num_prompts):
        prompt = rng.integers(1, 64, size=rng.integers(2, 5)).astype(np.int32)
        completions = [rng.integers(1, 64, size=rng.integers(1, 6)).astype(np.int32) for _ in range(k)]
        examples.append((prompt, completions))
    tokens = padded_layout(examples, k, length)
    lengths = np.asarray([[len(c) for c in ex[1]] for ex in examples], np.int32)
    return ScoredBatch(
        tokens=tokens,
        rewards=rng.normal(size=(num_prompts, k)).astype(np.float32),
        completion_mask=np.ones((num_prompts, k), bool),
        ref_logps=(-3.0 * lengths + rng.normal(size=(num_prompts, k))).astype(np.float32),
        completion_lengths=lengths,
    )


def _split_prompts(batch: ScoredBatch, parts: int) -> list[ScoredBatch]:
    """Splits a padded-layout batch along prompts into `parts` self-contained microbatches."""
    b, k = batch.rewards.shape
    per = b // parts
    out = []
    for i in range(parts):
        rows = slice(i * per * k, (i + 1) * per * k)
        tokens = jax.tree.map(lambda x, rows=rows: np.array(x[rows]), batch.tokens)
        tokens = tokens.replace(
            target_slots=np.where(tokens.target_slots >= 0, tokens.target_slots - i * per * k, -1)
        )
        prompts = slice(i * per, (i + 1) * per)
        out.append(
            ScoredBatch(
                tokens=tokens,
                rewards=batch.rewards[prompts],
                completion_mask=batch.completion_mask[prompts],
                ref_logps=batch.ref_logps[prompts],
                completion_lengths=batch.completion_lengths[prompts],
            )
        )
    return out


_INIT = {}


def _setup(cfg: Config, mesh):
    """(jitted step, fresh state on `mesh`); the random init is computed once and moved to each mesh."""
    tx = tr.make_optimizer(cfg.optim, cfg.train.steps, tr.compensates(cfg))
    graphdef, abstract = tr.abstract_model(cfg)
    shardings = tr.state_shardings(abstract, tx, mesh)
    key = (
        repr(cfg.model.config),
        cfg.model.scan_layers,
        cfg.model.param_dtype,
        repr(cfg.lora),
        cfg.train.seed,
    )
    if key not in _INIT:
        _INIT[key] = tr.init_params(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    params = jax.device_put(_INIT[key], shardings.params)
    state = tr.init_state(params, tx, shardings)
    return tr.jit_train_step(graphdef, tx, cfg, shardings, mesh), state


def _params(state) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


@pytest.fixture(scope="module")
def reference_run():
    """Three updates on one device over three 8-prompt batches: (step fn, losses, params after each)."""
    cfg = _cfg()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, state = _setup(cfg, mesh)
    batches = [_batch(s, num_prompts=8) for s in range(3)]
    losses, params, grad_norms = [], [], []
    for b in batches:
        state, metrics = step(state, tr.stack_to_device([b], mesh), tr.NO_FROZEN)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        params.append(_params(state))
    return {
        "cfg": cfg, "batches": batches, "losses": losses, "grad_norms": grad_norms, "params": params,
        "step": step, "state": state,
    }  # fmt: skip


def test_steps_reduce_the_loss(reference_run):
    step, state = reference_run["step"], reference_run["state"]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    host = reference_run["batches"][0]
    batch = tr.stack_to_device([host], mesh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, tr.NO_FROZEN)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 3 + 8
    for key in ("rewards/margins", "kl/seq", "grad_norm", "lr", "tokens"):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["lr"]) == pytest.approx(0.01)
    assert float(metrics["tokens"]) == float(np.sum(host.tokens.segment_ids != 0))


def test_grad_accumulation_equals_full_batch(reference_run):
    cfg = _cfg("optim.grad_accum_steps=2")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, state = _setup(cfg, mesh)
    for i, b in enumerate(reference_run["batches"][:2]):
        state, metrics = step(state, tr.stack_to_device(_split_prompts(b, 2), mesh), tr.NO_FROZEN)
        np.testing.assert_allclose(float(metrics["loss"]), reference_run["losses"][i], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), reference_run["grad_norms"][i], rtol=1e-5)
    # gradients agree to ~1e-6; Adam's m / sqrt(v) turns that reduction-order noise into up to ~4e-5 on a few
    # parameters after two updates (layer 0 gate[19, 56]: 1.5e-5 with one head chunk, 3.7e-5 with four), as
    # in the mesh test below, hence atol 1e-4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
        _params(state),
        reference_run["params"][1],
    )


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_one_device_and_eight_device_mesh_agree(reference_run, shape):
    mesh = make_mesh(*shape)
    step, state = _setup(reference_run["cfg"], mesh)
    for b in reference_run["batches"]:
        state, metrics = step(state, tr.stack_to_device([b], mesh), tr.NO_FROZEN)
    assert state.params["embed"].sharding.mesh == mesh
    # Adam's moments live where their parameter lives (not replicated: 2x the params on every device)
    for moments in (
        optax.tree_utils.tree_get(state.opt_state, "mu"),
        optax.tree_utils.tree_get(state.opt_state, "nu"),
    ):
        jax.tree.map(
            lambda m, p: np.testing.assert_equal(m.sharding.spec, p.sharding.spec), moments, state.params
        )
    np.testing.assert_allclose(float(metrics["loss"]), reference_run["losses"][-1], rtol=1e-5)
    # Adam normalises each update to ~lr (0.01): reduction-order noise in gradients that change sign between
    # steps shows up in m / sqrt(v) at up to ~1% of lr, hence atol 1e-4 on the parameters
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
        _params(state),
        reference_run["params"][-1],
    )


def test_step_is_traced_with_the_model_activation_constraints():
    """The step is traced on its mesh, so `sharding.constrain` inside the model is not a no-op: without it a
    wide FSDP mesh left XLA free to keep the batch whole (Llama-3-8B on 256 chips: full-batch head logits,
    126 GiB per device)."""
    mesh = make_mesh(1, 8, 1)
    step, state = _setup(_cfg(), mesh)
    text = step.lower(state, tr.stack_to_device([_batch(0, num_prompts=8)], mesh), tr.NO_FROZEN).as_text()
    assert "sharding_constraint" in text and '{"data", "fsdp", "expert"}' in text


@pytest.mark.parametrize(("layout", "kernel_calls"), [("padded", 0), ("packed", 3)])
def test_the_loss_traces_the_kernel_of_the_data_layout(layout, kernel_calls):
    """data.layout reaches the attention: with cudnn, padded rows trace cuDNN's call alone (XLA's on CPU) and
    packed rows the Triton kernels alone (forward, dq, dk/dv per layer; interpret mode on CPU), not chosen by
    a lax.cond over both. `model.attention=cudnn` on this CPU: the same dispatch as on a GPU."""
    cfg = _cfg("model.attention=cudnn", f"data.layout={layout}", "model.config.num_hidden_layers=1")
    graphdef, params = tr.abstract_model(cfg)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(0))
    grad = jax.grad(lambda p, b: tr.make_loss_fn(graphdef, cfg)(p, b)[0])
    jaxpr = jax.make_jaxpr(grad)(params, batch).jaxpr

    def kernels(jaxpr, in_cond=False):  # (in a lax.cond branch?) per pallas_call, kernel bodies aside
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield in_cond
                continue
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from kernels(sub, in_cond or eqn.primitive.name == "cond")

    found = list(kernels(jaxpr))
    assert len(found) == kernel_calls and not any(found), (layout, found)


def test_scanned_layers_and_recomputed_head_match_the_reference(reference_run):
    """model.scan_layers=true and model.head_remat=full on a (2, 2, 2) mesh: the reference run's updates."""
    mesh = make_mesh(2, 2, 2)
    step, state = _setup(_cfg("model.scan_layers=true", "model.head_remat=full"), mesh)
    for b in reference_run["batches"]:
        state, metrics = step(state, tr.stack_to_device([b], mesh), tr.NO_FROZEN)
    np.testing.assert_allclose(float(metrics["loss"]), reference_run["losses"][-1], rtol=1e-5)
    expected = reference_run["params"][-1]
    params = _params(state)
    layers = params.pop("layers")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
        params,
        {k: v for k, v in expected.items() if k != "layers"},
    )
    for i, layer in expected["layers"].items():
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-3, atol=1e-4), layers, layer
        )


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(schedule):
    optim = OptimSection(lr=1.0, warmup_steps=10, schedule=schedule, end_lr_ratio=0.1)
    fn = tr.make_schedule(optim, total_steps=110)
    assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.5)
    assert float(fn(10)) == pytest.approx(1.0)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[schedule]
    assert float(fn(110)) == pytest.approx(end, abs=1e-6)
    mid = {"cosine": 0.1 + 0.9 * 0.5, "linear": 0.55, "constant": 1.0}[schedule]
    assert float(fn(60)) == pytest.approx(mid, abs=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_weight_decay_spares_biases_and_norms_of_a_model_by_name(scan_layers):
    """One AdamW update with zero gradients is the decay alone: kernels and embeddings shrink by lr * wd,
    biases and norm scales stay, as in transformers' Trainer. It went by rank: per-head attention biases
    [H, Dh] were decayed, and under scan_layers the stacked norm scales [L, D] too."""
    cfg = ModelConfig.from_hf({**TINY, "model_type": "qwen2", "attention_bias": True})
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), scan_layers=scan_layers))
    params = jax.tree.map(lambda x: jnp.ones(x.shape), nnx.state(model, nnx.Param))
    tx = tr.make_optimizer(OptimSection(lr=0.1, weight_decay=0.5, max_grad_norm=0.0, schedule="constant"), 10)

    @jax.jit
    def decayed(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = dict(nnx.to_flat_state(decayed(params)))
    spared = {path for path in new if path[-1] in ("bias", "scale")}
    assert {path[-2] for path in spared} == {"q", "k", "v", "attn_norm", "mlp_norm", "final_norm"}
    for path, var in new.items():
        expected = 1.0 if path in spared else 1 - 0.1 * 0.5
        np.testing.assert_allclose(var.get_value(), expected, err_msg=str(path))


def test_bf16_weights_take_every_update_by_kahan_summation():
    """bfloat16 weights (model.param_dtype) dropped every AdamW step below half their spacing: at lr 1e-6 a
    run's weights moved 0.10x as far as a float32 run's in 20 updates, 98% never (RESULTS.md).
    `compensated_sum` keeps what rounding drops: after 400 updates the weights are the float64 sum of the
    updates rounded (to about half their spacing), and with the residual it keeps, that sum to a twentieth
    of it (the residual's own rounding, a random walk of ~2^-10 spacings a step). The spacing is that of
    the larger of the first and the last weight: a residual kept in bfloat16 is as precise as the weight it
    was left by."""
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.normal(0, 0.02, 2048), jnp.bfloat16)
    steps = rng.normal(1e-6, 2e-6, (400, 2048))  # AdamW's steps at lr 1e-6: a drift under noise
    exact = np.asarray(w0, np.float64) + steps.sum(0)
    scale = np.maximum(np.abs(exact), np.abs(np.asarray(w0, np.float64)))
    spacing = 2.0 ** (np.floor(np.log2(scale)) - 7)  # bfloat16's: 8 significant bits

    def run(tx):
        def step(carry, u):
            w, state = carry
            updates, state = tx.update({"w": u}, state, w)
            return (optax.apply_updates(w, updates), state), None

        w = {"w": w0}
        (w, state), _ = jax.lax.scan(step, (w, tx.init(w)), jnp.asarray(steps, jnp.float32))
        return w["w"], state

    plain, _ = run(optax.identity())
    kahan, state = run(tr.compensated_sum())
    assert kahan.dtype == jnp.bfloat16 and state.residual["w"].dtype == jnp.bfloat16
    assert np.median(np.abs(np.asarray(plain, np.float64) - exact) / spacing) > 2  # most never moved
    assert np.all(np.abs(np.asarray(kahan, np.float64) - exact) <= 0.55 * spacing)
    held = np.asarray(kahan, np.float64) + np.asarray(state.residual["w"], np.float64)
    assert np.max(np.abs(held - exact) / spacing) < 0.05


def test_a_bf16_run_keeps_its_residuals_in_the_checkpoint(tmp_path, caplog):
    """A full fine-tune with model.param_dtype=bfloat16 trains through `compensated_sum` (its residuals are
    in the checkpoint and resumed); LoRA's float32 adapters and optim.bf16_compensation=false do not, and
    resuming a checkpoint across that setting is refused naming it. A checkpoint saved without residuals
    (an earlier version's) is read as saved, warned of (it was refused as another state, export too)."""
    extra = ("model.param_dtype=bfloat16", "data.ref_cache=", "data.eval_ref_cache=", "train.eval_every=0")
    cfg = _tiny_run(tmp_path, "bf16", *extra)
    assert tr.compensates(cfg) and not tr.compensates(_tiny_run(tmp_path, "x", *extra, "lora.rank=2"))
    assert tr.train(cfg, stop_after=2).interrupted
    assert tr.train(cfg).step == 4
    manager = ckpt.make_manager(tmp_path / "bf16" / "checkpoints", read_only=True)
    saved = manager.item_metadata(4)["state"]["opt_state"]
    residuals = [m for m in jax.tree.leaves(saved) if "residual" in str(getattr(m, "name", ""))]
    assert residuals and all(str(m.dtype) == "bfloat16" for m in residuals)
    off = ("train.steps=5", "optim.bf16_compensation=false")
    with pytest.raises(
        ValueError, match="settings of what the run learns .optim.bf16_compensation True -> F"
    ):
        tr.train(_tiny_run(tmp_path, "bf16", *extra, *off))
    allowed = "checkpoint.allow_changes=[optim.bf16_compensation,train.steps]"
    with pytest.raises(ckpt.StateMismatchError, match=r"optim.bf16_compensation included"):
        tr.train(_tiny_run(tmp_path, "bf16", *extra, *off, allowed))
    # a run saved without residuals (as an earlier version saved bf16 weights): read as it was saved
    tr.train(_tiny_run(tmp_path, "plain", *extra, "optim.bf16_compensation=false", "train.steps=1"))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with caplog.at_level("WARNING", logger="copg_jax.train"):
        _, params, step = tr.restore_params(cfg, tmp_path / "plain" / "checkpoints", mesh)
    assert step == 1 and "saved without optim.bf16_compensation's residuals" in caplog.text
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def _uneven(seed: int) -> ScoredBatch:
    """8 prompts: 0-3 with 3 completions and distinct rewards (3 pairs each), 4-7 with 2 completions of
    which 4 and 5 tie (0 pairs): pair metrics and per-completion metrics count differently per prompt."""
    batch = _batch(seed, num_prompts=8)
    mask = np.ones((8, 3), bool)
    mask[4:, 2] = False
    rewards = np.asarray(batch.rewards).copy()
    rewards[4:6, 1] = rewards[4:6, 0]
    lengths = np.where(mask, batch.completion_lengths, 0).astype(np.int32)
    return batch.replace(completion_mask=mask, rewards=rewards, completion_lengths=lengths)


def test_metrics_under_accumulation_and_eval_equal_the_full_batch():
    cfg = _cfg()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    full = _uneven(7)
    _, state = _setup(cfg, mesh)
    params = state.params
    graphdef, _ = tr.abstract_model(cfg)
    eval_fn = jax.jit(tr.make_eval_step(graphdef, cfg))
    want = jax.device_get(eval_fn(params, tr.stack_to_device([full], mesh)))
    halves = _split_prompts(full, 2)
    got_eval = tr.evaluate(eval_fn, params, iter(halves), mesh)
    step, state = _setup(_cfg("optim.grad_accum_steps=2"), mesh)
    _, got_step = step(state, tr.stack_to_device(halves, mesh), tr.NO_FROZEN)
    assert float(want["pairs/count"]) == 12 + 1 + 1 and float(want["completions/count"]) == 20
    for name, value in want.items():
        np.testing.assert_allclose(float(got_eval[f"eval/{name}"]), float(value), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(got_step[name]), float(value), rtol=1e-5, err_msg=name)
    # the two halves really disagree, so a weighting by the loss count alone would be visibly wrong
    parts = [jax.device_get(eval_fn(params, tr.stack_to_device([h], mesh))) for h in halves]
    naive = sum(p["rewards/margins"] * p["loss/count"] for p in parts) / sum(p["loss/count"] for p in parts)
    assert abs(naive - want["rewards/margins"]) > 0.05 * abs(want["rewards/margins"])


def test_nonfinite_update_is_not_applied_and_counted(reference_run):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, state = _setup(reference_run["cfg"], mesh)
    before = _params(state)
    host = reference_run["batches"][0]
    bad = host.replace(ref_logps=np.where(np.arange(3) == 1, np.nan, host.ref_logps).astype(np.float32))
    state, metrics = step(state, tr.stack_to_device([bad], mesh), tr.NO_FROZEN)
    assert float(metrics["nonfinite"]) == 1.0 and int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, _params(state), before)
    state, metrics = step(state, tr.stack_to_device([host], mesh), tr.NO_FROZEN)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.skipped) == 1
    assert float(metrics["skipped_updates"]) == 1.0


def test_a_skipped_update_advances_the_schedule_not_the_moments():
    """After a skipped update the next one applies the lr it logs, schedule(step): Adam's first update moves
    each weight by lr * g / (|g| + eps), so the largest move is the lr (with warmup from 0, the schedule left
    behind at count 0 would not move the weights at all)."""
    cfg = _cfg("optim.warmup_steps=4", "optim.lr=0.01", "optim.weight_decay=0.0", "optim.max_grad_norm=0")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, state = _setup(cfg, mesh)
    host = _batch(0, num_prompts=8)
    bad = host.replace(ref_logps=np.where(np.arange(3) == 1, np.nan, host.ref_logps).astype(np.float32))
    state, metrics = step(state, tr.stack_to_device([bad], mesh), tr.NO_FROZEN)
    assert float(metrics["nonfinite"]) == 1.0
    before = _params(state)
    state, metrics = step(state, tr.stack_to_device([host], mesh), tr.NO_FROZEN)
    lr = float(tr.make_schedule(cfg.optim, cfg.train.steps)(1))
    assert lr > 0 and float(metrics["lr"]) == pytest.approx(lr)
    moves = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), _params(state), before)
    assert max(jax.tree.leaves(moves)) == pytest.approx(lr, rel=1e-3)

    def counter(x):
        return "count" in getattr(x, "_fields", ())

    counted = jax.tree.leaves(state.opt_state, is_leaf=counter)
    counts = {type(s).__name__: int(s.count) for s in counted if counter(s)}
    assert counts == {"ScaleByAdamState": 1, "ScaleByScheduleState": 2}


@pytest.mark.parametrize(
    ("kind", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("NVIDIA H20", None),
        ("cpu", None),
    ],
)
def test_datasheet_peak_is_found_by_whole_words_of_the_device_kind(kind, peak):
    """MFU's datasheet peak: "l4" must not match an L40S (3x its peak), nor "h200" an H20."""
    assert table_peak_flops(kind) == peak


MOE = {**TINY, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16, "output_router_logits": True, "router_aux_loss_coef": 0.25}  # fmt: skip


def moe_cfg(*overrides) -> Config:
    base = {**to_dict(_cfg()), "model": {"config": MOE, "tokenizer": "x", "dtype": "float32"}}
    return from_dict(Config, apply_overrides(base, list(overrides)))


def test_a_mixture_of_experts_adds_its_load_balancing_loss_as_configured():
    """loss.router_aux_loss_coef (or, left null, config.json's router_aux_loss_coef with output_router_logits)
    times the router's load-balancing loss over the policy rows is added to the loss, logged as
    router/aux_loss, and trains the router; set to 0 in the run, nothing is added."""
    graphdef, params = nnx.split(from_config(ModelConfig.from_hf(MOE), rngs=nnx.Rngs(0)))
    batch = jax.tree.map(jnp.asarray, _batch(0))

    def loss_and_router_grad(cfg):
        fn = tr.make_loss_fn(graphdef, cfg)
        (value, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
        return float(value), metrics, grads["layers"][0]["mlp"]["router"]["kernel"][...]

    with_aux, metrics, router_grad = loss_and_router_grad(moe_cfg())  # config.json's 0.25
    without, plain, plain_grad = loss_and_router_grad(moe_cfg("loss.router_aux_loss_coef=0"))
    assert "router/aux_loss" not in plain
    aux = float(metrics["router/aux_loss"])  # equal to transformers' (test_moe.py)
    assert aux > 1.0  # E x sum f P: k = 2 when balanced, more when not
    np.testing.assert_allclose(with_aux, without + 0.25 * aux, rtol=1e-6)
    assert np.abs(np.asarray(router_grad - plain_grad)).max() > 1e-6


@pytest.mark.parametrize("grouped", ["auto", "megablox"])
def test_a_mixture_of_experts_trains_expert_parallel_as_on_one_device(grouped):
    """mesh.expert=2: each device holds 2 of the 4 experts (and their Adam moments), and two updates (the
    load-balancing loss included) give one device's losses and parameters. An expert axis that does not
    divide the experts is refused, naming both. model.grouped_matmul=megablox: the TPU's grouped matmul (its
    weight-gradient kernel in interpret mode), where the other device's assignments are rows past the
    groups."""
    cfg = moe_cfg("mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2", f"model.grouped_matmul={grouped}")
    abstract = nnx.merge(*tr.abstract_model(cfg))
    assert {m.grouped for _, m in nnx.iter_modules(abstract) if isinstance(m, MoE)} == {grouped}
    runs = []
    for mesh in (make_mesh(1, 1, 1, devices=jax.devices()[:1]), tr.run_mesh(cfg)):
        step, state = _setup(cfg, mesh)
        losses = []
        for seed in range(2):
            state, metrics = step(state, tr.stack_to_device([_batch(seed)], mesh), tr.NO_FROZEN)
            losses.append(float(metrics["loss"]))
        runs.append((losses, _params(state)))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    w_up = state.params["layers"][0]["mlp"]["w_up"]
    assert w_up.sharding.spec == jax.P("expert", "fsdp", "tensor")
    assert (
        optax.tree_utils.tree_get(state.opt_state, "mu")["layers"][0]["mlp"]["w_up"].sharding == w_up.sharding
    )
    (one, one_params), (ep, ep_params) = runs
    np.testing.assert_allclose(ep, one, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), ep_params, one_params)
    with pytest.raises(ValueError, match=r"mesh.expert=3 does not divide the 4 experts of the model"):
        tr.run_mesh(moe_cfg("mesh.expert=3"))


def test_a_logged_row_pools_the_updates_since_the_last_log():
    """With train.log_every > 1 the row holds every update of the interval, not the last one's alone: the
    loss's metrics of two batches pooled equal those of the two batches as one, counts are per update, a
    skipped (non-finite) update counts for nothing, grad_norm is the mean and lr the last update's."""
    rng = np.random.default_rng(0)

    def batch(b):
        k = 4
        mask = rng.random((b, k)) < 0.8
        mask[:, :2] = True
        return [rng.normal(size=(b, k)) * s for s in (3.0, 3.0, 1.0)] + [mask]

    a, b = batch(3), batch(5)
    both = [np.concatenate([x, y]) for x, y in zip(a, b, strict=True)]
    with jax.enable_x64(True):
        metrics = [jax.device_get(copg_loss(*map(jnp.asarray, x), 0.5)[1]) for x in (a, b, both)]

    def step(m, grad_norm, lr, nonfinite=0.0, skipped=0.0):
        return {**m, "grad_norm": grad_norm, "lr": lr, "tokens": 10.0, "nonfinite": nonfinite,
                "skipped_updates": skipped}  # fmt: skip

    bad = {k: np.nan for k in metrics[0]}
    steps = [
        step(metrics[0], 1.0, 0.1),
        step(bad, np.nan, 0.2, 1.0, 1.0),
        step(metrics[1], 3.0, 0.3, 0.0, 1.0),
    ]
    row = tr.pooled_metrics(steps)
    for key, value in metrics[2].items():
        want = value / 2 if key.endswith("/count") else value
        np.testing.assert_allclose(row[key], want, rtol=1e-12, err_msg=key)
    assert (row["grad_norm"], row["lr"], row["skipped_updates"]) == (2.0, 0.3, 1.0)
    alone = tr.pooled_metrics(
        [step(bad, np.nan, 0.2, 1.0, 1.0)]
    )  # nothing applied: the skipped update's values
    assert np.isnan(alone["loss"]) and alone["skipped_updates"] == 1.0


def _tiny_run(tmp_path, run: str, *overrides) -> Config:
    """configs/tiny_cpu.yaml (4 updates, no export) training into `tmp_path / run`."""
    from pathlib import Path

    from copg_jax.run_config import load_config

    repo = Path(__file__).resolve().parents[1]
    base = [
        f"data.path={repo / 'examples/tiny/train.jsonl'}",
        f"data.eval_path={repo / 'examples/tiny/eval.jsonl'}",
        f"model.tokenizer={repo / 'examples/tiny/tokenizer'}", f"data.cache_dir={tmp_path / 'datasets'}",
        f"train.output_dir={tmp_path / run}", "train.steps=4", "train.progress=false",
        "train.export_on_finish=false",
    ]  # fmt: skip
    return load_config(repo / "configs" / "tiny_cpu.yaml", base + list(overrides))


def test_a_stop_that_arrives_during_an_evaluation_saves_before_another_update(tmp_path, monkeypatch):
    """SIGTERM during the evaluation at step 2: the run checkpoints step 2 (logging its updates first) and
    returns; it trained and saved step 3 first, a rollout, a compile or an update that may outlast the grace
    period a preemption gives."""
    import signal

    from copg_jax.jsonl import read_jsonl

    cfg = _tiny_run(
        tmp_path,
        "run",
        "train.eval_every=2",
        "train.log_every=4",
        "checkpoint.every_steps=0",
        "checkpoint.keep_best=1",
    )
    evaluate = tr.run_eval

    def evaluated_then_stopped(run, state, step):
        metrics = evaluate(run, state, step)
        signal.raise_signal(signal.SIGTERM)  # to the run's own handler
        return metrics

    monkeypatch.setattr(tr, "run_eval", evaluated_then_stopped)
    result = tr.train(cfg)
    assert result.interrupted and result.step == 2
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [
        2
    ]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2]  # its two updates, logged with the checkpoint
    # the evaluation's metrics rank the checkpoint for keep_best
    saved = ckpt.make_manager(tmp_path / "run" / "checkpoints", keep_best=1, read_only=True).metrics(2)
    assert saved["eval/loss"] == next(r["eval/loss"] for r in rows if "eval/loss" in r)


def _rows(run_dir) -> list[dict]:
    """metrics.jsonl of `run_dir` without the timing (perf/*), which differs between any two runs."""
    from copg_jax.jsonl import read_jsonl

    return [
        {k: v for k, v in r.items() if not k.startswith("perf/")}
        for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


def test_a_run_stopped_off_the_log_grid_resumes_to_the_rows_of_a_straight_run(tmp_path):
    """log_every=2, stopped after update 3: the stop logs update 3 in a row marked "stopped", and the resumed
    run's row at 4 pooled update 4 alone where a straight run's pools updates 3 and 4. The checkpoint now
    keeps update 3's metrics: the resumed run drops the stop's row, its row at 4 is the straight run's, and
    so are the evaluation rows (at 3, the stop, and 4) and every row under gradient accumulation. A
    checkpoint of the version before (no kept updates, an unmarked row) still resumes."""
    import json
    import shutil

    from copg_jax.jsonl import read_jsonl

    extra = (
        "data.ref_cache=",
        "data.eval_ref_cache=",
        "train.log_every=2",
        "train.eval_every=3",
        "checkpoint.every_steps=0",
        "optim.grad_accum_steps=2",
    )
    tr.train(_tiny_run(tmp_path, "straight", *extra))
    assert tr.train(_tiny_run(tmp_path, "stopped", *extra), stop_after=3).interrupted
    stop_rows = [r for r in _rows(tmp_path / "stopped") if r["step"] == 3 and "loss" in r]
    assert len(stop_rows) == 1 and stop_rows[0]["stopped"] is True

    shutil.copytree(tmp_path / "stopped", tmp_path / "old")
    # stopped again before its first update (at stop_after already): the row it dropped is written again
    assert tr.train(_tiny_run(tmp_path, "stopped", *extra), stop_after=3).interrupted
    again = [r for r in _rows(tmp_path / "stopped") if r["step"] == 3 and "loss" in r]
    assert len(again) == 1 and again[0]["loss"] == stop_rows[0]["loss"] and again[0]["stopped"] is True

    assert tr.train(_tiny_run(tmp_path, "stopped", *extra)).step == 4
    straight = _rows(tmp_path / "straight")
    assert [r["step"] for r in straight] == [2, 3, 4, 4]  # loss, eval, loss, eval
    assert _rows(tmp_path / "stopped") == straight

    # the stopped run as the version before left it (no open interval, no checksum of its metadata)
    meta = tmp_path / "old" / "checkpoints" / "3" / "meta" / "metadata"
    older = {
        k: v for k, v in json.loads(meta.read_text()).items() if k not in (tr.OPEN_INTERVAL, "meta_checksum")
    }
    meta.write_text(json.dumps(older))
    metrics = tmp_path / "old" / "metrics.jsonl"
    rows = [{k: v for k, v in r.items() if k != "stopped"} for r in read_jsonl(metrics)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert tr.train(_tiny_run(tmp_path, "old", *extra)).step == 4
    assert [r["step"] for r in _rows(tmp_path / "old")] == [2, 3, 3, 4, 4]
