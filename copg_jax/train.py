"""The CoPG update: TrainState, a pure jitted `train_step`, and the training run around it.

`train_step(state, batch, frozen)` maps a TrainState and a ScoredBatch whose leaves carry a leading
microbatch axis [M, ...] to the next state and scalar metrics: policy log-probs of every completion, the
[B, K] loss, gradients accumulated over the M microbatches with `lax.scan`, global-norm clipping and an AdamW
update. Parameters stay float32 (the master copy); each layer casts them to the compute dtype where it uses
them, and their gradients leave its matmuls and sums in float32 (`copg_jax.models.mixed`), so that the
cross-device sums of a mesh are float32 ones. An update whose loss or gradient norm is not finite is never
applied.

With LoRA (`lora.rank > 0`) the state's params are the adapters alone (optimizer moments and checkpoints
too); the frozen base is the step's third argument, never donated, never updated. The reference log-probs
are then, by default, the base's with the adapters off, computed in the same step (`lora.reference`).
Without LoRA `frozen` is an empty State.

A run is `setup(cfg)` -- one value, `Run`, holding everything the loop needs (mesh, model, data, reference
caches, compiled steps, checkpoints, writers), built in the order that fails cheapest first -- and `train`,
a short loop of named steps (next batches, update, check, log, evaluate, save) that threads the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import xxhash
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from copg_jax import checkpoint as ckpt
from copg_jax import config as config_lib
from copg_jax import paths
from copg_jax.batch import PER_PROMPT_FIELDS, ScoredBatch, TokenBatch, attention_context
from copg_jax.data.pipeline import DataIterator
from copg_jax.data.refcache import (
    RECOMPUTE_HINT,
    StaleCacheError,
    initial_reference,
    open_ref_cache,
    precompute_ref,
    reference_fingerprint,
)
from copg_jax.data.tokenize import TokenizedData, end_token_id, tokenize_dataset
from copg_jax.distributed import maybe_initialize_distributed
from copg_jax.generate import check_prompt_vocab
from copg_jax.generation_eval import GenerationEval, eval_pool
from copg_jax.logprobs import sequence_logprobs
from copg_jax.losses import bradley_terry_loss, combine_metrics, get_loss
from copg_jax.metrics import MetricsWriter, peak_flops_per_device, throughput
from copg_jax.models import (
    Decoder,
    ModelConfig,
    from_config,
    from_pretrained,
    is_model_file,
    load_config,
    load_tokenizer,
    param_shardings,
    remove_model_files,
    save_pretrained,
)
from copg_jax.models.adapters import (
    adapter_sites,
    add_adapters,
    load_peft_adapter,
    merge_adapters,
    peft_target_modules,
    read_peft_config,
    resolve_targets,
    save_peft_adapter,
    without_adapters,
)
from copg_jax.models.hub import misspelt_config_keys
from copg_jax.models.lora import LoRASpec
from copg_jax.prompt_pool import PromptPool
from copg_jax.rewards.reward_model import (
    ScoreModel,
    new_score_model,
    save_reward_model,
    score_model_from_decoder,
)
from copg_jax.rollout import FreshOnly, OnlineRollouts, rollout_pool
from copg_jax.run_config import (
    Config,
    LoRASection,
    OptimSection,
    config_yaml,
    covers,
    resume_changes,
    settings_of,
)
from copg_jax.run_config import load_config as load_run_config
from copg_jax.runlock import RunLock, check_shared, exclusive_flock, lock_run_folder, released_on_error
from copg_jax.sharding import (
    error_everywhere,
    gather_bytes,
    gather_ints,
    logical_sharding,
    make_mesh,
    on_main_process,
    on_mesh,
    processes_where,
    same_everywhere,
    unsharded_dims,
)
from copg_jax.streams import LORA_DROPOUT, LORA_INIT

log = logging.getLogger(__name__)

Metrics = dict[str, jax.Array]
NO_FROZEN = nnx.State({})  # the frozen params of a run without LoRA: none
ADAPTER_DIR = "adapter"  # a LoRA export: the merged model in export/, the PEFT adapter in export/adapter/
LORA_BASE = "lora_base"  # checkpoint metadata: the fingerprint of the base a LoRA run's adapters belong to
REFERENCE = "reference"  # checkpoint metadata: the fingerprint of the reference a policy is trained against
SETTINGS = "settings"  # checkpoint metadata: the config of the run that saved it (`settings_of`)
# checkpoint metadata: the updates of the log interval a stop off the log grid left open (`LogInterval.open`)
OPEN_INTERVAL = "open_log_interval"


@struct.dataclass
class TrainState:
    """Everything an update changes; a pytree (the model's graph definition is kept apart, static).

    Attributes:
      params: nnx.State of the trained nnx.Param leaves, in param_dtype (float32 master weights): all the
        policy's, or with LoRA its adapters alone (`split_trainable`).
      opt_state: optax state of the optimizer (a skipped update advances only its schedule counter).
      step: [] int32 updates taken so far (skipped ones included).
      skipped: [] int32 updates not applied because their loss or gradient norm was not finite.
    """

    params: nnx.State
    opt_state: Any
    step: jax.Array
    skipped: jax.Array


# ----------------------------------------------------------------------------------------------- optimizer


def make_schedule(optim: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine / linear decay to lr*end_lr_ratio at total_steps
    (or constant lr)."""
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    end = optim.lr * optim.end_lr_ratio
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_ratio)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(optim.lr)
    if optim.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [optim.warmup_steps])


# parameter names weight decay leaves alone, as transformers' Trainer does: biases, and norms' scales (and
# biases). By name, not by rank: layer-stacking (model.scan_layers) gives a norm's scale a second axis, and
# attention biases are per head [heads, head_dim]; both were decayed once.
NO_DECAY = frozenset({"bias", "scale"})


def decay_mask(params: Any) -> Any:
    """`params`' structure with True where AdamW decays: every parameter not named in NO_DECAY (kernels,
    embeddings, a mixture of experts' weights, LoRA's A, B and DoRA's magnitudes)."""

    def decayed(path, _) -> bool:
        return not NO_DECAY & {getattr(key, "key", None) for key in path}

    return jax.tree_util.tree_map_with_path(decayed, params)


class CompensationState(NamedTuple):
    """`compensated_sum`'s state: per parameter, what rounding has left out of its updates so far."""

    residual: Any


def compensated_sum() -> optax.GradientTransformation:
    """Kahan summation of the updates into low-precision (bfloat16) weights: the updates it returns, added by
    `optax.apply_updates`, give each weight the rounding of (weight + update + residual), and the residual
    (in the weight's dtype) keeps what that rounding dropped. Plain bfloat16 weights drop every update below
    half their spacing (2^-9 of their size: 4e-5 at 0.02), most of an update at lr 1e-5, and AdamW's steps
    are about lr; compensated, each update lands but for the residual's own rounding (~2^-18 of the weight a
    step, a random walk: 0.025 of its spacing after 400 updates, `tests/test_train.py`). The returned
    updates are float32 differences of two bfloat16 values (exact to float32 rounding), so `apply_updates`
    (which adds in float32 and rounds to the weight's dtype) lands on the rounded sum. The rounding is
    `lax.reduce_precision`, not a cast there and back, which XLA's GPU compiler removes as a no-op
    (SimplifyFPConversions): the residual was 0 there, the compensation silently off. Last in a chain; it
    needs the params."""

    def init(params):
        return CompensationState(jax.tree.map(jnp.zeros_like, params))

    def exact(u, r, p):
        return p.astype(jnp.float32) + (u.astype(jnp.float32) + r.astype(jnp.float32))

    def rounded(x, p):
        bits = jnp.finfo(p.dtype)
        return jax.lax.reduce_precision(x, exponent_bits=bits.nexp, mantissa_bits=bits.nmant)

    def update(updates, state, params):
        def step(u, r, p):
            return rounded(exact(u, r, p), p) - p.astype(jnp.float32)

        def residual(u, r, p):
            total = exact(u, r, p)
            return (total - rounded(total, p)).astype(r.dtype)

        out = jax.tree.map(step, updates, state.residual, params)
        return out, CompensationState(jax.tree.map(residual, updates, state.residual, params))

    return optax.GradientTransformation(init, update)


def compensates(cfg: Config) -> bool:
    """Whether `cfg`'s trained weights take their updates through `compensated_sum`: bfloat16 master weights
    (model.param_dtype) of a full fine-tune with optim.bf16_compensation on (LoRA's adapters are float32)."""
    return cfg.trains_bf16_weights and cfg.optim.bf16_compensation


def compensated(cfg: Config, manager: ocp.CheckpointManager, step: int | None = None) -> bool:
    """`compensates(cfg)`, unless checkpoint `step` of `manager` (the latest: the one a resume reads) holds
    an optimizer state saved without the residuals, by a version before them: that run goes on (or is
    exported) as it was saved, warned of, instead of being refused as another state."""
    if not compensates(cfg):
        return False
    step = manager.latest_step() if step is None else step
    try:
        names = [str(getattr(m, "name", "")) for m in jax.tree.leaves(manager.item_metadata(step)["state"])]
    except Exception:  # noqa: BLE001 - no step, or unreadable metadata: restoring says why
        return True
    if any("residual" in n for n in names) or not any("opt_state" in n for n in names):
        return True
    log.warning(
        "%s: checkpoint step %d holds bfloat16 weights saved without optim.bf16_compensation's residuals (an "
        "earlier version): this run goes on without them, as it was trained; start a new train.output_dir "
        "to use them", getattr(manager, "url", manager.directory), step,
    )  # fmt: skip
    return False


def make_optimizer(
    optim: OptimSection, total_steps: int, compensated: bool = False
) -> optax.GradientTransformation:
    """Global-norm clipping (if max_grad_norm > 0), then AdamW, without decay on biases and norms
    (`decay_mask`); `compensated`: the updates then enter the weights by Kahan summation (`compensated_sum`,
    for bfloat16 weights: `compensates`)."""
    adamw = optax.adamw(
        make_schedule(optim, total_steps),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=decay_mask,
    )
    parts = [optax.clip_by_global_norm(optim.max_grad_norm)] if optim.max_grad_norm > 0 else []
    parts += [adamw, compensated_sum()] if compensated else [adamw]
    return optax.chain(*parts) if len(parts) > 1 else adamw


def unless_nonfinite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the update is `finite` ([] bool), else `old` — except the learning-rate schedule's step
    counters (optax ScaleByScheduleState), which always advance: a skipped update keeps the weights and Adam's
    moments and count, while the schedule stays a function of `TrainState.step`, so the logged `lr` (the one
    the step's update applied, `schedule(step - 1)`) follows the schedule and the run ends where it does."""

    def pick(n, o):
        if isinstance(n, optax.ScaleByScheduleState):
            return n
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)

    return jax.tree.map(pick, new, old, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


# ------------------------------------------------------------------------------------------------ the step


def reference_in_step(cfg: Config) -> bool:
    """Whether the steps compute the reference log-probs themselves (LoRA, the base with adapters off)
    rather than reading them from the batch (the reference cache)."""
    return cfg.lora.enabled and cfg.lora.reference == "adapters_off"


def dropout_key(cfg: Config, step: jax.Array) -> jax.Array | None:
    """The LoRA dropout randomness of update `step` (None without dropout): a function of train.seed and the
    step only, so a resumed run draws the masks of an uninterrupted one."""
    if not (cfg.lora.enabled and cfg.lora.dropout > 0):
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), LORA_DROPOUT), step)


