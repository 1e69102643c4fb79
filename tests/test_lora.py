"""LoRA: adapters on every family (fresh ones change nothing, adapters off is the base exactly, merging),
gradients against the chain rule through merged float64 kernels, the train step's state (adapters only, the
base frozen and not donated), the in-step reference against the cache, a (2, 2, 2) mesh with scanned layers
against one device, and PEFT's format both ways against peft itself on torch."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from copg_jax import checkpoint as ckpt
from copg_jax import cli
from copg_jax import train as tr
from copg_jax.batch import ScoredBatch, attention_context
from copg_jax.config import ConfigError, apply_overrides, from_dict
from copg_jax.data.layout import padded_layout
from copg_jax.data.refcache import ReferenceModel
from copg_jax.jsonl import read_jsonl
from copg_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained
from copg_jax.models.adapters import (
    adapter_sites,
    add_adapters,
    layout,
    load_peft_adapter,
    merge_adapters,
    peft_selects,
    peft_target_modules,
    read_peft_config,
    resolve_targets,
    save_peft_adapter,
    without_adapters,
)
from copg_jax.models.hf_io import read_safetensors
from copg_jax.models.layers import Dense
from copg_jax.models.lora import LoRASpec
from copg_jax.run_config import Config
from copg_jax.sharding import make_mesh

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
HF = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **SMALL),
    # Gemma 2 (Gemma 1's modules, plus soft caps and a window on one layer of two): sliding_window 4 < T = 7
    "gemma2": dict(model_type="gemma2", num_key_value_heads=1, head_dim=16, sliding_window=4, **SMALL),
    # Phi-3: fused qkv_proj under GQA (one adapter: q's 4 heads, k's 2, v's 2) and fused gate_up_proj
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0, eos_token_id=2, **SMALL),
    # GLM-4: q/k/v biases, interleaved half RoPE, fused gate_up_proj beside separate q/k/v
    "glm4": dict(
        model_type="glm4", num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=2, **SMALL
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32),
    "gpt_neox": dict(model_type="gpt_neox", rotary_pct=0.5, **SMALL),
}


def _tokens(n: int = 2, t: int = 7, seed: int = 0):
    """[n, t] token ids and the layout of n plain sequences (each its own segment)."""
    ids = np.random.default_rng(seed).integers(0, 64, (n, t)).astype(np.int32)
    positions = np.tile(np.arange(t, dtype=np.int32), (n, 1))
    return ids, positions, np.ones_like(ids), np.zeros_like(ids)


@jax.jit
def _forward(graphdef, state, key):
    return nnx.merge(graphdef, state)(*map(jnp.asarray, _tokens()), dropout_key=key)


def _hidden(model, key=None):
    """[2, 7, D] hidden states of `model` on `_tokens()` (jitted: eager dispatch is slow on CPU)."""
    return _forward(*nnx.split(model), key)


def _randomised(model, seed: int = 1, scale: float = 0.3):
    """`model` with every adapter parameter replaced by N(0, scale^2) values (B no longer 0)."""
    adapters = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def _base(model_type: str, scan: bool = False, **kw):
    return from_config(ModelConfig.from_hf(HF[model_type]), rngs=nnx.Rngs(0), scan_layers=scan, **kw)


def _spec(model_type: str, targets="all-linear", dropout=0.0) -> LoRASpec:
    return LoRASpec(4, 8.0, dropout, resolve_targets(model_type, targets))


# one family per kind of adapter site (the other families' sites are Llama's Dense layers): plain, GPT-2's
# fused Conv1D qkv, GPT-NeoX's per-head fused qkv, Phi-3's fused qkv under GQA and gate_up
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_fresh_adapters_change_nothing_and_adapters_off_is_the_base(model_type):
    """B = 0: a freshly adapted model computes the base (up to XLA compiling a different graph; dropout on
    too); once trained, adapters off is still the base exactly, and merging W + alpha/r A B computes the
    adapted model."""
    base = _base(model_type)
    want = _hidden(base)
    model = add_adapters(base, _spec(model_type, dropout=0.5), jax.random.key(3))
    np.testing.assert_allclose(_hidden(model), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_hidden(model, jax.random.key(0)), want, rtol=1e-6, atol=1e-6)
    model = _randomised(model)
    adapted = _hidden(model)
    assert float(jnp.max(jnp.abs(adapted - want))) > 0.1
    np.testing.assert_array_equal(_hidden(without_adapters(model)), want)
    np.testing.assert_allclose(_hidden(merge_adapters(model)), adapted, atol=2e-5)
    dropped = _hidden(model, jax.random.key(0))
    assert not np.allclose(dropped, adapted, atol=1e-3)  # dropout acts on the adapters' inputs
    np.testing.assert_array_equal(_hidden(model, jax.random.key(0)), dropped)  # and is a function of the key


def test_scanned_layers_on_a_mesh_hold_and_compute_the_unrolled_adapters():
    """The same key draws the same adapters unrolled or layer-stacked on a (2, 2, 2) mesh (A sharded like
    its kernel's input), and both compute the same, LoRA dropout included (layer i folds i into the key)."""
    key, spec = jax.random.key(3), _spec("gpt_neox", dropout=0.3)
    unrolled = add_adapters(_base("gpt_neox"), spec, key)
    mesh = make_mesh(2, 2, 2)
    scanned = add_adapters(_base("gpt_neox", scan=True, mesh=mesh), spec, key, mesh)
    a = nnx.state(scanned, nnx.LoRAParam)["layers"]["attn"]["qkv_lora"]["a"].get_value()
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "expert"), None)

    def stacked(model) -> dict:
        layers = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["layers"]
        return jax.tree.map(lambda *xs: jnp.stack(xs), layers[0], layers[1])

    held = nnx.to_pure_dict(nnx.state(scanned, nnx.LoRAParam))["layers"]
    jax.tree.map(np.testing.assert_array_equal, held, stacked(unrolled))
    unrolled = _randomised(unrolled)
    adapters = nnx.state(scanned, nnx.LoRAParam)
    nnx.replace_by_pure_dict(adapters, {"layers": stacked(unrolled)})
    nnx.update(scanned, adapters)
    with jax.set_mesh(mesh):
        got = _hidden(scanned, jax.random.key(5))
    np.testing.assert_allclose(got, _hidden(unrolled, jax.random.key(5)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_gradients_are_the_chain_rule_through_merged_float64_kernels(model_type):
    """d/dA = (alpha/r) G B^T and d/dB = (alpha/r) A^T G, G the gradient of the merged model's kernel, in
    float64 (fused qkv: G of q, k and v side by side; fused gate_up: of gate and up)."""
    with jax.enable_x64(True):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        model = _randomised(add_adapters(_base(model_type, **f64), _spec(model_type), jax.random.key(3)))
        ids, positions, segments, prefixes = _tokens()
        weights = jax.random.normal(jax.random.key(9), (2, 7, 64), jnp.float64)

        def objective(m):
            return jnp.sum(m.logits(m(ids, positions, segments, prefixes)) * weights)

        graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
        grads = jax.jit(jax.grad(lambda a, r: objective(nnx.merge(graphdef, a, r))))(adapters, rest)
        merged = merge_adapters(model)
        mgraph, kernels = nnx.split(merged, nnx.Param)
        kernel_grads = jax.jit(jax.grad(lambda k: objective(nnx.merge(mgraph, k))))(kernels)
        scale = 8.0 / 4
        for i in range(2):
            layer, g_layer = nnx.state(model, nnx.LoRAParam)["layers"][i], grads["layers"][i]
            fused = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
            sites = [s.split(".") for s in model.lora_spec.targets]
            assert any(name in fused for _, name in sites) == (model_type != "llama")
            for part, name in sites:
                adapter = layer[part][f"{name}_lora"] if name in fused else layer[part][name]["lora"]
                got = g_layer[part][f"{name}_lora"] if name in fused else g_layer[part][name]["lora"]
                a, b = np.asarray(adapter["a"].get_value(), np.float64), np.asarray(adapter["b"].get_value())
                kernel = kernel_grads["layers"][i][part]
                if name == "qkv":  # [D, H + 2 KV, Dh]
                    g = np.concatenate([kernel[n]["kernel"].get_value() for n in fused[name]], 1)
                elif name == "gate_up":  # [D, 2, F]
                    g = np.stack([kernel[n]["kernel"].get_value() for n in fused[name]], 1)
                else:
                    g = np.asarray(kernel[name]["kernel"].get_value())
                a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
                g2 = g.reshape(a2.shape[0], b2.shape[1])
                for name_, want in (("a", scale * g2 @ b2.T), ("b", scale * a2.T @ g2)):
                    value = got[name_].get_value().reshape(want.shape)
                    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_peft_module_names_resolve_to_sites_and_back():
    assert resolve_targets("llama", []) == ("attn.q", "attn.v")
    assert resolve_targets("gpt2", ["c_proj"]) == ("attn.o", "mlp.down")
    assert resolve_targets("gpt2", ["attn.c_proj"]) == ("attn.o",)
    assert resolve_targets("gpt_neox", ["dense"]) == ("attn.o",)
    assert peft_target_modules("gpt2", ("attn.o", "attn.qkv")) == ["attn.c_proj", "c_attn"]
    assert peft_target_modules("llama", resolve_targets("llama", "all-linear")) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"'c_attn' names no module of a llama model.*q_proj"):
        resolve_targets("llama", ["c_attn"])
    # PEFT's string form: a pattern over full module names (as TRL scripts and our multimodal export write it)
    assert resolve_targets("llama", r".*\.(q|v)_proj", num_layers=3) == ("attn.q", "attn.v")
    assert resolve_targets("gemma3_text", r".*language_model.*\.(q_proj|down_proj)") == ("attn.q", "mlp.down")
    assert resolve_targets("llama", "q_proj") == ("attn.q",)  # a plain name stays a name
    with pytest.raises(ValueError, match=r"selects different modules in different blocks"):
        resolve_targets("llama", r"model\.layers\.0\..*q_proj", num_layers=2)
    # a pattern that also selects modules PEFT would adapt and we do not is refused, not narrowed silently
    with pytest.raises(ValueError, match=r"also selects \['lm_head'\], which take no adapter here"):
        resolve_targets("llama", r".*\.q_proj|lm_head", num_layers=2)
    with pytest.raises(ValueError, match=r"also selects \['transformer.wpe', 'transformer.wte'\]"):
        resolve_targets("gpt2", r".*\.(c_attn|w.e)")


MOE = {
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, **SMALL),
    "qwen2_moe": dict(
        model_type="qwen2_moe", num_key_value_heads=2, num_experts=4, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, **SMALL,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_key_value_heads=2, num_experts=4, moe_intermediate_size=16, **SMALL
    ),
    "olmoe": dict(model_type="olmoe", num_key_value_heads=2, num_experts=4, **SMALL),
}  # fmt: skip
TRL_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"  # TRL's, Unsloth's list


