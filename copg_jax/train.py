"""The CoPG update: TrainState, a pure jitted `train_step`, and the training loop around it.

`train_step(state, batch)` maps a TrainState and a ScoredBatch whose leaves carry a leading microbatch
axis [M, ...] to the next state and scalar metrics: policy log-probs of every completion, the [B, K] loss,
gradients accumulated over the M microbatches with `lax.scan`, global-norm clipping and an AdamW update.
Parameters stay float32 (the master copy); the step casts them to the compute dtype before the forward pass,
so gradients come back float32. Everything with side effects (data, logging, checkpoints, signals) lives
in `train`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from copg_jax import checkpoint as ckpt
from copg_jax.batch import ScoredBatch, TokenBatch
from copg_jax.logprobs import sequence_logprobs
from copg_jax.losses import get_loss
from copg_jax.models import Decoder, ModelConfig, from_config, from_pretrained, param_shardings
from copg_jax.run_config import Config, OptimSection
from copg_jax.sharding import logical_sharding

log = logging.getLogger(__name__)

Metrics = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything an update changes; a pytree (the model's graph definition is kept apart, static).

    Attributes:
      params: nnx.State of the policy's nnx.Param leaves, in param_dtype (float32 master weights).
      opt_state: optax state of the optimizer.
      step: [] int32 updates applied so far.
      rng: [2] uint32 raw PRNG key, advanced once per update.
    """

    params: nnx.State
    opt_state: Any
    step: jax.Array
    rng: jax.Array


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


def make_optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if max_grad_norm > 0), then AdamW without decay on 1-D params (norms, biases)."""
    adamw = optax.adamw(
        make_schedule(optim, total_steps),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )
    if optim.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), adamw)
    return adamw


# ------------------------------------------------------------------------------------------------ the step


def loss_weight(name: str, mask: jax.Array, metrics: Metrics) -> jax.Array:
    """The count a loss averages over (prompts, pairs or samples), so that microbatch losses combine into
    exactly the loss of the whole batch: sum_m w_m L_m / sum_m w_m.

    Args:
      name: loss name (copg_jax.losses.LOSSES).
      mask: [B, K] bool completion mask.
      metrics: the loss's metrics (pairwise losses report their pair count).
    """
    count = jnp.sum(mask, axis=-1)
    if name == "copg":
        return jnp.sum(count >= 2).astype(jnp.float32)
    if name in ("ipo", "dpo"):
        return metrics["pairs/count"].astype(jnp.float32)
    if name == "offpolicy_pg_loo":
        return jnp.sum(jnp.where(count >= 2, count, 0)).astype(jnp.float32)
    return jnp.sum(mask).astype(jnp.float32)


def make_loss_fn(graphdef: nnx.GraphDef, cfg: Config) -> Callable:
    """(params, ScoredBatch) -> (loss, (metrics, weight)) for one microbatch (leaves without the M axis)."""
    loss, compute_dtype = cfg.loss, jnp.dtype(cfg.model.dtype)
    loss_fn = get_loss(loss.name)

    def fn(params: nnx.State, batch: ScoredBatch):
        params = jax.tree.map(
            lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
        )
        model = nnx.merge(graphdef, params)
        b, k = batch.rewards.shape
        _, seq_logps, _ = sequence_logprobs(model, batch.tokens, b * k, head_remat=cfg.model.head_remat)
        policy_logps = seq_logps.reshape(b, k).astype(jnp.float32)
        with jax.named_scope("loss"):
            value, metrics = loss_fn(
                policy_logps,
                batch.ref_logps,
                batch.rewards,
                batch.completion_mask,
                loss.beta,
                lengths=batch.completion_lengths,
                length_average=loss.length_average,
            )
        return value, (metrics, loss_weight(loss.name, batch.completion_mask, metrics))

    return fn


def _combine(metrics: Metrics, weights: jax.Array) -> Metrics:
    """Weighted mean over the microbatch axis (counts are summed)."""
    total = jnp.maximum(jnp.sum(weights), 1e-30)
    return {
        k: jnp.sum(v) if k.endswith("/count") else jnp.sum(v * weights) / total for k, v in metrics.items()
    }


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: Config) -> Callable:
    """The pure update `(TrainState, ScoredBatch [M, ...]) -> (TrainState, metrics)`."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True)
    schedule = make_schedule(cfg.optim, cfg.train.steps)

    def train_step(state: TrainState, batch: ScoredBatch) -> tuple[TrainState, Metrics]:
        if batch.rewards.shape[0] == 1:  # one microbatch: no weighting, no scan
            (_, (metrics, _)), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch))
        else:

            def accumulate(carry, micro):
                grad_sum, weight_sum = carry
                (_, (metrics, weight)), grads = grad_fn(state.params, micro)
                grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
                return (grad_sum, weight_sum + weight), (metrics, weight)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grad_sum, weight_sum), (metrics, weights) = jax.lax.scan(accumulate, (zeros, 0.0), batch)
            grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1e-30), grad_sum)
            metrics = _combine(metrics, weights)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": jnp.sum(batch.tokens.segment_ids != 0).astype(jnp.float32),
        }
        rng = jax.random.split(state.rng)[0]
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, cfg: Config) -> Callable:
    """`(params, ScoredBatch [1, ...]) -> metrics` (including "weight", for averaging over batches)."""
    loss_fn = make_loss_fn(graphdef, cfg)

    def eval_step(params: nnx.State, batch: ScoredBatch) -> Metrics:
        _, (metrics, weight) = loss_fn(params, jax.tree.map(lambda x: x[0], batch))
        return {**metrics, "weight": weight}

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
    """Shardings of the TrainState: params per their logical axes, optimizer state as XLA lays out
    `tx.init` of those params (moments follow their parameter), step and rng replicated."""
    params = param_shardings(abstract_params, mesh)
    shaped = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, params
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = jax.jit(tx.init).lower(shaped).compile().output_shardings
    # leaves that depend on no input (step counters) come back on one device: replicate them on the mesh
    opt = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated, opt)
    return TrainState(params=params, opt_state=opt, step=replicated, rng=replicated)


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
        **{
            f: np.stack([np.asarray(getattr(b, f)) for b in batches])
            for f in ("rewards", "completion_mask", "ref_logps", "completion_lengths")
        },
    )
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, x), stacked, batch_shardings(mesh)
    )