def make_loss_fn(graphdef: nnx.GraphDef, cfg: Config) -> Callable:
    """(params, ScoredBatch, frozen, dropout_key) -> (loss, metrics) for one microbatch (leaves without the
    M axis); `frozen` (the LoRA base, else empty) is merged with `params` into the model.

    A policy's loss is `loss.name` over its sequence log-probs, plus a mixture of experts' router
    load-balancing loss times `loss.router_aux_loss_coef` (or the model config's) when that is > 0; a reward
    model's (a ScoreModel) is the
    Bradley-Terry loss over its scores, its `rewards/*` metrics being the scores of chosen and rejected
    completions. With `reference_in_step`, the batch's ref_logps are replaced by those of the model's base
    (adapters off, no dropout, no gradient). The metrics carry the counts they average over (`loss/count`,
    `pairs/count`, `completions/count`), so microbatches combine into the metrics of the whole batch
    (combine_metrics).
    """
    loss = cfg.loss
    loss_fn, in_step = get_loss(loss.name), reference_in_step(cfg)

    def fn(
        params: nnx.State, batch: ScoredBatch, frozen: nnx.State = NO_FROZEN, key: jax.Array | None = None
    ):
        # the parameters as they are: each layer casts its own to the compute dtype where it uses them, and
        # takes their gradients in their dtype (`models.mixed`); the reference and eval passes do the same.
        # New Variables (copy): the frozen base may come from outside this trace (closed over)
        model = nnx.merge(graphdef, params, frozen, copy=True)
        b, k = batch.rewards.shape
        if isinstance(model, ScoreModel):
            scores = model(batch.tokens, b * k)[:, 0].reshape(b, k)
            value, metrics = bradley_terry_loss(scores, batch.rewards, batch.completion_mask)
            return value, {k: v for k, v in metrics.items() if not k.startswith(("logps/", "kl/"))}
        head_remat = cfg.model.head_remat
        layout = cfg.data.layout  # every batch of the run (data, eval, rollouts) is laid out so
        coef = loss.router_aux_loss_coef
        coef = model.config.router_aux_loss_coef if coef is None else coef
        _, seq_logps, _, *aux = sequence_logprobs(
            model, batch.tokens, b * k, head_remat=head_remat, dropout_key=key, layout=layout,
            router_aux=coef > 0,
        )  # fmt: skip
        policy_logps = seq_logps.reshape(b, k).astype(jnp.float32)
        ref_logps = batch.ref_logps
        if in_step:
            with jax.named_scope("reference"):
                ref_seq = sequence_logprobs(without_adapters(model), batch.tokens, b * k, layout=layout)[1]
            ref_logps = jnp.where(batch.completion_mask, jax.lax.stop_gradient(ref_seq.reshape(b, k)), 0.0)
        with jax.named_scope("loss"):
            value, metrics = loss_fn(
                policy_logps,
                ref_logps.astype(jnp.float32),
                batch.rewards,
                batch.completion_mask,
                loss.beta,
                lengths=batch.completion_lengths,
                length_average=loss.length_average,
            )
        if aux:  # a mixture of experts' load balancing, as transformers and TRL add it
            value = value + coef * aux[0]
            metrics = {**metrics, "loss": value, "router/aux_loss": aux[0]}
        return value, metrics

    return fn


def model_flops(cfg: Config, mcfg: ModelConfig, tokens: TokenBatch, mode: str = "train") -> jax.Array:
    """Model FLOPs of run `cfg`'s train step (mode "train") or forward pass ("forward": `copg precompute-ref`)
    over `tokens` (any leading dims), as perf/mfu counts them (`ModelConfig.step_flops`): with LoRA no
    gradient for the frozen base's weights, and the in-step reference's forward pass; a reward model's
    head."""
    train = mode == "train"
    return mcfg.step_flops(
        attention_context(tokens.segment_ids, tokens.prefix_ids),
        mode=mode,
        weights_trained=not (train and cfg.lora.enabled),
        reference_forward=train and reference_in_step(cfg),
        output_head=not _reward_model(cfg),
    )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: Config) -> Callable:
    """The pure update `(TrainState, ScoredBatch [M, ...], frozen) -> (TrainState, metrics)`.

    Microbatch gradients are weighted by each one's `loss/count`, so the update equals the full batch's
    (but for a mixture of experts' load-balancing term, which is not linear in the batch: each microbatch's
    own, as under transformers' gradient accumulation).
    An update with a non-finite loss or gradient norm leaves params and optimizer state as they were
    (`nonfinite` = 1 in its metrics, `skipped` counts it); the loop decides whether that stops the run.
    `frozen`: the LoRA base (NO_FROZEN without LoRA); microbatch m's LoRA dropout key folds m into the step's.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    mcfg = model_config(cfg)

    def train_step(state: TrainState, batch: ScoredBatch, frozen: nnx.State) -> tuple[TrainState, Metrics]:
        step_key = dropout_key(cfg, state.step)

        def micro_key(m):
            return None if step_key is None else jax.random.fold_in(step_key, m)

        if batch.rewards.shape[0] == 1:  # one microbatch: no weighting, no scan
            micro = jax.tree.map(lambda x: x[0], batch)
            (_, metrics), grads = grad_fn(state.params, micro, frozen, micro_key(0))
        else:

            def accumulate(grad_sum, micro_index):
                micro, m = micro_index
                (_, metrics), grads = grad_fn(state.params, micro, frozen, micro_key(m))
                weight = metrics["loss/count"]
                return jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            indices = jnp.arange(batch.rewards.shape[0])
            grad_sum, stacked = jax.lax.scan(accumulate, zeros, (batch, indices))
            metrics = combine_metrics(stacked)
            total = jnp.maximum(metrics["loss/count"], 1e-30)
            grads = jax.tree.map(lambda g: g / total, grad_sum)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)

        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(
            params=unless_nonfinite(finite, params, state.params),
            opt_state=unless_nonfinite(finite, opt_state, state.opt_state),
            step=state.step + 1,
            skipped=skipped,
        )
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": jnp.sum(batch.tokens.segment_ids != 0).astype(jnp.float32),
            "flops": model_flops(cfg, mcfg, batch.tokens),  # for perf/mfu (`LogInterval`)
            "nonfinite": (~finite).astype(jnp.float32),
            "skipped_updates": skipped.astype(jnp.float32),
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, cfg: Config) -> Callable:
    """`(params, ScoredBatch [1, ...]) -> metrics` of one batch, counts included (see `evaluate`); `params`
    are the whole model's (with LoRA: adapters and base, `nnx.merge_state`)."""
    loss_fn = make_loss_fn(graphdef, cfg)

    def eval_step(params: nnx.State, batch: ScoredBatch) -> Metrics:
        return loss_fn(params, jax.tree.map(lambda x: x[0], batch))[1]

    return eval_step


# ------------------------------------------------------------------------------------------------ shardings


def batch_shardings(mesh: Mesh) -> ScoredBatch:
    """Shardings of a stacked [M, ...] ScoredBatch: rows and prompts split along the logical "batch" axis."""
    rows = logical_sharding(mesh, (None, "batch", "length"))
    prompts = logical_sharding(mesh, (None, "batch", None))
    return ScoredBatch(
        tokens=TokenBatch(*([rows] * 6)),
        rewards=prompts,
        completion_mask=prompts,
        ref_logps=prompts,
        completion_lengths=prompts,
    )


def state_shardings(abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of the TrainState: params per their logical axes, each optimizer moment like its parameter,
    the rest (optimizer step counters, step, skipped) replicated.

    The moments are matched to their parameters by optax's own structure (`optax.tree_map_params`): the
    shardings XLA gives `tx.init`'s outputs would replicate them, since zeros depend on no input.
    """
    params = param_shardings(abstract_params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, abstract_params),
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(params=params, opt_state=opt, step=replicated, skipped=replicated)


def check_param_sharding(abstract_params: nnx.State, mesh: Mesh, tolerance: float) -> float:
    """Fraction of parameters (by element count) the mesh leaves less sharded than their logical axes ask.

    A dimension whose fsdp/tensor mesh axes do not divide it is replicated (`sharding.divisible_spec`), which
    can silently hold a full copy of a large tensor on every device. The fraction is logged.

    Raises:
      ValueError: the fraction exceeds `tolerance` (mesh.replication_tolerance), naming the tensors, their
        dimensions and the mesh axes.
    """
    total, short, named = 0, 0, []
    for path, var in nnx.to_flat_state(abstract_params):
        axes = var.get_metadata().get("logical_axes", (None,) * len(var.shape))
        size = int(np.prod(var.shape))
        total += size
        dims = unsharded_dims(axes, tuple(var.shape), mesh)
        if dims:
            short += size
            where = ", ".join(
                f"dim {i} ({n}) not divisible by mesh {'x'.join(a)}="
                + str(int(np.prod([mesh.shape[x] for x in a])))
                for i, n, a in dims
            )
            named.append(f"{'.'.join(map(str, path))} {tuple(var.shape)}: {where}")
    fraction = short / max(total, 1)
    log.info(
        "parameter sharding on mesh %s: %.2f%% of parameters less sharded than their logical axes ask",
        dict(mesh.shape),
        100 * fraction,
    )
    if fraction > tolerance:
        raise ValueError(
            f"mesh {dict(mesh.shape)} leaves {100 * fraction:.1f}% of the parameters replicated along axes "
            f"meant to shard them (mesh.replication_tolerance={tolerance}): "
            + "; ".join(named[:6])
            + (f"; and {len(named) - 6} more" if len(named) > 6 else "")
            + ". Choose mesh sizes that divide these dimensions."
        )
    return fraction


def stack_to_device(batches: list[ScoredBatch], mesh: Mesh) -> ScoredBatch:
    """Stacks host-local numpy batches into one [M, ...] global ScoredBatch on `mesh`.

    Batches of one update may differ in rows N or length T (buckets, packing); they are padded to the
    largest with padding tokens (segment 0, no target slot), which change no log-prob.
    """
    n = max(b.tokens.input_ids.shape[0] for b in batches)
    t = max(b.tokens.input_ids.shape[1] for b in batches)

    def pad(x: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(x, ((0, n - x.shape[0]), (0, t - x.shape[1])), constant_values=fill)

    fills = {"target_slots": -1}
    tokens = TokenBatch(
        **{
            f.name: np.stack(
                [pad(np.asarray(getattr(b.tokens, f.name)), fills.get(f.name, 0)) for b in batches]
            )
            for f in dataclasses.fields(TokenBatch)
        }
    )
    stacked = ScoredBatch(
        tokens=tokens,
        **{f: np.stack([np.asarray(getattr(b, f)) for b in batches]) for f in PER_PROMPT_FIELDS},
    )
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, x), stacked, batch_shardings(mesh)
    )


# -------------------------------------------------------------------------------------------- model + state


def model_config(cfg: Config) -> ModelConfig:
    """The policy's ModelConfig, from the HF folder or the inline config."""
    return load_config(cfg.model.path) if cfg.model.path else ModelConfig.from_hf(cfg.model.config)


def run_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """The run's device mesh (`cfg.mesh`) over `devices` (None: all, laid out by `make_mesh`).

    Raises:
      ValueError: mesh.expert does not divide the number of experts of the model (a dense model has no expert
        axis to split: there it shards like fsdp).
    """
    section = cfg.mesh
    experts = model_config(cfg).num_experts if section.expert > 1 else 0
    if experts % section.expert:
        raise ValueError(
            f"mesh.expert={section.expert} does not divide the {experts} experts of the model: choose a "
            f"divisor of {experts} (the rest of the devices go on data or fsdp)"
        )
    return make_mesh(section.data, section.fsdp, section.tensor, devices, expert=section.expert)


def model_numerics(cfg: Config) -> dict[str, str]:
    """The dtypes the run computes log-probs in; a reference cache must have been computed in the same."""
    return {"dtype": jnp.dtype(cfg.model.dtype).name, "param_dtype": jnp.dtype(cfg.model.param_dtype).name}


def _model_kwargs(cfg: Config) -> dict:
    return dict(
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        scan_layers=cfg.model.scan_layers,
        grouped_matmul=cfg.model.grouped_matmul,
    )


def _reward_model(cfg: Config) -> bool:
    return cfg.train.objective == "reward_model"


def lora_spec(cfg: Config, model_type: str, num_layers: int = 1) -> LoRASpec | None:
    """The run's adapters (None without LoRA), their sites resolved from `lora.target_modules` for
    `model_type` (a pattern over the names of `num_layers` blocks). With `lora.adapter_path`, the adapter's r,
    lora_alpha, use_rslora and use_dora must equal lora.rank, lora.alpha, lora.rslora and lora.dora, and the
    modules its tensors adapt lora.target_modules (which default to them).

    Raises:
      ValueError: a target name that is no module of the family, or a mismatch with the adapter (named).
    """
    section = cfg.lora
    if not section.enabled:
        return None
    targets = section.target_modules
    if section.adapter_path:
        peft = read_peft_config(section.adapter_path)
        for key, ours, name in (("rank", section.rank, "r"), ("alpha", section.alpha, "lora_alpha")):
            if float(ours) != float(peft[name]):
                raise ValueError(
                    f"lora.{key}={ours} but adapter {section.adapter_path} has {name}={peft[name]}: set "
                    f"lora.{key}={peft[name]}"
                )
        for key, theirs in (("rslora", "use_rslora"), ("dora", "use_dora")):
            if bool(peft.get(theirs)) != getattr(section, key):
                raise ValueError(
                    f"lora.{key}={getattr(section, key)} but adapter {section.adapter_path} has "
                    f"{theirs}={peft.get(theirs)}: set lora.{key}={bool(peft.get(theirs))}"
                )
        theirs = adapter_sites(section.adapter_path, model_type)
        if targets and resolve_targets(model_type, targets, num_layers) != theirs:
            raise ValueError(
                f"lora.target_modules={targets} but adapter {section.adapter_path} adapts "
                f"{peft_target_modules(model_type, theirs)}: set lora.target_modules=[] to use the adapter's"
            )
        sites = theirs
    else:
        sites = resolve_targets(model_type, targets, num_layers)
    return LoRASpec(section.rank, section.alpha, section.dropout, sites, section.rslora, section.dora)


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, abstract params) of the model trained (policy, with its LoRA adapters if any, or
    reward model), without allocating it."""
    mcfg = model_config(cfg)
    if _reward_model(cfg):
        model = nnx.eval_shape(lambda: new_score_model(mcfg, rngs=nnx.Rngs(0), **_model_kwargs(cfg)))
    else:
        lora = lora_spec(cfg, mcfg.model_type, mcfg.num_layers)
        model = nnx.eval_shape(lambda: Decoder(mcfg, rngs=nnx.Rngs(0), lora=lora, **_model_kwargs(cfg)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def split_trainable(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trained, frozen) parts of a model's params: (adapters, base) of a LoRA model, else (all, NO_FROZEN).
    `nnx.merge(graphdef, trained, frozen)` is the model again."""
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    return (adapters, base) if jax.tree.leaves(adapters) else (params, NO_FROZEN)