@pytest.mark.parametrize("model_type", sorted(MOE))
@pytest.mark.parametrize(
    "targets", ["all-linear", TRL_TARGETS, r".*self_attn\..*_proj", ["q_proj", "v_proj"]]
)
def test_targets_on_a_mixture_are_those_peft_adapts_or_refused(model_type, targets):
    """On transformers 5 PEFT adapts the mixtures' fused experts and routers as parameters under
    "all-linear" and, but for Mixtral's, where a pattern names their projections; Qwen2-MoE's shared expert
    as modules. We adapt attention only: what PEFT adapts is resolved to exactly that, or refused (it was
    narrowed silently)."""
    config = transformers.AutoConfig.for_model(**MOE[model_type], num_experts_per_tok=2)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets))
    adapted = {
        name.split(".0.", 1)[1]
        for name, module in model.named_modules()
        if ".layers.0." in name and isinstance(module, peft.tuners.lora.LoraLayer)
    }
    lay = layout(model_type)
    if adapted <= set(lay.modules):
        assert resolve_targets(model_type, targets, num_layers=2) == tuple(
            sorted(lay.modules[m] for m in adapted)
        )
    else:
        with pytest.raises(ValueError, match=r"which take no adapter here"):
            resolve_targets(model_type, targets, num_layers=2)