# -------------------------------------------------------------------------------------------- model + state


def model_config(cfg: Config) -> ModelConfig:
    """The policy's ModelConfig, from the HF folder or the inline config."""
    from copg_jax.models import load_config

    return load_config(cfg.model.path) if cfg.model.path else ModelConfig.from_hf(cfg.model.config)


def _model_kwargs(cfg: Config) -> dict:
    return dict(
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
    )


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, abstract params) of the policy, without allocating it."""
    mcfg = model_config(cfg)
    model = nnx.eval_shape(lambda: Decoder(mcfg, rngs=nnx.Rngs(0), **_model_kwargs(cfg)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def init_params(cfg: Config, mesh: Mesh) -> nnx.State:
    """Initial policy params on `mesh`: read from `model.path`, or random (seed `train.seed`)."""
    if cfg.model.path:
        model = from_pretrained(cfg.model.path, mesh=mesh, **_model_kwargs(cfg))
    else:
        model = from_config(model_config(cfg), rngs=nnx.Rngs(cfg.train.seed), mesh=mesh, **_model_kwargs(cfg))
    return nnx.split(model, nnx.Param)[1]


def init_state(
    params: nnx.State, tx: optax.GradientTransformation, shardings: TrainState, seed: int
) -> TrainState:
    """A fresh TrainState (step 0) around `params`, laid out per `shardings`."""

    def make(params):
        rng = jax.random.key_data(jax.random.key(seed))
        return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng)

    return jax.jit(make, out_shardings=shardings)(params)


def abstract_state(abstract_params: nnx.State, tx, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the TrainState, to restore a checkpoint onto."""
    shapes = jax.eval_shape(
        lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32), jnp.zeros((2,), jnp.uint32)),
        abstract_params,
    )
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def jit_train_step(graphdef, tx, cfg: Config, shardings: TrainState, mesh: Mesh) -> Callable:
    """`train_step` jitted with state/batch shardings and the state donated."""
    return jax.jit(
        make_train_step(graphdef, tx, cfg),
        in_shardings=(shardings, batch_shardings(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def evaluate(
    eval_step: Callable, params: nnx.State, batches: Iterator[ScoredBatch], mesh: Mesh, limit: int = 0
) -> dict:
    """Eval metrics averaged over batches (weighted by each batch's loss count), named "eval/<metric>"."""
    sums: dict[str, float] = {}
    total = 0.0
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        metrics = jax.device_get(eval_step(params, stack_to_device([batch], mesh)))
        weight = float(metrics.pop("weight"))
        total += weight
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + (float(v) if k.endswith("/count") else float(v) * weight)
    return {f"eval/{k}": (v if k.endswith("/count") else v / max(total, 1e-30)) for k, v in sums.items()}


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the current step and returns."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        self.signal = signum


# ------------------------------------------------------------------------------------------------ the loop


def load_data(cfg: Config, tokenizer, mesh: Mesh, *, evaluation: bool = False, reference=None):
    """The train (or eval) DataIterator with cached reference log-probs; None when no eval data is set.

    `reference` is what the cache is checked against: the reference model's HF folder (default
    `model.path`) or, for a random-init model, the initial model itself.
    """
    from copg_jax.data.pipeline import DataIterator
    from copg_jax.data.refcache import open_ref_cache
    from copg_jax.data.tokenize import tokenize_dataset

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
    data = tokenize_dataset(data_cfg, tokenizer, path, split)
    reference = reference if reference is not None else cfg.model.path or None
    ref = open_ref_cache(cache, data, reference=reference) if cache else None
    if ref is None:
        which = "data.eval_ref_cache" if evaluation else "data.ref_cache"
        raise ValueError(
            f"{which} is not set: run `copg precompute-ref --config ...` first (reference log-probs)"
        )
    if evaluation:
        return DataIterator(data, data_cfg, ref=ref, mesh=mesh, repeat=False, drop_last=False, shuffle=False)
    return DataIterator(data, data_cfg, ref=ref, mesh=mesh)


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves behind: final step, why it stopped, last metrics, and where things are."""

    step: int
    interrupted: bool
    metrics: dict[str, float]
    run_dir: Path
    checkpoint_dir: Path


def train(cfg: Config, *, stop_after: int | None = None) -> TrainResult:
    """Trains `cfg.train.steps` updates (resuming from the latest good checkpoint of the run).

    SIGTERM / SIGINT stop the loop after the current update with a checkpoint, as does reaching `stop_after`
    updates (used to simulate an interruption).
    """
    from copg_jax.distributed import maybe_initialize_distributed
    from copg_jax.metrics import MetricsWriter, peak_flops_per_device, throughput
    from copg_jax.models import load_tokenizer
    from copg_jax.run_config import dump_config
    from copg_jax.sharding import make_mesh

    maybe_initialize_distributed(cfg.distributed)
    run_dir = Path(cfg.train.output_dir)
    is_main = jax.process_index() == 0
    if is_main:
        dump_config(cfg, run_dir / "config.yaml")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    graphdef, abstract_params = abstract_model(cfg)
    # A random-init policy has no folder to fingerprint: the caches are checked against its initial weights.
    initial = None if cfg.model.path else init_params(cfg, mesh)
    reference = cfg.model.path or nnx.merge(graphdef, initial)
    batches = load_data(cfg, tokenizer, mesh, reference=reference)
    eval_batches = load_data(cfg, tokenizer, mesh, evaluation=True, reference=reference)

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(abstract_params, tx, mesh)
    manager = ckpt.make_manager(
        cfg.checkpoint_dir,
        keep_last=cfg.checkpoint.keep_last,
        keep_best=cfg.checkpoint.keep_best,
        best_metric=cfg.checkpoint.best_metric,
        best_mode=cfg.checkpoint.best_mode,
        async_save=cfg.checkpoint.async_save,
    )
    restored = None
    if cfg.checkpoint.resume:
        restored = ckpt.restore_latest(manager, abstract_state(abstract_params, tx, shardings))
    if restored is not None:
        state = restored.state
        batches.set_state(restored.data)
        ckpt.set_aside_newer(manager, restored.step)  # corrupt newer steps would block saving their numbers
        log.info("resumed from %s at step %d", cfg.checkpoint_dir, restored.step)
    else:
        initial = init_params(cfg, mesh) if initial is None else initial
        state = init_state(initial, tx, shardings, cfg.train.seed)
    online = None
    if cfg.rollout.every_n_steps:  # online mode: fresh samples join the logged data (copg_jax.rollout)
        from copg_jax.rollout import OnlineRollouts

        # the initial params are the reference policy (copied before the first step donates them)
        initial = init_params(cfg, mesh) if initial is None else initial
        online = OnlineRollouts(cfg, tokenizer, mesh, graphdef, initial, batches)
        if restored is not None:
            online.restore(cfg.checkpoint_dir, restored.step)

    step_fn = jit_train_step(graphdef, tx, cfg, shardings, mesh)
    eval_fn = jax.jit(make_eval_step(graphdef, cfg), in_shardings=(shardings.params, batch_shardings(mesh)))
    mcfg = model_config(cfg)
    peak, peak_source = peak_flops_per_device(cfg.train.peak_flops)
    log.info("MFU against %.3g FLOP/s per device (%s)", peak, peak_source)
    writer = MetricsWriter(run_dir)

    def run_eval(step: int) -> dict[str, float]:
        if eval_batches is None:
            return {}
        eval_batches.set_state({"epoch": 0, "index": 0})
        metrics = evaluate(eval_fn, state.params, eval_batches, mesh, cfg.train.eval_batches)
        writer.write(step, metrics)
        return metrics

    def save(step: int, metrics: dict[str, float] | None = None) -> None:
        meta = {"config": cfg.train.output_dir, "model_type": mcfg.model_type}
        if online is not None:  # written first: a listed checkpoint always has its rollout state
            online.save(cfg.checkpoint_dir, step, manager.all_steps())
        ckpt.save(manager, step, state, batches.get_state(), meta, metrics=metrics)

    stop = _StopFlag()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    step = int(jax.device_get(state.step))
    last: dict[str, float] = {}
    interrupted = False
    bar = None
    if cfg.train.progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True)
    try:
        window_start, window_tokens = time.perf_counter(), []
        while step < cfg.train.steps:
            if online is None:
                micro = [next(batches) for _ in range(cfg.optim.grad_accum_steps)]
            else:  # a rollout first when one is due, then batches mixing buffer and logged data
                paused = time.perf_counter()
                micro = online.next_batches(step, state.params, cfg.optim.grad_accum_steps, writer)
                window_start += time.perf_counter() - paused  # rollouts are not training time
            batch = stack_to_device(micro, mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            window_tokens.append(metrics["tokens"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                # throughput over the steps since the last log (device_get waits for them all)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                tokens = float(np.sum(jax.device_get(window_tokens)))
                seconds = (time.perf_counter() - window_start) / len(window_tokens)
                del metrics["tokens"]
                flops = mcfg.flops_per_token(batch.tokens.input_ids.shape[-1])
                metrics.update(
                    throughput(tokens / len(window_tokens), seconds, flops, peak, jax.device_count())
                )
                writer.write(step, metrics)
                last = metrics
                window_start, window_tokens = time.perf_counter(), []
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.2e}")
            if bar is not None:
                bar.update(1)
            paused = time.perf_counter()
            eval_metrics = None
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                eval_metrics = run_eval(step) or None
                last = {**last, **(eval_metrics or {})}
            every = cfg.checkpoint.every_steps
            if (every and step % every == 0) or step == cfg.train.steps:
                save(step, eval_metrics)
            if eval_metrics is not None or (every and step % every == 0):
                window_start += time.perf_counter() - paused  # eval and saving are not training time
            if stop.signal is not None or (stop_after is not None and step >= stop_after):
                interrupted = True
                if manager.latest_step() != step:
                    save(step)
                log.warning("stopping at step %d (%s); checkpoint saved", step, stop.signal or "step limit")
                break
        manager.wait_until_finished()
        if not interrupted and cfg.train.export_on_finish:
            # every process joins the gathers of sharded params; only process 0 writes the tokenizer
            export_params(graphdef, state.params, run_dir / "export", tokenizer if is_main else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if bar is not None:
            bar.close()
        writer.close()
        manager.close()
    return TrainResult(step, interrupted, last, run_dir, cfg.checkpoint_dir)


def export_params(graphdef: nnx.GraphDef, params: nnx.State, out_dir: str | Path, tokenizer=None) -> Path:
    """Writes the policy (params merged into the model graph) as an HF folder, with the tokenizer if given."""
    from copg_jax.models import save_pretrained

    save_pretrained(nnx.merge(graphdef, params), out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def restore_params(cfg: Config, directory: str | Path, mesh: Mesh, step: int | None = None):
    """(graphdef, params, step) of a run's checkpoint (latest good one unless `step`), onto `mesh`.

    Raises:
      CheckpointError: no readable checkpoint in `directory`.
    """
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, abstract_params = abstract_model(cfg)
    shardings = state_shardings(abstract_params, tx, mesh)
    manager = ckpt.make_manager(directory, read_only=True, async_save=False)
    try:
        restored = ckpt.restore_latest(manager, abstract_state(abstract_params, tx, shardings), step)
    finally:
        manager.close()
    if restored is None:
        raise ckpt.CheckpointError(f"no checkpoint in {directory}")
    return graphdef, restored.state.params, restored.step


def _checkpoint_dir(path: Path) -> Path:
    """A run folder's checkpoint folder, or `path` itself when it is one."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> tuple[Path, int]:
    """Exports a run's checkpoint (latest good one unless `step`) as an HF folder with the tokenizer."""
    from copg_jax.models import load_tokenizer
    from copg_jax.run_config import load_config
    from copg_jax.sharding import make_mesh

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    directory = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else _checkpoint_dir(run_dir)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    graphdef, params, step = restore_params(cfg, directory, mesh, step)
    return export_params(graphdef, params, out_dir, load_tokenizer(cfg.tokenizer_path)), step


def evaluate_checkpoint(
    cfg: Config, checkpoint: str | Path = "", step: int | None = None
) -> dict[str, float]:
    """Eval metrics of a checkpoint (run folder or checkpoint folder; "" = the config's) or an exported HF
    folder, on the config's eval data (`data.eval_path`, with `data.eval_ref_cache`)."""
    from copg_jax.models import load_tokenizer
    from copg_jax.sharding import make_mesh

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    path = Path(checkpoint) if checkpoint else cfg.checkpoint_dir
    if (path / "config.json").is_file():  # an exported HF model
        model = from_pretrained(path, mesh=mesh, **_model_kwargs(cfg))
        graphdef, params = nnx.split(model, nnx.Param)
        where = {"checkpoint": str(path)}
    else:
        graphdef, params, step = restore_params(cfg, _checkpoint_dir(path), mesh, step)
        where = {"checkpoint": str(path), "step": step}
    batches = load_data(cfg, load_tokenizer(cfg.tokenizer_path), mesh, evaluation=True)
    if batches is None:
        raise ValueError("data.eval_path is empty: set the evaluation data to evaluate on")
    shardings = param_shardings(params, mesh)
    eval_fn = jax.jit(make_eval_step(graphdef, cfg), in_shardings=(shardings, batch_shardings(mesh)))
    return {**evaluate(eval_fn, params, batches, mesh, cfg.train.eval_batches), **where}