def _same_model(recorded: str, path: str) -> bool:
    """Whether a PEFT adapter's base_model_name_or_path `recorded` names the model folder `path`: the same
    path or folder, a hub id and a folder of its name (meta-llama/Llama-3.1-8B, /models/Llama-3.1-8B), or
    the hub cache's snapshot of it (models--meta-llama--Llama-3.1-8B/snapshots/...)."""
    a, b = recorded.rstrip("/"), str(path).rstrip("/")
    if a == b or f"/models--{a.replace('/', '--')}/" in f"/{b}/":
        return True
    if not paths.is_url(a) and not paths.is_url(b) and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    hub_id = a.count("/") == 1 and not a.startswith((".", "/", "~")) and not os.path.exists(a)
    return hub_id and a.rsplit("/", 1)[-1].lower() == b.rsplit("/", 1)[-1].lower()


def init_params(cfg: Config, mesh: Mesh) -> nnx.State:
    """Initial params on `mesh`: the policy read from `model.path`, or random (seed `train.seed`), with its
    LoRA adapters (read from `lora.adapter_path`, or new: A random from `train.seed`, B = 0); a reward model
    (train.objective) gets that policy as backbone and a new score head (seed `train.seed`)."""
    if cfg.model.path:
        model = from_pretrained(cfg.model.path, mesh=mesh, **_model_kwargs(cfg))
    else:
        model = from_config(model_config(cfg), rngs=nnx.Rngs(cfg.train.seed), mesh=mesh, **_model_kwargs(cfg))
    if _reward_model(cfg):
        model = score_model_from_decoder(model, nnx.Rngs(cfg.train.seed))
    elif (spec := lora_spec(cfg, model.config.model_type, model.config.num_layers)) is not None:
        if cfg.lora.adapter_path:
            model = load_peft_adapter(model, cfg.lora.adapter_path, dropout=spec.dropout, mesh=mesh)
            peft = read_peft_config(cfg.lora.adapter_path)
            made_on = peft.get("base_model_name_or_path") or ""
            if made_on and not _same_model(made_on, cfg.model.path or ""):
                log.warning(
                    "lora.adapter_path %s was made on %s (its base_model_name_or_path), model.path is %s: "
                    "the adapter is applied to model.path's weights, where it computes another function",
                    cfg.lora.adapter_path, made_on, cfg.model.path or "a random init (model.config)",
                )  # fmt: skip
            # a training setting, not the adapter's function: said, not refused
            theirs = peft.get("lora_dropout") or 0.0
            if float(theirs) != spec.dropout:
                log.warning(
                    "lora.dropout=%g but adapter %s was trained with lora_dropout=%g: training goes on at %g "
                    "(set lora.dropout=%g to keep the adapter's)",
                    spec.dropout, cfg.lora.adapter_path, theirs, spec.dropout, theirs,
                )  # fmt: skip
            if model.lora_spec != spec:
                raise ValueError(
                    f"lora.adapter_path {cfg.lora.adapter_path}: the adapter read ({model.lora_spec}) is not "
                    f"the one the lora section describes ({spec})"
                )
        else:
            key = jax.random.fold_in(jax.random.key(cfg.train.seed), LORA_INIT)
            model = add_adapters(model, spec, key, mesh)
    return nnx.split(model, nnx.Param)[1]


def reference_of(graphdef: nnx.GraphDef, params: nnx.State) -> Decoder:
    """The reference policy of a run starting from `params` (whole-model params): the initial policy, with
    any LoRA adapters off (the base). It shares `params`' arrays: copy what a train step will donate."""
    return without_adapters(nnx.merge(graphdef, params))


def base_fingerprint(cfg: Config, graphdef: nnx.GraphDef, params: nnx.State | None) -> str:
    """Fingerprint of a policy run's reference (a LoRA run's: its frozen base), recorded with its
    checkpoints: model.path's folder (its weight files hashed as data.ref_weights_hash says) or, for a random
    init, the initial model's config and weights (`params`: the whole model's, adapters included)."""
    return reference_fingerprint(cfg.model.path or reference_of(graphdef, params), cfg.data.ref_weights_hash)


def check_base(cfg: Config, directory: str, step: int, meta: dict, fingerprint: str) -> None:
    """Refuses checkpoint `step` (read from `directory`, its metadata item `meta`) trained against another
    reference than this run's: a LoRA run's adapters on another base, or a policy pulled toward another
    reference (its reference cache was recomputed for the new one, and the run went on). A full fine-tuning
    checkpoint from before the reference was recorded is not checked; a folder fingerprinted with another
    data.ref_weights_hash is fingerprinted again that way.

    Raises:
      ValueError: the checkpoint records another fingerprint (or none, with LoRA), naming the folder.
    """
    lora = cfg.lora.enabled
    saved = meta.get(LORA_BASE if lora else REFERENCE)
    if saved is None and not lora:
        return
    prefix = "checkpoint:"
    if cfg.model.path and isinstance(saved, str) and saved.startswith(prefix) and saved != fingerprint:
        weights = saved[len(prefix) :].split(":")[0]
        if weights != cfg.data.ref_weights_hash and weights in ("full", "sampled"):
            fingerprint = reference_fingerprint(cfg.model.path, weights)
    if saved == fingerprint:
        return
    base = cfg.model.path or (
        f"the random init of train.seed={cfg.train.seed} (of this model.config and model.param_dtype)"
    )
    what = (
        f"the LoRA adapters of step {step} were trained on another base"
        if lora
        else f"step {step} was trained against another reference policy"
    )
    raise ValueError(
        f"{directory}: {what} (fingerprint {str(saved)[:40]}) than {base} ({fingerprint[:40]}): resume with "
        f"the {'base' if lora else 'reference'} it was trained with (model.path; for a random init, "
        "train.seed, model.config and model.param_dtype), or train in a new train.output_dir"
    )


def check_settings(cfg: Config, directory: str, step: int, meta: dict) -> list[str]:
    """What this run changes of the settings checkpoint `step` (read from `directory`, its metadata item
    `meta`) was trained with, among those of what the run learns (`resume_changes`), as "key old -> new":
    all allowed by checkpoint.allow_changes. A checkpoint that records no settings (an older version's) is
    not checked.

    Raises:
      ValueError: a change checkpoint.allow_changes does not allow, naming the folder, keys and values.
    """
    saved = meta.get(SETTINGS)
    if not isinstance(saved, dict):
        return []
    current = settings_of(cfg)

    def change(key: str) -> str:
        old, new = (config_lib.show(x[key], 40) if key in x else "(unset)" for x in (saved, current))
        text = f"{key} {old} -> {new}"
        if key == "train.steps" and isinstance(saved[key], int):  # a decaying schedule's length
            lrs = (float(make_schedule(cfg.optim, n)(step)) for n in (saved[key], cfg.train.steps))
            text += " (the learning rate after step {}: {:.3g} -> {:.3g})".format(step, *lrs)
        return text

    changed = resume_changes(saved, cfg)
    refused = [k for k in changed if not any(covers(e, k) for e in cfg.checkpoint.allow_changes)]
    if refused:
        shown = "; ".join(map(change, refused[:6])) + (
            f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
        )
        raise ValueError(
            f"{directory}: step {step} was trained with other settings of what the run learns ({shown}): "
            f"resume with the checkpoint's, or set checkpoint.allow_changes=[{','.join(refused)}] to train "
            f"on with these from step {step}"
        )
    return [change(k) for k in changed]


def write_config(cfg: Config, resumed_step: int | None) -> None:
    """Writes the run's config.yaml. A resume that changes it first keeps the one the steps up to
    `resumed_step` were trained with as config.until-step-<n>.yaml (unless one is there: an earlier resume
    from that step, whose own steps were lost)."""
    path = paths.join(cfg.train.output_dir, "config.yaml")
    text = config_yaml(cfg)
    if resumed_step is not None and paths.isfile(path):
        old = paths.read_text(path)
        kept = paths.join(cfg.train.output_dir, f"config.until-step-{resumed_step}.yaml")
        if old != text and not paths.exists(kept):
            paths.write_text(kept, old)
            log.info("%s changed on resume: the one until step %d is kept as %s", path, resumed_step, kept)
    paths.write_text(path, text)


def init_state(params: nnx.State, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """A fresh TrainState (step 0) around `params`, laid out per `shardings`."""

    def make(params):
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params=params, opt_state=tx.init(params), step=zero, skipped=zero)

    return jax.jit(make, out_shardings=shardings)(params)