def test_peft_selects_the_modules_peft_adapts():
    """Our reading of target_modules and exclude_modules against peft's own (check_target_module_exists)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    keys = [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj")
    ]
    settings = [
        (["q_proj"], None), (["self_attn.q_proj", "down_proj"], None),
        ("model.layers.0.self_attn.q_proj", None),
        (r".*\.(q|up)_proj", None), (["q_proj", "down_proj", "up_proj"], ["up_proj"]),
        (["q_proj", "down_proj"], r".*\.1\..*"), (["model.layers.0.self_attn.q_proj", "mlp.up_proj"], None),
        (["q_proj", "down_proj"], ["model.layers.1.mlp.down_proj"]),
    ]  # fmt: skip
    for targets, excluded in settings:
        config = peft.LoraConfig(target_modules=targets, exclude_modules=excluded)
        for key in keys:
            theirs = bool(check_target_module_exists(config, key))  # an _ExcludedModule is falsy
            assert peft_selects(key, targets, excluded or []) is theirs, (targets, excluded, key)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=-1", r"lora.rank: must be >= 0"),
        ("lora.alpha=0", r"lora.alpha: must be > 0"),
        ("lora.dropout=1.0", r"lora.dropout: must be in \[0, 1\)"),
        ("lora.adapter_path=x", r"lora.adapter_path: set lora.rank"),
        ("lora.reference=policy", r"lora.reference: 'policy' is not one of"),
        ("lora.rnak=4", r"unknown config key 'lora.rnak' \(did you mean 'rank'\?\)"),
    ],
)
def test_bad_lora_config_keys_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        _cfg(override)


def test_lora_is_refused_for_reward_models():
    with pytest.raises(ConfigError, match="lora.rank: LoRA trains policies"):
        _cfg("lora.rank=4", "train.objective=reward_model")


# ------------------------------------------------------------------------------------------ the step

TINY = dict(model_type="llama", num_key_value_heads=2, max_position_embeddings=64, **SMALL)


def _cfg(*overrides) -> Config:
    base = {
        "model": {"config": TINY, "tokenizer": "unused", "dtype": "float32"},
        "optim": {"lr": 0.02, "schedule": "constant", "grad_accum_steps": 2},
        "train": {"steps": 10, "seed": 4},
        "loss": {"beta": 0.5},
    }
    return from_dict(Config, apply_overrides(base, list(overrides)))


LORA = ("lora.rank=4", "lora.alpha=8", "lora.target_modules=all-linear")


def _batch(seed: int, num_prompts: int = 8, k: int = 3, length: int = 16) -> ScoredBatch:
    """A host ScoredBatch whose ref_logps are NaN (no cache: the step must compute them)."""
    rng = np.random.default_rng(seed)
    examples = [
        (rng.integers(1, 64, rng.integers(2, 5)).astype(np.int32),
         [rng.integers(1, 64, rng.integers(1, 6)).astype(np.int32) for _ in range(k)])
        for _ in range(num_prompts)
    ]  # fmt: skip
    lengths = np.asarray([[len(c) for c in ex[1]] for ex in examples], np.int32)
    return ScoredBatch(
        tokens=padded_layout(examples, k, length),
        rewards=rng.normal(size=(num_prompts, k)).astype(np.float32),
        completion_mask=np.ones((num_prompts, k), bool),
        ref_logps=np.full((num_prompts, k), np.nan, np.float32),
        completion_lengths=lengths,
    )


def _run(cfg: Config, mesh, batches) -> dict:
    """Steps over `batches` (each split in two microbatches) from the run's initial params."""
    tx = tr.make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, abstract = tr.abstract_model(cfg)
    trained_abstract, frozen_abstract = tr.split_trainable(abstract)
    shardings = tr.state_shardings(trained_abstract, tx, mesh)
    trained, frozen = tr.split_trainable(tr.init_params(cfg, mesh))
    state = tr.init_state(trained, tx, shardings)
    step = tr.jit_train_step(graphdef, tx, cfg, shardings, mesh, frozen_abstract)
    losses = []
    for b in batches:
        state, metrics = step(state, tr.stack_to_device([_half(b, 0), _half(b, 1)], mesh), frozen)
        losses.append(float(metrics["loss"]))
    return {"state": state, "frozen": frozen, "losses": losses, "graphdef": graphdef, "metrics": metrics}


def _half(batch: ScoredBatch, i: int) -> ScoredBatch:
    """Microbatch i of two: half of the batch's prompts and their rows, slots renumbered."""
    p, k = batch.rewards.shape
    rows, prompts = slice(i * p * k // 2, (i + 1) * p * k // 2), slice(i * p // 2, (i + 1) * p // 2)
    tokens = jax.tree.map(lambda x: np.array(x[rows]), batch.tokens)
    shift = rows.start
    tokens = tokens.replace(target_slots=np.where(tokens.target_slots >= 0, tokens.target_slots - shift, -1))
    fields = ("rewards", "completion_mask", "ref_logps", "completion_lengths")
    return ScoredBatch(tokens=tokens, **{f: getattr(batch, f)[prompts] for f in fields})


@pytest.fixture(scope="module")
def one_device():
    """Three LoRA updates with dropout on one device, the reference computed in the step."""
    cfg = _cfg(*LORA, "lora.dropout=0.2")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial = tr.split_trainable(tr.init_params(cfg, mesh))[1]
    batches = [_batch(s) for s in range(3)]
    return {"cfg": cfg, "batches": batches, "initial_frozen": initial, **_run(cfg, mesh, batches)}


def test_only_adapters_are_trained_and_the_base_is_neither_updated_nor_donated(one_device):
    state, frozen = one_device["state"], one_device["frozen"]
    adapters = nnx.to_flat_state(state.params)
    assert adapters and all(isinstance(v, nnx.LoRAParam) for _, v in adapters)
    shapes = sorted(v.shape for _, v in adapters)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # Adam's mu and nu
    assert sorted(x.shape for x in moments) == sorted(shapes + shapes)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
    jax.tree.map(  # still alive after three donating steps, and unchanged
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), frozen,
        one_device["initial_frozen"],
    )  # fmt: skip
    b = [v.get_value() for p, v in adapters if p[-1] == "b"]
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in b)  # every adapter moved off B = 0
    assert one_device["losses"][-1] < one_device["losses"][0]


def test_reference_in_the_step_is_the_base_and_equals_the_cache(one_device):
    """lora.reference=cache with the base's log-probs in the batch takes the same updates as the in-step
    reference (whose batch holds NaN): the in-step reference is the frozen base, adapters off."""
    cfg = _cfg(*LORA, "lora.dropout=0.2", "lora.reference=cache")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, _ = tr.abstract_model(cfg)
    base = tr.reference_of(graphdef, tr.init_params(cfg, mesh))
    assert base.lora_spec is None
    cached = [ReferenceModel(base).fill(b) for b in one_device["batches"]]
    got = _run(cfg, mesh, cached)
    np.testing.assert_allclose(got["losses"], one_device["losses"], rtol=1e-6)
    # the cache's log-probs come from another jit, equal to float32 rounding; Adam's m / sqrt(v) carries that
    # rounding into the updates at ~1e-7 of the parameters, hence atol 1e-6
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.to_pure_dict(got["state"].params), nnx.to_pure_dict(one_device["state"].params),
    )  # fmt: skip
    assert float(one_device["metrics"]["kl/seq"]) != 0  # the policy has moved away from the reference
    # perf/mfu's model FLOPs: the frozen base's weights get no gradient; the in-step reference is a forward
    tokens = one_device["batches"][-1].tokens
    context, mcfg = attention_context(tokens.segment_ids, tokens.prefix_ids), tr.model_config(cfg)
    for run, in_step in ((one_device, True), (got, False)):
        want = mcfg.step_flops(context, weights_trained=False, reference_forward=in_step)
        np.testing.assert_allclose(float(run["metrics"]["flops"]), float(want), rtol=1e-6)
    assert float(got["metrics"]["flops"]) < float(mcfg.step_flops(context))


def test_mesh_with_scanned_layers_equals_one_device(one_device):
    """(2, 2, 2) mesh, scan_layers, dropout and two microbatches: the one-device updates."""
    cfg = _cfg(*LORA, "lora.dropout=0.2", "model.scan_layers=true")
    got = _run(cfg, make_mesh(2, 2, 2), one_device["batches"])
    np.testing.assert_allclose(got["losses"], one_device["losses"], rtol=1e-5)
    stacked = nnx.to_pure_dict(got["state"].params)["layers"]
    for i in range(2):
        want = nnx.to_pure_dict(one_device["state"].params)["layers"][i]
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6), stacked, want
        )


# --------------------------------------------------------------------------------------- PEFT's format


def _hf(model_type: str, folder) -> transformers.PreTrainedModel:
    """A torch model of `model_type` with O(1) logits (initializer_range 0.2), saved to `folder`."""
    config = transformers.AutoConfig.for_model(**HF[model_type], initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    return model


def _peft_adapter(hf, config, folder):
    """peft's model of `hf` with `config`'s adapters, their B drawn N(0, 0.2^2) (not 0), saved to `folder`."""
    model = peft.get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@jax.jit
def _logits(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    _, positions, segments, prefixes = map(jnp.asarray, _tokens(*ids.shape))
    return model.logits(model(ids, positions, segments, prefixes))


def _our_logits(model, ids) -> np.ndarray:
    """[n, t, V] logits of `model` on token ids [n, t] (jitted: eager dispatch compiles every op on CPU)."""
    return np.asarray(_logits(*nnx.split(model), jnp.asarray(ids)))


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "phi3", "glm4"])
def test_our_adapter_and_merged_export_load_in_peft_and_transformers(model_type, tmp_path):
    hf = _hf(model_type, tmp_path / "base")
    base = from_pretrained(tmp_path / "base", dtype=jnp.float32)
    model = _randomised(add_adapters(base, _spec(model_type, dropout=0.1), jax.random.key(3)), scale=0.2)
    save_peft_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    save_pretrained(merge_adapters(model), tmp_path / "merged")
    ids = _tokens()[0]
    ours = _our_logits(model, ids)
    theirs = _torch_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval(), ids)
    assert np.max(np.abs(ours - _our_logits(base, ids))) > 0.1
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    )
    np.testing.assert_allclose(ours, _torch_logits(merged.eval(), ids), atol=2e-5)


def test_a_velora_adapter_made_by_peft_loads_as_the_lora_it_computes(tmp_path):
    """VeLoRA changes only the backward pass; peft saves its buffer (`lora_velora_embed`) beside A and B,
    which was refused as "not LoRA weights"."""
    hf = _hf("llama", tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], velora_config={"num_groups": 4})
    model = _peft_adapter(hf, config, tmp_path / "adapter")
    ids = _tokens()[0]
    ours = load_peft_adapter(from_pretrained(tmp_path / "base", dtype=jnp.float32), tmp_path / "adapter")
    np.testing.assert_allclose(_our_logits(ours, ids), _torch_logits(model.eval(), ids), atol=2e-5)


@pytest.mark.parametrize(
    "model_type, targets, rslora",
    [
        ("llama", ["q_proj", "v_proj", "down_proj"], True),
        ("gpt2", None, False),
        ("phi3", ["qkv_proj", "gate_up_proj"], False),
    ],
)
def test_an_adapter_made_by_peft_loads_with_parity(model_type, targets, rslora, tmp_path):
    """peft's own adapter (GPT-2: its default, the fused c_attn; Llama: rank-stabilised, alpha / sqrt(r);
    Phi-3: its fused qkv_proj under GQA and gate_up_proj) on a torch model, read onto our base."""
    hf = _hf(model_type, tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.1, task_type="CAUSAL_LM", use_rslora=rslora
    )
    model = _peft_adapter(hf, config, tmp_path / "adapter")
    ids = _tokens()[0]
    theirs = _torch_logits(model.eval(), ids)
    for scan in (False, True):
        base = from_pretrained(tmp_path / "base", dtype=jnp.float32, scan_layers=scan)
        ours = load_peft_adapter(base, tmp_path / "adapter", dropout=0.1)
        want = LoRASpec(4, 16.0, 0.1, resolve_targets(model_type, targets or []), rslora)
        assert ours.lora_spec == want and want.scale == (8.0 if rslora else 4.0)
        np.testing.assert_allclose(_our_logits(ours, ids), theirs, atol=2e-5)
    save_peft_adapter(ours, tmp_path / "again")
    again = load_peft_adapter(from_pretrained(tmp_path / "base", dtype=jnp.float32), tmp_path / "again")
    np.testing.assert_allclose(_our_logits(again, ids), theirs, atol=2e-5)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_rslora"] is rslora