def abstract_state(abstract_params: nnx.State, tx, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the TrainState, to restore a checkpoint onto."""
    zero = jnp.zeros((), jnp.int32)
    shapes = jax.eval_shape(lambda p: TrainState(p, tx.init(p), zero, zero), abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def jit_train_step(
    graphdef, tx, cfg: Config, shardings: TrainState, mesh: Mesh, frozen: nnx.State = NO_FROZEN
) -> Callable:
    """`train_step(state, batch, frozen)` jitted with state/batch/frozen shardings and the state (only)
    donated, traced on `mesh` (the model's activation constraints apply). `frozen`: the LoRA base params
    (arrays or abstract), whose logical axes give their shardings."""
    return jax.jit(
        on_mesh(make_train_step(graphdef, tx, cfg), mesh),
        in_shardings=(shardings, batch_shardings(mesh), param_shardings(frozen, mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def evaluate(
    eval_step: Callable, params: nnx.State, batches: Iterator[ScoredBatch], mesh: Mesh, limit: int = 0
) -> dict:
    """Eval metrics over batches, named "eval/<metric>": each mean weighted by its own count across batches
    (losses.combine_metrics), i.e. the metrics of all evaluated rows at once."""
    per_batch = []
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        per_batch.append(jax.device_get(eval_step(params, stack_to_device([batch], mesh))))
    if not per_batch:
        return {}
    stacked = {k: np.asarray([m[k] for m in per_batch], np.float64) for k in per_batch[0]}
    return {f"eval/{k}": float(v) for k, v in combine_metrics(stacked).items()}


# ------------------------------------------------------------------------------------------------ data


def _default_cache(cfg: Config, evaluation: bool) -> str:
    return paths.join(cfg.train.output_dir, "ref_cache", "eval.parquet" if evaluation else "train.parquet")


def reference_cache(cfg: Config, data: TokenizedData, mesh: Mesh, reference, path: str):
    """The reference cache of `data` at `path`, computed (and written) when missing or stale.

    A stale cache -- any fingerprint part changed (reference weights or dtypes, tokenizer, tokenisation,
    data) -- is never used: it is recomputed, with a warning naming what changed.

    Args:
      reference: the reference policy's HF folder (str) or the in-memory initial model (random init).
    """
    numerics, weights = model_numerics(cfg), cfg.data.ref_weights_hash
    cache = None
    if paths.exists(path):
        try:
            cache = open_ref_cache(path, data, reference=reference, numerics=numerics, weights=weights)
        except StaleCacheError as e:
            log.warning("%s Recomputing it.", str(e).removesuffix(RECOMPUTE_HINT))
    else:
        log.info("reference cache %s does not exist yet: computing it", path)
    # computing is collective: all compute when any process lacks a usable cache (e.g. on a host's own disk)
    usable = processes_where(cache is not None)
    if len(usable) == jax.process_count():
        return cache
    if cache is not None:
        log.warning(
            "reference cache %s is usable on process(es) %s only: computing it on every process (put "
            "data.ref_cache where every host reads the same file)",
            path,
            usable,
        )
    if isinstance(reference, str):
        model = from_pretrained(reference, mesh=mesh, **_model_kwargs(cfg))
        checkpoint = reference
    else:
        model, checkpoint = reference, None
    return precompute_ref(
        model,
        data,
        cfg.data,
        path,
        checkpoint=checkpoint,
        mesh=mesh,
        weights=weights,
        progress=cfg.train.progress,
    )


def tokenize_for_model(cfg: Config, tokenizer, path: str, split: str) -> TokenizedData:
    """`tokenize_dataset` with `cfg.data`, checked to fit the model and, on a multi-process run, to give
    every process the same rows: each reads the whole dataset and feeds the batch shards its devices hold,
    so a host whose copy of the files differs (a damaged row skipped under data.on_bad_row=skip, another
    version of a file or of the tokenizer) would pair its rows with other rows into every global batch,
    silently, or fail far from the cause.

    Raises:
      ValueError: token ids past the model's vocabulary (an embedding lookup past the table: NaN, blamed on
        a batch); on every process, the processes whose rows differ from process 0's, with their counts.
    """
    mcfg = model_config(cfg)
    # a finished completion ends with the end token sampling stopped on, of the model's; a reward model's
    # with data.eos_token, as it scores completions (`sequence_ids`)
    policy = cfg.train.objective != "reward_model"
    data = tokenize_dataset(cfg.data, tokenizer, path, split, mcfg.eos_token_ids, keep_sampled_end=policy)
    if jax.process_count() > 1:  # first: then every process refuses together, and the checks below agree
        same_everywhere(f"rows from {path!r}", data.digest(), len(data))
    vocab = mcfg.vocab_size
    if (top := data.max_token_id()) >= vocab:
        raise ValueError(
            f"the token ids of {path!r} reach {top}, past the model's vocab_size {vocab}: the tokenizer "
            f"({cfg.tokenizer_path}) is not this model's"
        )
    return data


def load_data(cfg: Config, tokenizer, mesh: Mesh, *, evaluation: bool = False, reference=None, position=None):
    """The train (or eval) DataIterator with cached reference log-probs; None when no eval data is set.

    The cache is `data.ref_cache` (`data.eval_ref_cache`), by default `<output_dir>/ref_cache/...`; it is
    computed when missing or stale (`reference_cache`). `reference` is the reference policy: its HF folder
    (default `model.path`) or, for a random-init model, the initial model itself (default: built here; its
    base under LoRA). A reward model, and LoRA with the reference in the step (`reference_in_step`), need no
    cache: their batches carry NaN reference log-probs, which the step never reads. `position`: the data
    position to resume from (a checkpoint's), set before the cache is made (`DataIterator.set_state`).
    """
    data_cfg = cfg.data
    path, split, cache = (
        (data_cfg.eval_path, data_cfg.eval_split, data_cfg.eval_ref_cache)
        if evaluation
        else (data_cfg.path, data_cfg.split, data_cfg.ref_cache)
    )
    if not path:
        if evaluation:
            return None
        raise ValueError("data.path is empty: set the training data file or folder")
    data = tokenize_for_model(cfg, tokenizer, path, split)
    # LongRoPE: the shared-prefix layout never groups short and long sequences
    kw = dict(ref=None, mesh=mesh, split_length=model_config(cfg).split_length)
    if evaluation:
        batches = DataIterator(data, data_cfg, repeat=False, drop_last=False, shuffle=False, **kw)
    else:
        batches = DataIterator(data, data_cfg, **kw)
    if position is not None:  # over other rows or another order: refused before the reference cache is made
        refusal = None
        try:
            batches.set_state(position)
        except ValueError as e:
            refusal = e
        agreed(refusal, f"the data position of {path!r} was refused on another process")
    cached = not (_reward_model(cfg) or reference_in_step(cfg))  # else the loss reads no reference log-probs
    if cached:
        if reference is None:
            reference = cfg.model.path or reference_of(abstract_model(cfg)[0], init_params(cfg, mesh))
        batches.ref = reference_cache(cfg, data, mesh, reference, cache or _default_cache(cfg, evaluation))
    return batches


def agreed(refusal: Exception | None, elsewhere: str) -> None:
    """Raises `refusal` on every process where any process has one (`elsewhere` where this one has none):
    a check each process makes from its own reads, before collective work that all or none must do."""
    if error := error_everywhere(refusal, lambda _: ValueError(elsewhere)):
        raise error


def precompute_reference(cfg: Config) -> list[str]:
    """`copg precompute-ref`: (re)computes the reference caches of `data.path` and, when set,
    `data.eval_path`, with the model of `model.path` / `model.config` in the run's dtypes. Returns the paths.

    Training computes missing or stale caches itself; this is for doing it ahead of time (e.g. on other
    hardware than the run).
    """
    maybe_initialize_distributed(cfg.distributed)
    jobs = [(cfg.data.path, cfg.data.split, cfg.data.ref_cache or _default_cache(cfg, False))]
    if cfg.data.eval_path:
        jobs.append(
            (cfg.data.eval_path, cfg.data.eval_split, cfg.data.eval_ref_cache or _default_cache(cfg, True))
        )
    if not cfg.data.path:
        raise ValueError("data.path is empty: nothing to compute reference log-probs for")
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    # the data first: a missing file or a bad row stops the command before a large model is loaded
    tokenized = [tokenize_for_model(cfg, tokenizer, path, split) for path, split, _ in jobs]
    mesh = run_mesh(cfg)
    if cfg.model.path:
        model = from_pretrained(cfg.model.path, mesh=mesh, **_model_kwargs(cfg))
    else:
        model = from_config(model_config(cfg), rngs=nnx.Rngs(cfg.train.seed), mesh=mesh, **_model_kwargs(cfg))
    for data, (_, _, out) in zip(tokenized, jobs, strict=True):
        precompute_ref(
            model,
            data,
            cfg.data,
            out,
            checkpoint=cfg.model.path or None,
            mesh=mesh,
            weights=cfg.data.ref_weights_hash,
            progress=cfg.train.progress,
        )
    return [out for _, _, out in jobs]


# ------------------------------------------------------------------------------------------------ set-up


@dataclasses.dataclass
class Run:
    """Everything a training run's loop needs, built once by `setup`.

    `state` is the starting state (fresh or restored); the loop threads its own copy and never writes here.
    """

    cfg: Config
    mesh: Mesh
    tokenizer: Any
    graphdef: nnx.GraphDef
    model_config: ModelConfig
    state: TrainState
    frozen: nnx.State
    resumed_step: int | None
    batches: DataIterator | FreshOnly
    eval_batches: DataIterator | None
    step_fn: Callable
    eval_fn: Callable
    manager: ocp.CheckpointManager
    writer: MetricsWriter
    online: OnlineRollouts | None
    generation_eval: GenerationEval | None
    peak_flops: float
    lock: RunLock
    base: str | None = None  # the reference's fingerprint (`base_fingerprint`), None for a reward model
    # the updates of the log interval the checkpoint resumed from left open (`LogInterval`)
    open_interval: list[dict[str, np.ndarray]] = ()
    checkpoint_lock: RunLock | None = None  # checkpoint.dir's, where it is outside the run folder

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def params(self, state: TrainState) -> nnx.State:
        """The whole model's params in `state`: its trained ones and, with LoRA, the frozen base."""
        return nnx.merge_state(self.frozen, state.params)

    def close(self) -> None:
        self.writer.close()
        self.manager.close()
        self.lock.release()
        if self.checkpoint_lock is not None:
            self.checkpoint_lock.release()


def make_generation_eval(
    cfg: Config, tokenizer, mesh: Mesh, graphdef, initial, online, pool: PromptPool | None = None
) -> GenerationEval | None:
    """The run's evaluation by generation (None when eval_generation has no reward), of `pool` (None: read
    here). Its reference is the initial policy: online mode's, or `initial_reference` of `initial` (copied
    before the first update donates it; under LoRA the base, adapters off)."""
    if not cfg.eval_generation.enabled:
        return None
    if online is not None:
        reference = online.reference
    else:
        reference = initial_reference(graphdef, *split_trainable(initial))
    return GenerationEval(cfg.eval_generation, cfg.data, tokenizer, reference, mesh, pool)


def reward_pools(cfg: Config, tokenizer, online: bool = True) -> tuple[PromptPool | None, PromptPool | None]:
    """The prompts and rewards of online mode (when `online`) and of evaluation by generation (None where
    off), read before the data and its reference caches are made: a reward that cannot be built, or prompt
    rows without a field it takes, or a prompt's ids past the model's vocabulary, stop the run first, on
    every process together."""
    refusal, pools = None, (None, None)
    try:
        pools = (
            rollout_pool(cfg, tokenizer) if online and cfg.rollout.every_n_steps else None,
            eval_pool(cfg.eval_generation, cfg.data, tokenizer) if cfg.eval_generation.enabled else None,
        )
        vocab = model_config(cfg).vocab_size if any(p is not None for p in pools) else 0  # read once
        for pool in pools:
            if pool is not None:
                check_prompt_vocab(pool.prompt_ids, vocab, f"{pool.what}: prompt")
    except Exception as e:  # noqa: BLE001 - raised again on every process (agreed)
        refusal = e
    agreed(
        refusal,
        "another process could not read the prompts or build the reward of its rollouts or evaluation",
    )
    for pool in pools:
        if pool is not None:
            pool.agree()
    return pools


def _inside(folder: str, run_dir: str) -> bool:
    """Whether `folder` is `run_dir` or inside it (local paths compared resolved: links and .. followed)."""
    folder, run_dir = (
        paths.normal(x) if paths.is_url(x) else str(Path(paths.normal(x)).resolve())
        for x in (folder, run_dir)
    )
    return folder == run_dir or folder.startswith(run_dir.rstrip("/") + "/")


# settings each process may set its own way: where it finds files whose contents the processes compare (the
# data's rows, the prompts, the reference caches, which are fingerprinted) or share (the run folders:
# `check_shared`), and how it joins the run
PER_PROCESS = (
    "distributed.",
    "data.path",
    "data.eval_path",
    "data.cache_dir",
    "data.ref_cache",
    "data.eval_ref_cache",
    "rollout.prompts_path",
    "eval_generation.prompts_path",
    "train.output_dir",
    "checkpoint.dir",
    "rollout.reward.workers",  # each host's CPUs for its share of the reward calls
    "eval_generation.reward.workers",
)
# packages whose versions must agree across the processes (besides copg_jax's own source)
AGREED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy")


@functools.cache
def source_digest() -> str:
    """xxh3-128 (hex) of copg_jax's source files as installed here: the code each process runs."""
    digest = xxhash.xxh3_128()
    root = Path(__file__).resolve().parent
    for file in sorted(root.rglob("*.py")):
        digest.update(f"{file.relative_to(root)}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def agree_on_settings(cfg: Config) -> None:
    """Refuses, on every process together, a run whose processes were started with different settings
    (`settings_of`, but for PER_PROCESS), copg_jax source or AGREED_PACKAGES versions: a host with another
    loss.beta or lr trained on silently, its gradients mixed into the others', and another train.steps or
    checkpoint interval hung the run when the processes' collectives parted. Every process calls it at the
    same point, first thing after joining the run.

    Raises:
      ValueError: naming each differing process's settings against process 0's.
    """
    if jax.process_count() == 1:
        return
    mine = {k: v for k, v in settings_of(cfg).items() if not any(covers(e, k) for e in PER_PROCESS)}
    mine["(copg_jax source)"] = source_digest()
    mine.update({f"({name})": importlib.metadata.version(name) for name in AGREED_PACKAGES})
    text = json.dumps(mine, sort_keys=True, default=str).encode()
    digests = gather_bytes(xxhash.xxh3_128(text).digest())
    if all(d == digests[0] for d in digests):
        return
    longest = max(gather_ints(len(text)))
    everyone = [json.loads(t.rstrip(b" ")) for t in gather_bytes(text.ljust(longest))]
    said = []
    for i, theirs in enumerate(everyone[1:], 1):
        keys = sorted(k for k in everyone[0].keys() | theirs.keys() if everyone[0].get(k) != theirs.get(k))
        shown = ", ".join(f"{k} {everyone[0].get(k)!r} -> {theirs.get(k)!r}" for k in keys[:5])
        if keys:
            said.append(f"process {i}: {shown}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else ""))
    raise ValueError(
        f"the processes were started with different settings or code ({'; '.join(said[:4])}; against "
        "process 0's): every process of a run needs the same config, overrides and installed packages"
    )


def warn_unranked(cfg: Config) -> None:
    """Warns where `checkpoint.keep_best` ranks by a metric the run never logs (`eval/*` without
    data.eval_path, `eval_gen/*` without evaluation by generation): no checkpoint is then kept as best."""
    ckpt = cfg.checkpoint
    logged = {"eval": bool(cfg.data.eval_path), "eval_gen": cfg.eval_generation.enabled}
    if ckpt.keep_best and not logged.get(ckpt.best_metric.split("/")[0], True):
        log.warning(
            "checkpoint.keep_best=%d ranks by %s, which this run never logs (no %s): no checkpoint is kept "
            "as the best; set checkpoint.keep_best=0, or evaluate",
            ckpt.keep_best, ckpt.best_metric,
            "data.eval_path" if ckpt.best_metric.startswith("eval/") else "eval_generation.reward",
        )  # fmt: skip


def check_positions(cfg: Config, mcfg: ModelConfig) -> None:
    """Refuses data lengths past a learned position table (GPT-2's n_positions): a sequence (prompt and
    completion, positions from 0 in every layout; rollouts' fit the data's) longer than it has no position
    embedding, and its log-probs came out NaN, reported as non-finite reference log-probs naming no
    setting; so are evaluation samples (prompt and eval_generation.max_new_tokens), refused only when
    sampled.

    Raises:
      ValueError: naming data.max_prompt_length, data.max_completion_length and the table's size.
    """
    lengths = {"data.max_completion_length": cfg.data.max_completion_length}
    if cfg.eval_generation.enabled:  # its samples are scored and their KL taken with the policy's log-probs
        lengths["eval_generation.max_new_tokens"] = cfg.eval_generation.max_new_tokens
    for key, length in lengths.items():
        needed = cfg.data.max_prompt_length + length
        if mcfg.position_embedding == "learned" and needed > mcfg.max_position_embeddings:
            raise ValueError(
                f"data.max_prompt_length + {key} = {needed} positions, more than the "
                f"{mcfg.max_position_embeddings} the model learned (max_position_embeddings, GPT-2's "
                "n_positions): lower them to fit"
            )


def warn_unread(cfg: Config) -> None:
    """Warns of the settings `Config.unread_settings` lists: set but never read by this run, or training
    otherwise than they read."""
    unread = cfg.unread_settings()
    if cfg.model.config and not cfg.model.path:
        unread += [f"model.config.{key}" for key in misspelt_config_keys(cfg.model.config)]
    if unread:
        log.warning("settings to check (this run ignores them, or they train otherwise than they read): %s",
                    "; ".join(unread))  # fmt: skip


@released_on_error
def setup(cfg: Config) -> Run:
    """Builds a run, cheapest failures first: processes, the run folder's lock (one writer per folder), its
    checkpoints (refused under checkpoint.resume=false) and mesh, the parameter sharding check (before any
    data is read), tokenizer and data with reference caches, then the state (restored from the latest good
    checkpoint, or fresh), online rollouts, compiled steps and writers. With LoRA the state holds the
    adapters; the frozen base is loaded (or drawn) on every start."""
    maybe_initialize_distributed(cfg.distributed)
    agree_on_settings(cfg)
    warn_unranked(cfg)
    warn_unread(cfg)
    lock = lock_run_folder(cfg.train.output_dir)
    check_shared(cfg.train.output_dir, "train.output_dir")
    # checkpoint.dir outside the run folder has a writer at a time too (two runs sharing one deleted each
    # other's steps, and read half-written ones)
    ckpt.check_folder(cfg.checkpoint_dir)  # before a lock is made in it
    outside = not _inside(cfg.checkpoint_dir, cfg.train.output_dir)
    checkpoint_lock = lock_run_folder(cfg.checkpoint_dir) if outside else None
    if outside:
        check_shared(cfg.checkpoint_dir, "checkpoint.dir")
    manager = ckpt.make_manager(
        cfg.checkpoint_dir,
        keep_last=cfg.checkpoint.keep_last,
        keep_best=cfg.checkpoint.keep_best,
        best_metric=cfg.checkpoint.best_metric,
        best_mode=cfg.checkpoint.best_mode,
        async_save=cfg.checkpoint.async_save,
        async_timeout_s=cfg.checkpoint.async_timeout_s,
    )
    # every decision below reads the listing: the same on every process, or refused on all
    ckpt.agree_on_steps(cfg.checkpoint_dir, manager.all_steps())
    if not cfg.checkpoint.resume and (steps := manager.all_steps()):
        # starting over among them would rewrite the earlier run's metrics and config, keep its later steps
        # beside the new run's, and fail at the first step number they share
        raise ValueError(
            f"{cfg.checkpoint_dir} holds checkpoints of an earlier run (steps {', '.join(map(str, steps))}) "
            "and checkpoint.resume is false: use a new train.output_dir, delete those checkpoints, or resume"
        )
    # (step, meta, data position) of the latest checkpoint: a resume that changes what the run learns is
    # refused from its metadata alone, before a model is loaded or hashed
    latest = ckpt.latest_items(manager) if cfg.checkpoint.resume else None
    refusal = None
    if latest is not None:
        try:
            check_settings(cfg, cfg.checkpoint_dir, *latest[:2])
        except ValueError as e:
            refusal = e
    agreed(
        refusal, f"{cfg.checkpoint_dir}: another process's latest checkpoint was trained with other settings"
    )
    mesh = run_mesh(cfg)
    check_positions(cfg, model_config(cfg))
    graphdef, abstract_params = abstract_model(cfg)
    check_param_sharding(abstract_params, mesh, cfg.mesh.replication_tolerance)
    abstract_trained, abstract_frozen = split_trainable(abstract_params)
    tx = make_optimizer(cfg.optim, cfg.train.steps, compensated(cfg, manager))
    shardings = state_shardings(abstract_trained, tx, mesh)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    # before any model is loaded or hashed, and before the data and its reference caches
    online_pool, eval_pool_ = reward_pools(cfg, tokenizer)
    # A random-init policy has no folder to fingerprint: the caches are checked against its initial weights.
    # A LoRA run always needs its initial params: the frozen base.
    lora = cfg.lora.enabled
    initial = None if (cfg.model.path and not lora) or _reward_model(cfg) else init_params(cfg, mesh)
    reference = cfg.model.path or (None if initial is None else reference_of(graphdef, initial))
    base = None if _reward_model(cfg) else base_fingerprint(cfg, graphdef, initial)
    # a resume against another reference, or over other data, is refused before data and reference caches
    # are made for them
    refusal = None
    if latest is not None and base is not None:
        try:
            check_base(cfg, cfg.checkpoint_dir, *latest[:2], base)
        except ValueError as e:
            refusal = e
    agreed(
        refusal,
        f"{cfg.checkpoint_dir}: another process's latest checkpoint was trained against another reference",
    )
    if cfg.data.path or not cfg.rollout.every_n_steps:  # (refused when empty)
        batches = load_data(
            cfg, tokenizer, mesh, reference=reference, position=None if latest is None else latest[2]
        )
    else:  # online training from prompts alone
        slots = cfg.data.max_completions or cfg.rollout.num_completions
        batches = FreshOnly(cfg.data, slots, mesh=mesh, split_length=model_config(cfg).split_length)
    eval_batches = load_data(cfg, tokenizer, mesh, evaluation=True, reference=reference)

    frozen = NO_FROZEN if initial is None else split_trainable(initial)[1]
    online = None
    if cfg.rollout.every_n_steps:  # online mode: fresh samples join the logged data (copg_jax.rollout)
        # the initial params are the reference policy (copied before the first step donates them)
        initial = init_params(cfg, mesh) if initial is None else initial
        trained = split_trainable(initial)[0]
        online = OnlineRollouts(cfg, tokenizer, mesh, graphdef, trained, batches, frozen, online_pool)
    restored = None
    if cfg.checkpoint.resume:  # a step whose rollout state is damaged falls back like a damaged step

        def verify(r: ckpt.Restored) -> None:
            decode_interval(r.meta.get(OPEN_INTERVAL), r.step)
            if online is not None:
                online.restore(cfg.checkpoint_dir, r.step)

        restored = ckpt.restore_latest(
            manager, abstract_state(abstract_trained, tx, shardings), verify=verify
        )
    if restored is not None:
        if base is not None:
            check_base(cfg, cfg.checkpoint_dir, restored.step, restored.meta, base)
        if changes := check_settings(cfg, cfg.checkpoint_dir, restored.step, restored.meta):
            log.warning(
                "resuming step %d with changed settings (checkpoint.allow_changes): %s",
                restored.step,
                "; ".join(changes),
            )
        state = restored.state
        batches.set_state(restored.data)
        ckpt.set_aside_newer(manager, restored.step)  # corrupt newer steps would block saving their numbers
        log.info("resumed from %s at step %d", cfg.checkpoint_dir, restored.step)
    else:
        initial = init_params(cfg, mesh) if initial is None else initial
        state = init_state(split_trainable(initial)[0], tx, shardings)
    if cfg.eval_generation.enabled and initial is None:  # its reference: the initial policy
        initial = init_params(cfg, mesh)
    resumed = None if restored is None else restored.step
    on_main_process(f"write {cfg.train.output_dir}/config.yaml", lambda: write_config(cfg, resumed))

    peak, peak_source = peak_flops_per_device(cfg.train.peak_flops)
    log.info("MFU against %.3g FLOP/s per device (%s)", peak, peak_source)
    return Run(
        cfg=cfg,
        mesh=mesh,
        tokenizer=tokenizer,
        graphdef=graphdef,
        model_config=model_config(cfg),
        state=state,
        frozen=frozen,
        resumed_step=None if restored is None else restored.step,
        batches=batches,
        eval_batches=eval_batches,
        step_fn=jit_train_step(graphdef, tx, cfg, shardings, mesh, abstract_frozen),
        eval_fn=jax.jit(
            on_mesh(make_eval_step(graphdef, cfg), mesh),
            in_shardings=(param_shardings(abstract_params, mesh), batch_shardings(mesh)),
        ),
        manager=manager,
        writer=MetricsWriter(
            cfg.train.output_dir,
            start_step=0 if restored is None else restored.step,
            # logged at the starting step again: the rollout that follows a checkpoint (it is made after the
            # save), and a fresh run's evaluation by generation at step 0 (`train`)
            redone=("rollout/",) + (("eval_gen/",) if restored is None else ()),
        ),
        online=online,
        generation_eval=make_generation_eval(cfg, tokenizer, mesh, graphdef, initial, online, eval_pool_),
        peak_flops=peak,
        lock=lock,
        base=base,
        checkpoint_lock=checkpoint_lock,
        open_interval=[] if restored is None else decode_interval(restored.meta.get(OPEN_INTERVAL), resumed),
    )


# ------------------------------------------------------------------------------------------------ the loop


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient norm was not finite (train.on_nonfinite=error); nothing saved after it."""


class StopRequest:
    """SIGTERM / SIGINT: the loop checkpoints at the current step and returns.

    One process: a handler of both sets the flag. Several processes: the checkpoint is collective, so all must
    stop at the same step. SIGTERM (a scheduler's preemption notice, which may reach one process) is left to
    JAX's preemption sync service that `jax.distributed.initialize` starts: a notice on any process makes
    every process stop at the same agreed step (`multihost_utils.reached_preemption_sync_point`, asked every
    step). SIGINT goes the same way (its handler sends this process SIGTERM): Ctrl-C reaches the processes of
    a job at different points of their steps, and one may reach a process alone. Without that service
    (jax_enable_preemption_service off) both signals are handled per process.
    """

    def __init__(self):
        self.signal: str | None = None
        self.received: int | None = None
        self.synced = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        signals = (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT)
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def arrived(self) -> bool:
        """Whether a signal has come to this one process: a stop before the next update (a rollout, a
        compile or an update may outlast a grace period); several processes stop at `requested` alone."""
        return jax.process_count() == 1 and self.signal is not None

    def _handle(self, signum, frame):
        if self.synced:  # to JAX's preemption notifier: every process stops at the step they agree on
            self.received = signum
            signal.raise_signal(signal.SIGTERM)
        else:
            self.signal = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        """Whether to stop after update `step` (asked once per step, with the same steps on every process)."""
        if self.synced and multihost_utils.reached_preemption_sync_point(step):
            here = f"{signal.Signals(self.received).name} here" if self.received else "SIGTERM or SIGINT"
            self.signal = f"{here} (preemption sync point)"  # synced: only the sync point stops
        return self.signal is not None

    def restore(self) -> None:
        """Puts back the handlers this replaced."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)


STEP_METRICS = ("grad_norm", "lr", "tokens", "flops", "nonfinite", "skipped_updates")  # the rest: the loss's


def pooled_metrics(steps: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """One logged row for the updates `steps` (each a train step's metrics, host values): the loss's metrics
    pooled over the applied updates as over one batch (each mean weighted by its own count,
    `combine_metrics`), its counts per update (their mean), `grad_norm` their mean, and the last update's
    `lr` and `skipped_updates`. When every update was skipped (non-finite), the last one's values."""
    applied = [m for m in steps if not m["nonfinite"]] or steps[-1:]
    loss_keys = [k for k in applied[0] if k not in STEP_METRICS]
    stacked = {k: np.stack([np.asarray(m[k], np.float64) for m in applied]) for k in loss_keys}
    out = {k: float(v) for k, v in combine_metrics(stacked).items()}
    for k in loss_keys:
        if k.endswith("/count"):
            out[k] /= len(applied)
    out["grad_norm"] = float(np.mean([m["grad_norm"] for m in applied]))
    out.update(lr=float(steps[-1]["lr"]), skipped_updates=float(steps[-1]["skipped_updates"]))
    return out


class LogInterval:
    """The updates since the last log: their metrics (device values, read once at the log: `pooled_metrics`)
    and training time; rollouts, evaluation and saving are excluded from the time, and so is a run's first
    update (after a start or a resume), which compiles the step: the clock starts when it has run.

    `restored`: the updates (host values, `decode_interval`) of the interval a stopped run left open, saved
    with its checkpoint: the first row of the resumed run pools them as a straight run's row does (they are
    not timed here)."""

    def __init__(self, restored: list[dict[str, np.ndarray]] = ()):
        self.compiled = False
        self.reset()
        self.steps = list(restored)
        self.untimed = len(self.steps)  # a row of them alone (a stop before the first update) times nothing

    def reset(self) -> None:
        self.start, self.steps, self.untimed = time.perf_counter(), [], 0

    def add(self, metrics: Metrics) -> None:
        if not self.compiled and self.steps and set(self.steps[0]) != set(metrics):
            log.warning(  # a resume whose allowed changes (checkpoint.allow_changes) log other metrics
                "the %d updates the checkpoint kept for this row log other metrics than this run: not pooled",
                len(self.steps),
            )
            self.steps = []
        self.steps.append(metrics)
        if not self.compiled:  # the first update: wait for it (once), time the updates after it
            jax.block_until_ready(metrics)
            self.compiled, self.untimed, self.start = True, len(self.steps), time.perf_counter()

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def open(self) -> dict[str, Any]:
        """The interval's updates as JSON (`encode_interval`), for a checkpoint saved off the log grid."""
        return encode_interval(jax.device_get(self.steps))

    def report(self, peak: float) -> dict[str, float]:
        """The updates' pooled metrics and throughput since `reset` (device_get waits for them all); the
        throughput is NaN (null in metrics.jsonl) for an interval of the first update alone."""
        steps = jax.device_get(self.steps)
        timed = steps[self.untimed :]
        if not timed:
            return {
                **pooled_metrics(steps),
                **throughput(math.nan, math.nan, math.nan, peak, jax.device_count()),
            }
        tokens = float(np.mean([m["tokens"] for m in timed]))
        flops = float(np.mean([m["flops"] for m in timed]))
        seconds = (time.perf_counter() - self.start) / len(timed)
        return {**pooled_metrics(steps), **throughput(tokens, seconds, flops, peak, jax.device_count())}


def encode_interval(steps: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per-update metrics (host scalars) as JSON: {"dtypes": {name: dtype}, "updates": [{name: value}]}.
    Exact: a float32 or int value is a float64 (a JSON number, or NaN / Infinity) and back."""
    dtypes = {k: str(np.asarray(v).dtype) for k, v in steps[0].items()} if steps else {}
    return {"dtypes": dtypes, "updates": [{k: np.asarray(v).item() for k, v in m.items()} for m in steps]}


def decode_interval(encoded: Any, step: int) -> list[dict[str, np.ndarray]]:
    """The updates `encode_interval` wrote into the metadata of checkpoint `step` ([] for none: a step on
    the log grid, or saved before they were kept).

    Raises:
      CheckpointError: they do not read back (an edited metadata item): the resume falls back a step.
    """
    if encoded is None:
        return []
    try:
        dtypes = {k: jnp.dtype(v) for k, v in encoded["dtypes"].items()}
        steps = []
        for update in encoded["updates"]:
            if set(update) != set(dtypes) or not all(type(v) in (int, float, bool) for v in update.values()):
                raise ValueError(f"an update with metrics {sorted(update)} of types other than numbers")
            steps.append({k: np.asarray(v, dtypes[k]) for k, v in update.items()})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ckpt.CheckpointError(
            f"metadata of step {step}: its {OPEN_INTERVAL!r} does not read ({type(e).__name__}: {e})"
        ) from None
    return steps


class FiniteGuard:
    """Remembers each step's non-finite flag and batch (`describe_next`) until `check` reads them (one device
    read per check, not per step). With on_nonfinite="error" the first bad step raises NonFiniteError."""

    def __init__(self, mode: str):
        self.mode, self.pending = mode, []

    def add(self, step: int, flag: jax.Array, position: str) -> None:
        self.pending.append((step, flag, position))

    def check(self, last_checkpoint: int | None) -> None:
        flags = jax.device_get([flag for _, flag, _ in self.pending])
        bad = [
            (step, position) for (step, _, position), flag in zip(self.pending, flags, strict=True) if flag
        ]
        self.pending = []
        for step, position in bad:
            if self.mode == "error":
                kept = (
                    "none saved yet"
                    if last_checkpoint is None
                    else f"latest checkpoint: step {last_checkpoint}"
                )
                raise NonFiniteError(
                    f"step {step}: non-finite loss or gradient norm on {position}; the update was not "
                    f"applied and nothing was saved after it ({kept}). train.on_nonfinite=skip drops such "
                    "batches instead"
                )
            log.warning("step %d: non-finite loss or gradient; %s skipped", step, position)


def show(bar: tqdm | None, metrics: dict[str, float]) -> None:
    """Loss, learning rate and the reward of generations (when measured) on the progress bar."""
    shown = {"loss": ".4g", "lr": ".2e", "eval_gen/reward": ".4g", "eval_gen/kl": ".3g"}
    if bar is not None:
        bar.set_postfix(
            {k.removeprefix("eval_gen/"): f"{metrics[k]:{f}}" for k, f in shown.items() if k in metrics}
        )


def _due(every: int, step: int, last: int) -> bool:
    return bool(every and step % every == 0) or step == last


def next_microbatches(run: Run, step: int, params: nnx.State, interval: LogInterval) -> list[ScoredBatch]:
    """The host batches of update `step + 1`: from the data iterator, or (online) after a rollout when one
    is due, mixing buffer and logged data (rollout time is not `interval`'s training time)."""
    accum = run.cfg.optim.grad_accum_steps
    if run.online is None:
        return [next(run.batches) for _ in range(accum)]
    start = time.perf_counter()
    micro = run.online.next_batches(step, params, accum, run.writer)
    interval.exclude(time.perf_counter() - start)
    return micro


def log_step(run: Run, step: int, interval: LogInterval, stopped: bool = False) -> dict[str, float]:
    """Writes at `step` the metrics of the updates since the last log (`pooled_metrics`) and their
    throughput; returns them. `stopped`: a row of a stop off the log grid, marked so (`MetricsWriter.write`):
    the run resumed from its checkpoint logs those updates again in its first row, and drops this one."""
    values = interval.report(run.peak_flops)
    run.writer.write(step, values, stopped=stopped)
    interval.reset()
    return values


def run_eval(run: Run, state: TrainState, step: int) -> dict[str, float]:
    """Eval metrics of `state` on the eval data (written at `step`); {} without eval data."""
    if run.eval_batches is None:
        return {}
    run.eval_batches.set_state({"epoch": 0, "index": 0})
    metrics = evaluate(run.eval_fn, run.params(state), run.eval_batches, run.mesh, run.cfg.train.eval_batches)
    run.writer.write(step, metrics)
    return metrics


def run_generation_eval(run: Run, state: TrainState, step: int) -> dict[str, float]:
    """`eval_gen/*` metrics of the policy `state` holds (written at `step`); {} when not configured."""
    if run.generation_eval is None:
        return {}
    metrics = run.generation_eval(nnx.merge(run.graphdef, run.params(state)))
    run.writer.write(step, metrics)
    return metrics


def save(
    run: Run,
    state: TrainState,
    step: int,
    metrics: dict[str, float] | None = None,
    open_interval: dict[str, Any] | None = None,
) -> None:
    """Checkpoints `state` at `step` with the data position (and, online, the rollout state first: a listed
    checkpoint always has its rollout state). `open_interval`: the updates since the last row on the log
    grid (`LogInterval.open`) of a stop off it, for the resumed run's next row."""
    best = run.cfg.checkpoint.best_metric
    if run.cfg.checkpoint.keep_best and metrics and best.split("/")[0] in {k.split("/")[0] for k in metrics}:
        if best not in metrics:  # checkpoints would be ranked by nothing, the best deleted as the worst
            raise ValueError(
                f"checkpoint.best_metric={best!r} is not among the evaluation metrics "
                f"{sorted(k for k in metrics if k.startswith(best.split('/')[0] + '/'))}; fix it and resume"
            )
    meta = {
        "config": run.cfg.train.output_dir,
        "model_type": run.model_config.model_type,
        SETTINGS: settings_of(run.cfg),
    }
    if run.base is not None:
        meta[LORA_BASE if run.cfg.lora.enabled else REFERENCE] = run.base
    if open_interval:
        meta[OPEN_INTERVAL] = open_interval
    if run.online is not None:
        run.online.save(run.cfg.checkpoint_dir, step, run.manager.all_steps())
    ckpt.save(run.manager, step, state, run.batches.get_state(), meta, metrics=metrics)
    if run.online is not None:  # the file of a checkpoint this save dropped
        run.online.prune(run.cfg.checkpoint_dir, run.manager.all_steps())
    run.writer.flush()


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves behind: final step, why it stopped, last metrics, and where things are."""

    step: int
    interrupted: bool
    metrics: dict[str, float]
    run_dir: str
    checkpoint_dir: str
    signal: str | None = None
    """The signal that stopped an interrupted run ("SIGTERM", "SIGINT", "... (preemption sync point)"); None
    when it finished or stopped at `stop_after`."""


def agree_on_stop(stop_after: int | None) -> None:
    """Refuses, on every process together, a run whose processes stop at different updates (`--stop-after`,
    outside the config that `agree_on_settings` compares): the one stopping waited in the save's barrier
    while the others waited for it in their next update, for good. Every process calls it at the same point.

    Raises:
      ValueError: naming each process's stop.
    """
    stops = gather_ints(-1 if stop_after is None else stop_after)
    if len(set(stops)) > 1:
        raise ValueError(
            "the processes were started with different --stop-after ("
            + ", ".join(f"process {i}: {s if s >= 0 else 'none'}" for i, s in enumerate(stops))
            + "): every process of a run needs the same command line"
        )


def train(cfg: Config, *, stop_after: int | None = None) -> TrainResult:
    """Trains `cfg.train.steps` updates (resuming from the latest good checkpoint of the run).

    SIGTERM / SIGINT stop the loop after the current update with a checkpoint (on every process at the same
    update: `StopRequest`), as does reaching update `stop_after` (counted from the run's start, resumed
    updates included; used to simulate an interruption). A non-finite update stops the run
    (NonFiniteError) before anything is saved after it, or is skipped and counted (train.on_nonfinite).
    """
    run = setup(cfg)
    stop = StopRequest()
    bar = None
    try:
        agree_on_stop(stop_after)
        state, last_metrics, interrupted = run.state, {}, False
        step = int(jax.device_get(state.step))
        if cfg.train.progress and run.is_main:
            # a log file (no terminal) gets a line a minute, not ten a second for the length of the run
            every = 0.1 if sys.stderr.isatty() else 60.0
            bar = tqdm(
                total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=every
            )
        if run.resumed_step is None and cfg.eval_generation.at_start:  # the start of the reward curve
            last_metrics = run_generation_eval(run, state, step)
            show(bar, last_metrics)
        interval, guard = LogInterval(run.open_interval), FiniteGuard(cfg.train.on_nonfinite)
        eval_metrics = None  # the last evaluation's: a stop after it saves them, to rank its checkpoint
        # resumed at or past `stop_after` already: nothing to train (it trained one more update)
        interrupted = stop_after is not None and step >= stop_after and step < cfg.train.steps
        if interrupted and interval.steps:  # the stopped row this run's start dropped: written again
            last_metrics = {**last_metrics, **log_step(run, step, interval, stopped=True)}
        while step < cfg.train.steps and not interrupted:
            if stop.arrived():  # during an evaluation or a save: stop now, not after one more update
                if run.manager.latest_step() != step:
                    guard.check(run.manager.latest_step())
                    open_interval = None
                    if interval.steps:  # `step` is off the log grid (its updates would have been logged)
                        open_interval = interval.open()
                        last_metrics = {**last_metrics, **log_step(run, step, interval, stopped=True)}
                    save(run, state, step, eval_metrics, open_interval)
                elif interval.steps:  # before this run's first update: the kept updates' row, written again
                    last_metrics = {**last_metrics, **log_step(run, step, interval, stopped=True)}
                interrupted = True
                log.warning("stopping at step %d (%s); checkpoint saved", step, stop.signal)
                break
            position = run.batches.describe_next()
            batch = stack_to_device(next_microbatches(run, step, state.params, interval), run.mesh)
            state, metrics = run.step_fn(state, batch, run.frozen)
            step += 1
            interval.add(metrics)
            guard.add(step, metrics["nonfinite"], position)
            eval_now = _due(cfg.train.eval_every, step, cfg.train.steps)
            generate_now = _due(cfg.eval_generation.every_steps, step, cfg.train.steps)
            save_now = _due(cfg.checkpoint.every_steps, step, cfg.train.steps)
            stopping = stop.requested(step) or (stop_after is not None and step >= stop_after)
            # a checkpoint's updates are all logged: a run resumed from it logs the rows a straight run does.
            # A stop off that grid logs its open interval too (no update of a stopped run goes unlogged), in
            # a row marked `stopped`, and saves the interval's updates for the resumed run's next row
            on_grid = _due(cfg.train.log_every, step, cfg.train.steps) or save_now
            if on_grid or eval_now or generate_now or stopping:
                guard.check(run.manager.latest_step())
            open_interval = None if on_grid or not stopping else interval.open()
            if on_grid or stopping:
                last_metrics = {**last_metrics, **log_step(run, step, interval, stopped=not on_grid)}
            paused = time.perf_counter()
            eval_metrics = {
                **(run_eval(run, state, step) if eval_now else {}),
                **(run_generation_eval(run, state, step) if generate_now else {}),
            } or None
            last_metrics = {**last_metrics, **(eval_metrics or {})}
            if on_grid or stopping or eval_metrics:
                show(bar, last_metrics)
            if bar is not None:
                bar.update(1)
            if save_now or (stopping and run.manager.latest_step() != step):
                save(run, state, step, eval_metrics, open_interval)
            interval.exclude(time.perf_counter() - paused)  # evaluation and saving are not training time
            if stopping and step < cfg.train.steps:  # a stop at the last update exports: training is done
                interrupted = True
                log.warning("stopping at step %d (%s); checkpoint saved", step, stop.signal or "step limit")
                break
        ckpt.wait_until_finished(run.manager)
        if run.online is not None:  # the files of checkpoints dropped by the last saves
            run.online.prune(cfg.checkpoint_dir, run.manager.all_steps())
        if not interrupted and cfg.train.export_on_finish:
            # every process joins the gathers of sharded params; only process 0 writes the tokenizer
            out = paths.join(cfg.train.output_dir, "export")
            tokenizer = run.tokenizer if run.is_main else None
            export_params(
                run.graphdef,
                run.params(state),
                out,
                tokenizer,
                chat_template=cfg.data.chat_template,
                chat_template_kwargs=cfg.data.chat_template_kwargs,
                eos_token=cfg.data.eos_token,
                base_model=cfg.model.path,
            )
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        run.close()
    by = stop.signal if interrupted else None
    return TrainResult(step, interrupted, last_metrics, cfg.train.output_dir, cfg.checkpoint_dir, by)


# ----------------------------------------------------------------------------------- checkpoints of runs


def _in_place(out: str) -> bool:
    """Whether local folder `out` (a real path) must be replaced in place rather than renamed: a mount point
    or a folder on another device than its parent (a rename across them fails), or the working directory or
    one above it (renamed away, the process would lose its working directory)."""
    if not os.path.isdir(out):
        return False
    cwd = os.path.realpath(os.getcwd())
    parent = os.path.dirname(out)
    moved = os.path.ismount(out) or os.stat(out).st_dev != os.stat(parent).st_dev
    return moved or cwd == out or cwd.startswith(out.rstrip(os.sep) + os.sep)


def _export_staging(out_dir: str) -> str:
    """The local folder an export to `out_dir` is written in before it takes `out_dir`'s place: beside a local
    `out_dir` (renamed into place, `_replace_folder`), inside it where it is replaced in place (`_in_place`),
    beside a URL's staging folder (uploaded)."""
    local = os.path.realpath(paths.staging_dir(out_dir))
    if not paths.is_url(out_dir) and _in_place(local):
        return os.path.join(local, ".copg-export")
    return os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.copg-export")


class ExportBusy(OSError):
    """Another export to the same folder is being written; the message names its process."""


def _lock_export(staging: str, out_dir: str) -> int:
    """Takes the exclusive lock of the export to `out_dir` staged in local folder `staging`: an flock on the
    file `<staging>.lock`, which records the writer (pid, host). Two exports to one folder at once would write
    in one staging folder, each removing or renaming the other's files (a model mixing both). Returns the
    lock's file descriptor (`_unlock_export`).

    Raises:
      ExportBusy: another export to `out_dir` holds it.
    """
    path = staging + ".lock"
    fd, held = exclusive_flock(path)
    if not held:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ExportBusy(
            f"another export to {out_dir} is being written ({holder}; lock {path}): "
            "wait for it to finish or export to another folder"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def _unlock_export(staging: str, fd: int) -> None:
    """Releases `_lock_export`'s lock: removes the file before dropping the flock."""
    try:
        os.unlink(staging + ".lock")
    except FileNotFoundError:
        pass
    os.close(fd)


def _check_export_folder(out_dir: str, base_model: str) -> None:
    """Refuses an export folder that is a file, the base model's folder or a run folder (before any gather).

    Raises:
      ValueError / NotADirectoryError naming the folder.
    """
    if paths.exists(out_dir) and not paths.isdir(out_dir):
        raise NotADirectoryError(f"export folder {out_dir} is a file")
    if paths.isfile(paths.join(out_dir, "config.yaml")) or paths.isdir(paths.join(out_dir, "checkpoints")):
        raise ValueError(f"{out_dir} is a run folder: export to another folder (its export/, say)")
    both = not paths.is_url(out_dir) and not paths.is_url(base_model) and os.path.isdir(out_dir)
    if both and os.path.isdir(base_model) and os.path.samefile(out_dir, base_model):
        raise ValueError(f"{out_dir} is the base model's folder: export to another folder")


def _fresh_folder(folder: str) -> None:
    """Makes local `folder` empty (a leftover of an export stopped midway removed) and checks a file can be
    written in it.

    Raises:
      OSError: it cannot be made or written in.
    """
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".copg-write-check-"):
        pass


def _replace_folder(staged: str, out: str) -> None:
    """Puts the export written in local folder `staged` in local folder `out`'s place. The files of `out`
    that are no model's (a model card, notes: `is_model_file`) move into it first; the earlier model's go.
    A rename: a failing export leaves the earlier one whole, never a folder mixing two models' files. A
    `staged` inside `out` (`_in_place`), or an `out` that cannot be renamed, has its model files removed and
    the new ones moved in once they are all written."""
    if not os.path.lexists(out):
        os.rename(staged, out)
        return
    if os.path.dirname(staged) == out:
        _move_in(staged, out)
        return
    kept = sorted(n for n in os.listdir(out) if not is_model_file(n) and not os.path.lexists(Path(staged, n)))
    for name in kept:
        os.rename(Path(out, name), Path(staged, name))
    if kept:
        log.info("%s: kept %s beside the export", out, kept)
    old = _export_staging(out).replace(".copg-export", ".copg-replaced")
    shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(out, old)
    except OSError:  # a busy folder: replaced in place (the kept files back with the new ones)
        _move_in(staged, out)
        return
    os.rename(staged, out)
    replaced = sorted(n for n in os.listdir(old) if is_model_file(n))
    shutil.rmtree(old)
    if replaced:
        log.warning("%s: replaced the files of an earlier model: %s", out, replaced)


def _move_in(staged: str, out: str) -> None:
    """Removes the model files of `out` and moves in those of `staged` (on `out`'s device), then `staged`."""
    remove_model_files(out)
    for name in os.listdir(staged):
        os.rename(Path(staged, name), Path(out, name))
    os.rmdir(staged)


def export_params(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    out_dir: str | Path,
    tokenizer=None,
    *,
    chat_template=False,
    chat_template_kwargs=None,
    eos_token: str = "",
    base_model: str = "",
) -> str:
    """Writes the model (params merged into the model graph) as an HF folder, with the tokenizer if given:
    a policy as *ForCausalLM, a reward model as *ForSequenceClassification (`chat_template`,
    `chat_template_kwargs`, `eos_token`: how its training sequences were tokenised, the data.* settings).
    `base_model` is the folder the policy was fine-tuned from ("" for a random-init one): its generation and
    processor settings are kept, and a multimodal base's export is a multimodal folder (`save_pretrained`'s
    `base`). A LoRA policy is written twice: merged (W + alpha / r A B) in `out_dir`, and its adapter alone in
    PEFT's format in `out_dir/adapter` (recording `base_model` as base_model_name_or_path).

    The export is written in a fresh local folder beside `out_dir` (`_export_staging`) that then replaces
    it (`_replace_folder`; a URL: its model files removed and the folder uploaded), so an earlier model's
    files (its tokenizer, chat template, generation settings, adapter) are never read with the new weights
    and a failed export leaves the earlier one as it was (a URL's: only until the upload, which removes its
    model files first). Every process gathers the params; process 0 alone writes (on a shared file system
    the processes' writes removed each other's files).

    Raises:
      ValueError / NotADirectoryError: `out_dir` is a file, a run folder or the base model's folder.
      ExportBusy: another export to `out_dir` is being written (`_lock_export`).
      OSError: writing failed (naming `out_dir`).
    """
    out_dir = paths.normal(out_dir)
    shown = out_dir  # a link: its folder is written
    out_dir = out_dir if paths.is_url(out_dir) else os.path.realpath(out_dir)
    write = jax.process_index() == 0
    local = _export_staging(out_dir)

    held = contextlib.ExitStack()  # process 0's lock of the export (`_lock_export`), released at the end

    def prepare() -> None:
        _check_export_folder(out_dir, base_model)
        lock = _lock_export(local, out_dir)
        held.callback(_unlock_export, local, lock)
        _fresh_folder(local)

    with held:
        # before the gathers: process 0 failing to write between two of them had left the others waiting
        # in the next one
        on_main_process(f"make the export folder {local}", prepare)
        model = nnx.merge(graphdef, params)
        lora = not isinstance(model, ScoreModel) and model.lora_spec is not None
        # this process's first failure (process 0's write: a full disk): it still joins the later saves'
        # gathers, then every process raises together
        failed: list[Exception] = []

        def gathered(fn: Callable, *args, **kwargs) -> None:
            """`fn(*args, **kwargs, write=...)`: gathers on every process, writes on process 0 until a write
            there fails (each save joins all of its own gathers first, `write_safetensors`)."""
            try:
                fn(*args, **kwargs, write=write and not failed)
            except Exception as e:  # noqa: BLE001 - raised below, once every process is past the gathers
                failed.append(e)

        if isinstance(model, ScoreModel):
            pad = end = None
            if tokenizer is not None:
                pad, end = tokenizer.pad_token_id, end_token_id(tokenizer, eos_token)
            gathered(
                save_reward_model,
                model,
                local,
                chat_template=chat_template,
                eos_token=eos_token,
                pad_token_id=pad,
                end_token_id=end,
                chat_template_kwargs=chat_template_kwargs,
            )
        else:
            gathered(save_pretrained, merge_adapters(model), local, base=base_model)
            if lora:
                gathered(save_peft_adapter, model, Path(local) / ADAPTER_DIR, base_model)

        if failed and write:
            shutil.rmtree(local, ignore_errors=True)
            e = failed[0]
            if isinstance(e, OSError) and not any(
                p in f"{e} {e.filename}" for p in (out_dir, local)
            ):  # ENOSPC
                failed[0] = type(e)(f"exporting to {out_dir} failed: {e}")
                failed[0].__cause__ = e
        error = error_everywhere(
            failed[0] if failed else None,
            lambda where: OSError(
                f"exporting to {out_dir} failed on process(es) {where} (their logs say why)"
            ),
        )
        if error is not None:
            raise error

        def finish() -> None:
            try:
                if tokenizer is not None:
                    tokenizer.save_pretrained(local)
                if not paths.is_url(out_dir):
                    _replace_folder(local, out_dir)
                    return
                remove_model_files(out_dir)  # an earlier model's files there would be read with the new ones
                paths.upload(local, out_dir)
            finally:
                shutil.rmtree(local, ignore_errors=True)

        on_main_process(f"write the export {out_dir}", finish)
    return shown


def restore_params(cfg: Config, directory: str | Path, mesh: Mesh, step: int | None = None):
    """(graphdef, params, step) of a run's checkpoint (latest good one unless `step`), onto `mesh`: the whole
    model's params (with LoRA, the checkpoint's adapters and the base loaded as `init_params` loads it).

    Raises:
      CheckpointError: no readable checkpoint in `directory`.
      ValueError: a LoRA checkpoint whose adapters were trained on another base (`check_base`).
    """
    manager = ckpt.make_manager(directory, read_only=True, async_save=False)
    try:
        tx = make_optimizer(cfg.optim, cfg.train.steps, compensated(cfg, manager, step))
        graphdef, abstract_params = abstract_model(cfg)
        abstract_trained, _ = split_trainable(abstract_params)
        shardings = state_shardings(abstract_trained, tx, mesh)
        restored = ckpt.restore_latest(manager, abstract_state(abstract_trained, tx, shardings), step)
    finally:
        manager.close()
    if restored is None:
        raise ckpt.CheckpointError(f"no checkpoint in {directory}")
    if not cfg.lora.enabled:
        return graphdef, restored.state.params, restored.step
    initial = init_params(cfg, mesh)
    check_base(cfg, str(directory), restored.step, restored.meta, base_fingerprint(cfg, graphdef, initial))
    return graphdef, nnx.merge_state(split_trainable(initial)[1], restored.state.params), restored.step


def _checkpoint_dir(path: str) -> str:
    """A run folder's checkpoint folder, or `path` itself when it is one."""
    return paths.join(path, "checkpoints") if paths.isdir(paths.join(path, "checkpoints")) else path


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> tuple[str, int]:
    """Exports a run's checkpoint (latest good one unless `step`) as an HF folder with the tokenizer (a LoRA
    run's merged, with its PEFT adapter in `out_dir/adapter`: `export_params`)."""
    run_dir = paths.normal(run_dir)
    if not paths.isfile(paths.join(run_dir, "config.yaml")):
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_run_config(paths.join(run_dir, "config.yaml"))
    directory = cfg.checkpoint.dir or _checkpoint_dir(run_dir)
    mesh = run_mesh(cfg)
    graphdef, params, step = restore_params(cfg, directory, mesh, step)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    out = export_params(
        graphdef,
        params,
        out_dir,
        tokenizer,
        chat_template=cfg.data.chat_template,
        chat_template_kwargs=cfg.data.chat_template_kwargs,
        eos_token=cfg.data.eos_token,
        base_model=cfg.model.path,
    )
    return out, step


def evaluate_checkpoint(
    cfg: Config, checkpoint: str | Path = "", step: int | None = None
) -> dict[str, float]:
    """Eval metrics of a checkpoint (run folder or checkpoint folder; "" = the config's) or an exported HF
    folder: the losses' metrics on the config's eval data (`data.eval_path`; its reference cache computed if
    missing) and, when `eval_generation` has a reward, the `eval_gen/*` metrics of its generations (the
    reference being `model.path` or the seeded random init). A LoRA run's exported folder is a plain model:
    its reference log-probs then come from the cache of that base, as without LoRA."""
    mesh = run_mesh(cfg)
    path = paths.normal(checkpoint) if checkpoint else cfg.checkpoint_dir
    if not (cfg.data.eval_path or cfg.eval_generation.enabled):
        raise ValueError(
            "nothing to evaluate: set data.eval_path (eval data) and/or eval_generation.reward (evaluation "
            "by generation)"
        )
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    pool = reward_pools(cfg, tokenizer, online=False)[1]  # before the model and the evaluation data
    if paths.isfile(paths.join(path, "config.json")):  # an exported HF model
        if step is not None:
            raise ValueError(f"--step {step}: {path} is an exported model (one set of weights), not a run")
        cfg = dataclasses.replace(cfg, lora=LoRASection())
        model = from_pretrained(path, mesh=mesh, **_model_kwargs(cfg))
        graphdef, params = nnx.split(model, nnx.Param)
        where = {"checkpoint": str(path)}
    else:
        graphdef, params, step = restore_params(cfg, _checkpoint_dir(path), mesh, step)
        where = {"checkpoint": str(path), "step": step}
    metrics = {}
    batches = load_data(cfg, tokenizer, mesh, evaluation=True)
    if batches is not None:
        shardings = param_shardings(params, mesh)
        eval_fn = jax.jit(
            on_mesh(make_eval_step(graphdef, cfg), mesh), in_shardings=(shardings, batch_shardings(mesh))
        )
        metrics.update(evaluate(eval_fn, params, batches, mesh, cfg.train.eval_batches))
    if cfg.eval_generation.enabled:
        evaluator = make_generation_eval(cfg, tokenizer, mesh, graphdef, init_params(cfg, mesh), None, pool)
        metrics.update(evaluator(nnx.merge(graphdef, params)))
    return {**metrics, **where}