@pytest.mark.parametrize(
    "model_type, targets, graded",
    [
        ("llama", ["q_proj", "v_proj", "down_proj"], ("self_attn.q_proj", ("attn", "q", "lora"))),
        ("phi3", ["qkv_proj", "gate_up_proj"], ("self_attn.qkv_proj", ("attn", "qkv_lora"))),
        ("gpt_neox", ["query_key_value"], None),
        ("gpt2", ["c_attn"], None),
    ],
)
def test_dora_both_ways_with_peft_outputs_gradients_and_merge(model_type, targets, graded, tmp_path):
    """DoRA (use_dora): peft's adapter, its magnitudes moved off ||W||, reads onto our base unrolled and
    scanned with peft's logits, merges (unrolled and stacked) into the same function, and has peft's
    gradients (the norm held constant: a gradient through it would differ); ours exports back to peft; fresh
    DoRA adapters are the base. Also on fused modules (Phi-3's qkv_proj under GQA and gate_up_proj,
    GPT-NeoX's per-head query_key_value, GPT-2's Conv1D c_attn): one magnitude per fused output feature,
    normed over the fused kernel, which we hold as separate kernels."""
    hf = _hf(model_type, tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=model_type == "gpt2"
    )
    model = _peft_adapter(hf, config, tmp_path / "unsaved")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    model.save_pretrained(tmp_path / "theirs")
    ids = _tokens()[0]
    weights = np.random.default_rng(0).normal(size=(*ids.shape, 64)).astype(np.float32)
    model.eval().zero_grad()
    logits = model(torch.as_tensor(ids, dtype=torch.long)).logits
    (logits * torch.as_tensor(weights)).sum().backward()
    theirs = logits.detach().numpy()

    for scan in (False, True):
        base = from_pretrained(tmp_path / "base", dtype=jnp.float32, scan_layers=scan)
        ours = load_peft_adapter(base, tmp_path / "theirs")
        assert ours.lora_spec.dora and ours.lora_spec.targets == resolve_targets(model_type, targets)
        np.testing.assert_allclose(_our_logits(ours, ids), theirs, atol=2e-5)
        np.testing.assert_allclose(_our_logits(merge_adapters(ours), ids), theirs, atol=2e-5)
        fresh = add_adapters(base, ours.lora_spec, jax.random.key(0))  # m = ||W|| per layer, stacked too
        np.testing.assert_allclose(_our_logits(fresh, ids), _our_logits(base, ids), atol=1e-5)
    ours = load_peft_adapter(from_pretrained(tmp_path / "base", dtype=jnp.float32), tmp_path / "theirs")
    if graded is not None:  # A, B and m of one module's adapter in layer 0
        module, path = graded

        def loss(m):
            _, positions, segments, prefixes = _tokens()
            return jnp.sum(m.logits(m(jnp.asarray(ids), positions, segments, prefixes)) * weights)

        lora = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(ours)["layers"][0]
        for part in path:
            lora = lora[part]
        got = {
            "lora_A": lora["a"][...].T,
            "lora_B": lora["b"][...].reshape(4, -1).T,
            "magnitude": lora["m"][...],
        }
        for name, p in model.named_parameters():
            if f"layers.0.{module}.lora" in name:
                key = next(k for k in got if k in name.replace("lora_magnitude_vector", "magnitude"))
                want = p.grad.numpy()
                np.testing.assert_allclose(
                    got[key].reshape(want.shape), want, rtol=2e-4, atol=2e-5, err_msg=name
                )
    save_peft_adapter(ours, tmp_path / "ours")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch_logits(loaded, ids), theirs, atol=2e-5)


def test_dora_with_dropout_follows_peft_formula():
    """Training (dropout on): y = x W + b + (m / n - 1) dropout(x) W + (m / n) s dropout(x) A B with
    n = ||W + s A B|| per output feature (PEFT's DoRA forward when its dropout is active), float64 numpy."""
    spec = LoRASpec(2, 4.0, 0.5, ("mlp.up",), dora=True)
    dense = Dense((6,), (5,), ("embed", "mlp"), bias=True, rngs=nnx.Rngs(0), dtype=jnp.float32,
                  param_dtype=jnp.float32, lora=spec)  # fmt: skip
    rng = np.random.default_rng(0)
    dense.bias = dense.bias.replace(jnp.asarray(rng.normal(size=5), jnp.float32))
    dense.lora.b = dense.lora.b.replace(jnp.asarray(rng.normal(size=(2, 5)), jnp.float32))
    dense.lora.m = dense.lora.m.replace(jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.float32))
    x, key = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32), jax.random.key(7)
    dropped = np.asarray(dense.lora.dropped(x, key), np.float64)
    assert 0 < np.mean(dropped == 0) < 1  # dropout acted
    lora = dense.lora
    w, b, a, lb, m = (
        np.asarray(v[...], np.float64) for v in (dense.kernel, dense.bias, lora.a, lora.b, lora.m)
    )
    s = spec.scale
    scale = m / np.linalg.norm(w + s * a @ lb, axis=0)
    want = np.asarray(x, np.float64) @ w + b + (scale - 1) * (dropped @ w) + scale * s * (dropped @ a @ lb)
    np.testing.assert_allclose(dense(x, key), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(  # no key (evaluation): the plain DoRA function
        dense(x), scale * (np.asarray(x, np.float64) @ (w + s * a @ lb)) + b, rtol=1e-5, atol=1e-5
    )


def test_a_run_from_an_adapter_takes_its_scaling_and_its_tensors_modules(tmp_path):
    """lora.adapter_path: use_rslora must match lora.rslora (named when not); the modules are those its
    tensors adapt, whatever its target_modules says (a pattern, as ours for a multimodal base)."""
    base = _base("llama")
    spec = LoRASpec(4, 8.0, 0.0, resolve_targets("llama", ["q_proj", "down_proj"]), rslora=True)
    save_peft_adapter(add_adapters(base, spec, jax.random.key(0)), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": r".*\.(q|down)_proj"})
    )
    run = ("lora.rank=4", "lora.alpha=8", f"lora.adapter_path={tmp_path}")
    pattern = r"lora.target_modules=.*\.(down|q)_proj"  # PEFT's string form, naming the same modules
    assert tr.lora_spec(_cfg(*run, "lora.rslora=true", pattern), "llama", 2) == spec
    assert tr.lora_spec(_cfg(*run, "lora.rslora=true"), "llama") == spec
    with pytest.raises(
        ValueError, match="lora.rslora=False but adapter .* has use_rslora=True: set lora.rslora"
    ):
        tr.lora_spec(_cfg(*run), "llama")
    with pytest.raises(ValueError, match=r"adapts \['down_proj', 'q_proj'\]: set lora.target_modules=\[\]"):
        tr.lora_spec(_cfg(*run, "lora.rslora=true", "lora.target_modules=[q_proj]"), "llama")


def test_adapters_of_a_multimodal_gemma3_language_model_both_ways(tmp_path):
    """Gemma 3 from 4B is Gemma3ForConditionalGeneration: peft's adapter on its language model loads onto the
    text model we read from that folder, and ours, exported for that base, loads in peft onto the multimodal
    model (its tensors named for the language model's layers, target_modules sparing the vision tower)."""
    text = dict(HF["gemma2"], model_type="gemma3_text", sliding_window=4, initializer_range=0.2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=dict(vision, image_size=28, patch_size=14)
    )
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "base")
    targets = r".*language_model.*\.(q_proj|down_proj)"
    model = _peft_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), tmp_path / "theirs")
    ids = _tokens()[0]
    theirs = _torch_logits(model.eval(), ids)
    with pytest.warns(UserWarning, match="multimodal checkpoint"):
        base = from_pretrained(tmp_path / "base", dtype=jnp.float32)
    ours = load_peft_adapter(base, tmp_path / "theirs")
    assert ours.lora_spec.targets == ("attn.q", "mlp.down")
    np.testing.assert_allclose(_our_logits(ours, ids), theirs, atol=2e-5)
    tensors = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")  # transformers 4's names
    v4 = {
        k.replace("model.model.language_model.", "model.language_model.model."): v
        for k, (v, _) in tensors.items()
    }
    shutil.copytree(tmp_path / "theirs", tmp_path / "v4")
    save_file(v4, tmp_path / "v4" / "adapter_model.safetensors")
    np.testing.assert_allclose(_our_logits(load_peft_adapter(base, tmp_path / "v4"), ids), theirs, atol=2e-5)

    ours = _randomised(ours, seed=2, scale=0.2)
    save_peft_adapter(ours, tmp_path / "ours", str(tmp_path / "base"))
    fresh = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    adapted = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n]
    assert adapted and all("language_model" in n for n in adapted)  # the vision tower is left alone
    assert adapter_sites(tmp_path / "ours", "gemma3_text") == ("attn.q", "mlp.down")  # not from the pattern
    np.testing.assert_allclose(_our_logits(ours, ids), _torch_logits(loaded, ids), atol=2e-5)
    again = load_peft_adapter(base, tmp_path / "ours")  # our own export reads back
    np.testing.assert_allclose(_our_logits(again, ids), _torch_logits(loaded, ids), atol=2e-5)


def test_unsupported_peft_settings_are_named(tmp_path):
    _hf("llama", tmp_path / "base")
    base = from_pretrained(tmp_path / "base", dtype=jnp.float32)
    save_peft_adapter(add_adapters(base, _spec("llama"), jax.random.key(0)), tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    config = file.read_text()
    file.write_text(config.replace('"use_dora": false', '"use_dora": true'))  # but no magnitudes saved
    with pytest.raises(ValueError, match=r"sets use_dora but the weights hold no DoRA magnitudes, e\.g\. "):
        load_peft_adapter(base, tmp_path / "a")
    file.write_text(config.replace('"use_rslora": false', '"use_rslora": false, "use_qalora": true'))
    with pytest.raises(ValueError, match=r"not supported \(only plain LoRA is\): use_qalora=True$"):
        load_peft_adapter(base, tmp_path / "a")
    both = json.loads(config) | {
        "alpha_pattern": {"q_proj": 4},
        "target_parameters": ["mlp.experts.down_proj"],
    }
    file.write_text(json.dumps(both))  # peft's all-linear on a mixture sets both: each is named
    with pytest.raises(ValueError, match=r"alpha_pattern=\{'q_proj': 4\}, target_parameters=\['mlp"):
        load_peft_adapter(base, tmp_path / "a")
    # a config that selects fewer modules than its tensors adapt: PEFT would drop the others silently
    narrow = json.loads(config) | {"target_modules": ["q_proj"]}
    file.write_text(json.dumps(narrow))
    with pytest.raises(
        ValueError, match=r"holds adapters of \[.*'v_proj'.*\], which its target_modules \['q_proj'\]"
    ):
        load_peft_adapter(base, tmp_path / "a")
    # the same in the full names peft writes for all-linear, and modules excluded (in one block too)
    full = [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkvo"]
    for narrower in (
        {"target_modules": full},
        {"exclude_modules": ["down_proj"]},
        {"exclude_modules": ["model.layers.1.mlp.up_proj"]},
    ):
        file.write_text(json.dumps(json.loads(config) | narrower))
        with pytest.raises(ValueError, match=r"holds adapters of \[.*_proj'\], which its .* do not select"):
            load_peft_adapter(base, tmp_path / "a")
    file.write_text(json.dumps(json.loads(config) | {"exclude_modules": ["lm_head"]}))  # excludes none
    assert load_peft_adapter(base, tmp_path / "a").lora_spec.targets == _spec("llama").targets
    for bad in ({"r": None}, {"r": 0}, {"lora_alpha": "16"}):
        file.write_text(json.dumps(json.loads(config) | bad))
        with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: (r|lora_alpha)="):
            load_peft_adapter(base, tmp_path / "a")
    file.write_text(json.dumps({k: v for k, v in json.loads(config).items() if k != "lora_alpha"}))
    assert load_peft_adapter(base, tmp_path / "a").lora_spec.alpha == 8.0  # PEFT's default


def test_adapters_made_elsewhere_that_copg_cannot_load_say_why(tmp_path):
    """Adapters PEFT makes that copg refuses, each refused for its own reason: some blocks only (block 1's
    were "no LoRA weights", block 0's "config and weights disagree"), embeddings resized for added tokens
    (PEFT saves them whole), only named adapters in subfolders, and a model without its LM head."""
    hf = _hf("llama", tmp_path / "base")
    base = from_pretrained(tmp_path / "base", dtype=jnp.float32)
    for block in (0, 1):
        pattern = rf".*layers\.{block}\.self_attn\.(q|v)_proj"
        _peft_adapter(hf, peft.LoraConfig(r=2, target_modules=pattern), tmp_path / f"block{block}")
        hf = _hf("llama", tmp_path / "base")  # peft wrapped the modules of the one before
        with pytest.raises(
            ValueError, match=rf"select self_attn.q_proj in blocks \[{block}\] only: copg needs"
        ):
            load_peft_adapter(base, tmp_path / f"block{block}")
    hf.resize_token_embeddings(HF["llama"]["vocab_size"] + 6)
    resized = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    resized.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")  # PEFT compares its vocab
    resized.save_pretrained(tmp_path / "resized")
    with pytest.raises(ValueError, match=r"holds whole tensors .*embed_tokens.* save_embedding_layers"):
        load_peft_adapter(base, tmp_path / "resized")
    hf = _hf("llama", tmp_path / "base")
    peft.get_peft_model(hf, peft.LoraConfig(r=2), adapter_name="sft").save_pretrained(tmp_path / "named")
    with pytest.raises(
        FileNotFoundError, match=r"not a PEFT adapter folder \(it holds named adapters: sft/;"
    ):
        load_peft_adapter(base, tmp_path / "named")
    peft.get_peft_model(hf.model, peft.LoraConfig(r=2)).save_pretrained(tmp_path / "headless")
    with pytest.raises(ValueError, match=r"named for a llama model without its LM head"):
        load_peft_adapter(base, tmp_path / "headless")


def test_an_adapters_recorded_base_is_compared_by_path_hub_id_and_cache():
    for recorded, path in (
        ("meta-llama/Llama-3.1-8B", "/models/llama-3.1-8b/"),
        ("meta-llama/Llama-3.1-8B", "/hf/hub/models--meta-llama--Llama-3.1-8B/snapshots/0a1b"),
        ("/data/base", "/data/base/"),
    ):
        assert tr._same_model(recorded, path), (recorded, path)
    assert not tr._same_model("meta-llama/Llama-3.1-8B", "/models/Llama-3.1-8B-Instruct")
    instruct = "/hf/hub/models--meta-llama--Llama-3.1-8B-Instruct/snapshots/0a1b"
    assert not tr._same_model("meta-llama/Llama-3.1-8B", instruct)
    assert not tr._same_model("/ckpts/run1/final", "/models/other/final")  # a path, not a hub id
    assert not tr._same_model("/tmp", "/")  # two folders here, not the same


@pytest.mark.parametrize(
    "key, value, plain",
    [
        ("init_lora_weights", "gaussian", True),  # initialisations that leave the base alone
        ("init_lora_weights", "orthogonal", True),
        ("init_lora_weights", "mica", False),  # trains A alone, B frozen
        ("velora_config", {"num_groups": 64}, True),  # a backward-pass variant: the same function
        ("alora_invocation_tokens", [60, 61], False),  # adapts only from the invocation tokens on
        ("init_lora_weights", "pissa_niter_4", False),  # relative to a rewritten base
        ("init_lora_weights", "olora", False),
        ("use_qalora", True, False),
        ("use_bdlora", {"nblocks": 2}, False),
        ("a_future_variant", {"on": True}, False),  # a key we do not know, set
        ("layers_to_transform", 0, False),  # block 0 only: 0 is not false
        ("layers_to_transform", None, True),
        ("init_lora_weights", 1, False),  # not True
    ],
)
def test_peft_settings_are_allowed_only_where_the_adapter_is_plain_lora(key, value, plain, tmp_path):
    """Every key of peft's own adapter_config.json is checked against what plain LoRA means."""
    peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), key: value}))
    if plain:
        assert read_peft_config(tmp_path)[key] == value
    else:
        with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: not supported .*: {key}="):
            read_peft_config(tmp_path)


# ------------------------------------------------------------------------------------------ a training run

REPO = Path(__file__).resolve().parents[1]
TINY_HF = dict(model_type="llama", vocab_size=207, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=2, eos_token_id=3, pad_token_id=0,
               **{k: v for k, v in SMALL.items() if k != "vocab_size"})  # fmt: skip


def _tiny_base(folder: Path, seed: int) -> None:
    """An HF Llama folder on the shipped tiny tokenizer's vocabulary, O(1) logits."""
    config = transformers.AutoConfig.for_model(**TINY_HF, initializer_range=0.2)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """LoRA runs of `train.train` from an HF base without any reference cache: 6 steps straight, and the
    same run interrupted after 3 and resumed."""
    root = tmp_path_factory.mktemp("lora_run")
    _tiny_base(root / "base", 0)
    _tiny_base(root / "other_base", 1)
    base = {
        "model": {"path": str(root / "base"), "tokenizer": str(REPO / "examples/tiny/tokenizer"),
                  "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
        "data": {"path": str(REPO / "examples/tiny/train.jsonl"),
                 "eval_path": str(REPO / "examples/tiny/eval.jsonl"),
                 "ref_cache": str(root / "no_cache/train.parquet"),
                 "eval_ref_cache": str(root / "no_cache/eval.parquet"),
                 "max_prompt_length": 8, "max_completion_length": 8, "batch_size": 8, "pad_multiple": 16},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "train": {"steps": 6, "log_every": 1, "eval_every": 3, "export_on_finish": True, "progress": False},
        "checkpoint": {"every_steps": 3, "keep_last": 2, "async_save": False},
    }  # fmt: skip

    def cfg(name: str, *overrides) -> Config:
        return from_dict(Config, apply_overrides(base, [f"train.output_dir={root / name}", *overrides]))

    assert tr.train(cfg("straight")).step == 6
    assert tr.train(cfg("resumed"), stop_after=3).interrupted
    again = tr.train(cfg("resumed"), stop_after=2)  # resumed past it: nothing trained (it trained 1 update)
    assert again.interrupted and again.step == 3
    final = tr.train(cfg("resumed"), stop_after=6)  # a stop at the last update: done, so exported
    assert final.step == 6 and not final.interrupted
    assert (root / "resumed" / "export" / "model.safetensors").is_file()
    return {"root": root, "cfg": cfg}


def _saved(cfg: Config, step: int) -> tuple[dict, dict]:
    """(state as numpy, metadata) of checkpoint `step` of a LoRA run."""
    tx = tr.make_optimizer(cfg.optim, cfg.train.steps)
    trained = tr.split_trainable(tr.abstract_model(cfg)[1])[0]
    shardings = tr.state_shardings(trained, tx, make_mesh(-1))
    manager = ckpt.make_manager(cfg.checkpoint_dir, read_only=True, async_save=False)
    try:
        restored = ckpt.restore_latest(manager, tr.abstract_state(trained, tx, shardings), step)
    finally:
        manager.close()
    return jax.tree.map(np.asarray, restored.state), restored.meta


def test_lora_run_resumes_as_if_uninterrupted_without_any_reference_cache(runs):
    root, cfg = runs["root"], runs["cfg"]
    straight, _ = _saved(cfg("straight"), 6)
    resumed, _ = _saved(cfg("resumed"), 6)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)  # adapters, Adam's moments, counters
    assert not (root / "no_cache").exists()  # the reference was the base in the step: no cache written
    rows = read_jsonl(root / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]
    assert all(r["kl/seq"] != 0 for r in rows if "loss" in r and r["step"] > 1)  # adapters moved off B = 0


def test_lora_checkpoints_hold_the_adapters_alone(runs):
    """The arrays on disk: A [in..., r] and B [r, out...] of the 7 sites of both layers, nothing else."""
    cfg = runs["cfg"]("straight")
    on_disk = ocp.StandardCheckpointer().metadata(Path(cfg.checkpoint_dir) / "6" / "state").item_metadata
    got = {
        tuple(str(getattr(k, "key", k)) for k in path): meta.shape
        for path, meta in jax.tree_util.tree_flatten_with_path(on_disk["params"])[0]
    }
    r, d, f, h, kv, dh = 4, 32, 64, 4, 2, 8
    sites = {("attn", "q"): ((d,), (h, dh)), ("attn", "k"): ((d,), (kv, dh)), ("attn", "v"): ((d,), (kv, dh)),
             ("attn", "o"): ((h, dh), (d,)), ("mlp", "gate"): ((d,), (f,)), ("mlp", "up"): ((d,), (f,)),
             ("mlp", "down"): ((f,), (d,))}  # fmt: skip
    want = {}
    for layer in ("0", "1"):
        for (block, site), (fan_in, fan_out) in sites.items():
            want[("layers", layer, block, site, "lora", "a", "value")] = (*fan_in, r)
            want[("layers", layer, block, site, "lora", "b", "value")] = (r, *fan_out)
    assert got == want
    _, meta = _saved(cfg, 6)
    assert meta[tr.LORA_BASE].startswith("checkpoint:full:")


def test_lora_export_is_the_merged_model_and_a_peft_adapter(runs):
    root, cfg = runs["root"], runs["cfg"]("straight")
    mesh = make_mesh(-1)
    graphdef, params, _ = tr.restore_params(cfg, cfg.checkpoint_dir, mesh)
    ids = _tokens()[0]
    ours = _our_logits(nnx.merge(graphdef, params), ids)
    base = _our_logits(from_pretrained(root / "base", dtype=jnp.float32), ids)
    assert np.max(np.abs(ours - base)) > 1e-3  # training moved the policy off its base
    export = root / "straight" / "export"
    np.testing.assert_allclose(_our_logits(from_pretrained(export, dtype=jnp.float32), ids), ours, atol=2e-5)
    merged = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager")
    np.testing.assert_allclose(_torch_logits(merged.eval(), ids), ours, atol=2e-5)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(hf_base, export / tr.ADAPTER_DIR).eval()
    np.testing.assert_allclose(_torch_logits(adapted, ids), ours, atol=2e-5)


def test_training_continues_from_a_peft_adapter(runs, caplog):
    """The adapter's weights are the initial trained params; a dropout other than the adapter's was trained
    with is said (it continued silently at lora.dropout's default)."""
    root, cfg = runs["root"], runs["cfg"]
    adapter = root / "straight" / "export" / tr.ADAPTER_DIR
    start = cfg("from_adapter", f"lora.adapter_path={adapter}", "lora.target_modules=[]", "train.steps=2",
                "data.eval_path=")  # fmt: skip
    mesh = make_mesh(-1)
    trained = tr.split_trainable(tr.init_params(start, mesh))[0]
    want = _saved(cfg("straight"), 6)[0].params
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trained), want)
    assert tr.train(start).step == 2
    first = next(r for r in read_jsonl(root / "from_adapter" / "metrics.jsonl") if "loss" in r)
    assert first["step"] == 1 and first["kl/seq"] != 0  # the first update already starts off the base
    assert "lora_dropout" not in caplog.text and "was made on" not in caplog.text
    other = cfg("dropout", f"lora.adapter_path={adapter}", "lora.target_modules=[]", "lora.dropout=0.25")
    with caplog.at_level("WARNING", logger="copg_jax.train"):
        tr.init_params(other, mesh)
    assert (
        f"lora.dropout=0.25 but adapter {adapter} was trained with lora_dropout=0.1: training" in caplog.text
    )
    # an adapter applied to another base than its own computes another function: said
    elsewhere = cfg("elsewhere", f"lora.adapter_path={adapter}", "lora.target_modules=[]",
                    f"model.path={root / 'other_base'}")  # fmt: skip
    with caplog.at_level("WARNING", logger="copg_jax.train"):
        tr.init_params(elsewhere, mesh)
    made_on = f"lora.adapter_path {adapter} was made on {root / 'base'} (its base_model_name_or_path)"
    assert made_on in caplog.text


def test_resuming_on_another_base_is_refused_naming_the_folder(runs):
    cfg = runs["cfg"]("resumed", f"model.path={runs['root'] / 'other_base'}")
    refusal = f"^{cfg.checkpoint_dir}: the LoRA adapters of step 6 were trained on another base"
    with pytest.raises(ValueError, match=refusal) as e:
        tr.train(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="trained on another base"):
        tr.restore_params(cfg, cfg.checkpoint_dir, make_mesh(-1))


def test_cli_export_and_eval_of_a_lora_run_folder(runs, capsys):
    """`copg export` writes what the run's own export wrote (merged model + PEFT adapter, same tensors), and
    `copg eval` on the run folder gives the eval metrics the run logged at that step."""
    root = runs["root"]
    run = root / "straight"
    assert cli.main(["export", "--run", str(run), "--out", str(root / "cli_export")]) == 0
    assert "exported step 6" in capsys.readouterr().out
    for name in ("model.safetensors", f"{tr.ADAPTER_DIR}/adapter_model.safetensors"):
        want = read_safetensors(run / "export" / name)
        got = read_safetensors(root / "cli_export" / name)
        assert sorted(got) == sorted(want), name
        for key, (array, _) in want.items():
            np.testing.assert_array_equal(got[key][0], array, err_msg=key)
    assert cli.main(["eval", "--config", str(run / "config.yaml"), "--checkpoint", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    logged = next(r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == 6 and "eval/loss" in r)
    assert metrics["step"] == 6
    for key in ("eval/loss", "eval/rewards/margins", "eval/kl/seq"):
        np.testing.assert_allclose(metrics[key], logged[key], rtol=1e-5, err_msg=key)
