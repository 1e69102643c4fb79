"""Online mode of `copg train` (`rollout.every_n_steps > 0`): fresh samples mixed into the logged data.

CoPG is off-policy: its loss is valid for completions from any behaviour policy, so completions the policy
(or a lagged copy of it) samples during training can sit in one replay buffer with the logged data. Every
`every_n_steps` updates (and before the first), `OnlineRollouts`:

1. samples `num_prompts` prompts (seeded by (seed, rollout index)) and generates K completions each with the
   behaviour policy (`generate.sample_completions`, jitted, rows sharded on the training mesh);
2. scores them with the configured reward (`rewards.score_rows_shared`); a completion without a score is
   dropped and counted (never given a made-up reward), and so is a prompt left with fewer than 2 completions;
3. computes their reference log-probs with the TRUE reference policy, a `ReferenceModel` snapshot of the
   initial weights (`model.path` or the seeded random init) taken once at start, never the current policy;
4. appends them (token ids, rewards, reference log-probs) to a FIFO `ReplayBuffer` of `buffer_size` prompts.

Each training batch then holds `round(fresh_fraction * batch_size)` prompts drawn uniformly (seeded by
(seed, step); the microbatches of an update disjoint while the buffer holds enough) from the buffer and the
rest from the logged data iterator (the logged rows a fresh prompt displaces are skipped for this epoch), or
padding prompts where there is no logged data (`FreshOnly`: training from prompts alone). Batches are laid
out by the data layer's layout functions and shape rules (bucket lengths, row counts), so they have the
shapes offline batches have and the jitted step does not recompile. With `fresh_fraction = 0` or an empty
buffer, batches are exactly the iterator's.

All randomness is derived from (seed, counters), so the only state is the buffer, the lagged policy copies
and a counter; `save` writes them next to each checkpoint (`<checkpoint dir>/rollout/<step>.npz`, atomically,
before the checkpoint itself, with a SHA-256 of its arrays) and `restore` reads them back (a damaged file
makes the resume fall back a step), so an interrupted run resumes exactly.

Several processes (multi-host): every process draws the same prompts; generation and reference log-probs run
once over the global rows on the sharded policy (each process places its own devices' rows) and their results
are gathered to every process; each process scores its own contiguous share of the completions (rewards run
where the completions are assigned) and the scores are gathered. So every process holds the same replay
buffer, and each training batch is laid out as one global list of prompts of which each process builds its
share, exactly as `DataIterator` does for logged data. Rollout prompts must divide over the processes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from copg_jax import paths, streams
from copg_jax.batch import ScoredBatch
from copg_jax.checkpoint import CheckpointError
from copg_jax.data.layout import bucket_length, item_lengths
from copg_jax.data.pipeline import BatchLayout, DataIterator, host_examples, order_changes
from copg_jax.data.refcache import initial_reference
from copg_jax.generate import SamplingConfig, sample_completions
from copg_jax.prompt_pool import PromptPool, prompt_rows, read_pool
from copg_jax.rewards import refuse_all_failed, score_rows_shared, take_fields, with_completion_ids
from copg_jax.run_config import Config, RolloutSection, covers
from copg_jax.sharding import global_array, on_main_process, to_host

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ replay buffer


@dataclasses.dataclass(frozen=True)
class FreshPrompt:
    """One rolled-out prompt with its scored completions.

    Attributes:
      prompt_ids: [P] int32 prompt tokens (as the data pipeline tokenises prompts).
      completions: K' arrays [C_k] int32 of sampled tokens (EOS included when the completion finished).
      rewards: [K'] float32.
      ref_logps: [K'] float32 summed reference log-probs of each completion.
      rollout: index of the rollout that produced it.
    """

    prompt_ids: np.ndarray
    completions: tuple[np.ndarray, ...]
    rewards: np.ndarray
    ref_logps: np.ndarray
    rollout: int


class ReplayBuffer:
    """FIFO of at most `capacity` FreshPrompts; serialises to flat numpy arrays (exact round trip)."""

    def __init__(self, capacity: int, items: list[FreshPrompt] | None = None):
        self.capacity = capacity
        self.items: collections.deque[FreshPrompt] = collections.deque(items or [], maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, items: list[FreshPrompt]) -> None:
        self.items.extend(items)  # maxlen drops the oldest first

    def sample(self, rng: np.random.Generator, n: int, groups: int = 1) -> list[list[FreshPrompt]]:
        """`groups` draws of min(n, len) distinct items each, uniformly: disjoint while the buffer holds
        `groups * n` items (the microbatches of one update repeat no prompt), else each its own draw."""
        n = min(n, len(self.items))
        if groups * n <= len(self.items):
            picks = rng.permutation(len(self.items))[: groups * n].reshape(groups, n)
        else:
            picks = np.stack([rng.choice(len(self.items), size=n, replace=False) for _ in range(groups)])
        return [[self.items[int(i)] for i in group] for group in picks]

    def to_arrays(self) -> dict[str, np.ndarray]:
        items = list(self.items)
        completions = [c for it in items for c in it.completions]

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return {
            "prompt_lengths": np.asarray([len(it.prompt_ids) for it in items], np.int64),
            "prompt_tokens": cat([it.prompt_ids for it in items], np.int32),
            "counts": np.asarray([len(it.completions) for it in items], np.int64),
            "completion_lengths": np.asarray([len(c) for c in completions], np.int64),
            "completion_tokens": cat(list(completions), np.int32),
            "rewards": cat([it.rewards for it in items], np.float32),
            "ref_logps": cat([it.ref_logps for it in items], np.float32),
            "born": np.asarray([it.rollout for it in items], np.int64),
        }

    @classmethod
    def from_arrays(cls, capacity: int, arrays) -> ReplayBuffer:
        prompts = np.split(arrays["prompt_tokens"], np.cumsum(arrays["prompt_lengths"])[:-1])
        completions = np.split(arrays["completion_tokens"], np.cumsum(arrays["completion_lengths"])[:-1])
        starts = np.concatenate([[0], np.cumsum(arrays["counts"])])
        items = [
            FreshPrompt(
                prompt_ids=prompts[i],
                completions=tuple(completions[starts[i] : starts[i + 1]]),
                rewards=arrays["rewards"][starts[i] : starts[i + 1]],
                ref_logps=arrays["ref_logps"][starts[i] : starts[i + 1]],
                rollout=int(arrays["born"][i]),
            )
            for i in range(len(arrays["counts"]))
        ]
        return cls(capacity, items)


# ------------------------------------------------------------------------------------------ mixed batches


def next_rows(it: DataIterator) -> np.ndarray:
    """[batch_size] dataset row ids of the iterator's next batch, advancing it exactly as `next(it)` would."""
    position = it.position()
    epoch, index = position["epoch"], position["index"]
    if index >= it.batches_per_epoch:
        epoch, index = epoch + 1, 0
    it.set_state({"epoch": epoch, "index": index + 1})
    return it.global_rows(epoch, index)


def mixed_batch(
    it: DataIterator | FreshOnly, logged_rows: np.ndarray, fresh: list[FreshPrompt]
) -> ScoredBatch:
    """This host's ScoredBatch of a global batch: logged dataset rows (prompts 0..L-1) followed by fresh
    prompts (L..B-1), split over the processes like the iterator's own batches.

    Args:
      it: the logged data iterator (its data, reference cache, layout settings, K and process share), or
        `FreshOnly` (no logged data: `logged_rows` are all -1, padding).
      logged_rows: [L] dataset row ids (-1 = padding prompt), the same on every process.
      fresh: B - L buffer items, each with at most K completions, the same on every process.
    Returns:
      ScoredBatch with [it.local_batch, K] per-prompt arrays, laid out like the iterator's batches.
    """
    k = it.num_completions
    logged = host_examples(it.data, logged_rows)
    scored = [None if e is None else (e[0], e[1], e[2], None) for e in logged]
    scored += [(f.prompt_ids, list(f.completions), f.rewards, f.ref_logps) for f in fresh]
    examples = [None if e is None else e[:2] for e in scored]
    # every process derives the same shape from all shares; each lays out its own share, global slots
    num_rows, length = it.shape_of(it.shares(examples))
    positions = it.feed.positions(len(examples))
    tokens = it.layout([examples[i] for i in positions], length, num_rows, positions)
    mine = [scored[i] for i in positions]
    shape = (len(mine), k)
    rewards, lengths, mask = np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, bool)
    ref_logps = np.zeros(shape, np.float32)
    for b, ex in enumerate(mine):
        if ex is not None:
            n = len(ex[1])
            rewards[b, :n], lengths[b, :n], mask[b, :n] = ex[2], [len(c) for c in ex[1]], True
            if ex[3] is not None:
                ref_logps[b, :n] = ex[3]
    # this share's logged prompts (global positions < L) come first: positions ascend
    local_logged = np.asarray(logged_rows)[positions[positions < len(logged_rows)]]
    n_logged = len(local_logged)
    if it.ref is None:  # as DataIterator: missing reference values fail loudly in training
        ref_logps[:n_logged] = np.where(mask[:n_logged], np.float32(np.nan), np.float32(0))
    else:
        ref_logps[:n_logged] = it.ref.lookup(local_logged, k, lengths[:n_logged])
    return ScoredBatch(
        tokens=tokens, rewards=rewards, completion_mask=mask, ref_logps=ref_logps, completion_lengths=lengths
    )


class FreshOnly(BatchLayout):
    """The batch layout of online training from prompts alone (no `data.path`): every prompt of a batch is
    drawn from the replay buffer, so there are no logged rows, no reference cache and no data position.

    It stands in for the data iterator (`mixed_batch` lays fresh prompts out with it, a checkpoint saves its
    state): its state says that no logged rows were read, so a run that trained on logged data cannot
    resume without them, nor this one with them.
    """

    data = None  # no logged rows: `mixed_batch` gets padding prompts (-1) only
    ref = None

    def order(self) -> dict[str, int | str]:
        """What the run's batches depend on besides the buffer: no logged rows (the prompts the buffer is
        filled from are checked with the rollout state, `OnlineRollouts.restore`)."""
        return {"num_rows": 0, "rows_digest": "no logged data (online training from prompts alone)"}

    def position(self) -> dict[str, int]:
        return {"epoch": 0, "index": 0}

    def get_state(self) -> dict[str, int | str]:
        return {**self.position(), **self.order()}

    def describe_next(self) -> str:
        return "a batch of replay buffer prompts (no logged data)"

    def set_state(self, state: dict) -> None:
        """Raises ValueError for a position saved over logged rows (a run with `data.path`)."""
        if state.get("num_rows", 0) != 0:
            changed = order_changes(state, self.order())
            raise ValueError(
                f"the checkpoint was trained on logged data ({', '.join(changed)}) and data.path is now "
                "empty: resume with the data it was trained on, or start a new train.output_dir"
            )


def check_fresh_rows_fit(layout: BatchLayout, rc: RolloutSection) -> None:
    """Refuses rollouts whose longest prompt group (a prompt of `data.max_prompt_length` tokens, K completions
    of `rollout.max_new_tokens`) fits no row of the packed or shared-prefix layout: its first batch failed,
    after the first rollout (the padded layout's rows grow to fit).

    Raises:
      ValueError: naming the settings and the tokens needed.
    """
    cfg = layout.cfg
    if cfg.layout == "padded":
        return
    group = (range(cfg.max_prompt_length), [range(rc.max_new_tokens)] * rc.num_completions)
    longest = max(item_lengths([group], cfg.layout, split_length=layout.split_length))
    if longest > layout.row_length:
        raise ValueError(
            f"rollout: a prompt of data.max_prompt_length={cfg.max_prompt_length} tokens with "
            f"{rc.num_completions} completions of rollout.max_new_tokens={rc.max_new_tokens} needs {longest} "
            f"tokens in a row of the {cfg.layout} layout, more than data.row_length={layout.row_length}: "
            "raise data.row_length (or leave it 0)"
        )


# ---------------------------------------------------------------------------------------------- prompts


def rollout_pool(cfg: Config, tokenizer) -> PromptPool:
    """The prompts to roll out on, read on this process (`PromptPool.agree` compares them across processes):
    the rows of `rollout.prompts_path`, or the distinct prompts of `data.path` (rows the data pipeline rejects
    are left out, as in training), with their other keys (code tests, a reward's fields), and the reward.

    Raises:
      ValueError: as `prompt_pool.read_pool`; more prompts asked for than there are.
    """
    rc = cfg.rollout
    rows = prompt_rows(
        rc.prompts_path, rc.prompt_col, cfg.data, cfg.data.path, cfg.data.split, "rollout.prompts_path"
    )
    if rc.num_prompts > len(rows):  # before the reward is built (a reward model loaded)
        raise ValueError(f"rollout.num_prompts={rc.num_prompts} exceeds the {len(rows)} prompts")
    where = rc.prompts_path or cfg.data.path
    pool = read_pool(rows, tokenizer, cfg.data, rc.reward, where, "rollout prompts")
    if rc.num_prompts > len(pool.rows):  # prompts left out as bad rows (data.on_bad_row=skip)
        raise ValueError(f"rollout.num_prompts={rc.num_prompts} exceeds the {len(pool.rows)} prompts kept")
    return pool


# ------------------------------------------------------------------------------------------- online mode


def _nanmean(values: np.ndarray) -> float:
    """The mean of the values that are not NaN; NaN when there are none (no warning)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        x = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{x.dtype.str}|{x.shape}|".encode())
        digest.update(x.tobytes())
    return digest.hexdigest()


def _copy(params):
    """A copy in new buffers (same shardings): the train step donates the params it is given."""
    return jax.tree.map(lambda x: x.copy(), params)


class OnlineRollouts:
    """Rollouts, replay buffer and batch mixing of online mode (see the module docstring).

    Args:
      cfg: the run config (`rollout`, `data`, `model` sections are read).
      tokenizer: the policy's tokenizer.
      mesh: the training mesh (generation rows are sharded over its batch axes).
      graphdef: the policy's graph definition (`train.abstract_model`).
      initial_params: the initial trained params on `mesh` (with `frozen`, the initial policy): the reference
        policy (snapshotted here; with LoRA its base, adapters off) and the behaviour policy of the first
        `policy_lag` rollouts.
      batches: the logged data iterator, or `FreshOnly` (no logged data: every prompt of a batch is fresh).
      frozen: the params training does not change (the LoRA base, shared, never copied), or an empty State.
      pool: the prompts and reward (`rollout_pool`, agreed by the processes); None: read here.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer,
        mesh: Mesh,
        graphdef: nnx.GraphDef,
        initial_params: nnx.State,
        batches: DataIterator | FreshOnly,
        frozen: nnx.State | None = None,
        pool: PromptPool | None = None,
    ):
        rc: RolloutSection = cfg.rollout
        if rc.num_completions > batches.num_completions:
            raise ValueError(
                f"rollout.num_completions={rc.num_completions} exceeds the data's {batches.num_completions} "
                "completion slots per prompt; raise data.max_completions"
            )
        if rc.max_new_tokens > cfg.data.max_completion_length:
            raise ValueError(
                f"rollout.max_new_tokens={rc.max_new_tokens} exceeds data.max_completion_length="
                f"{cfg.data.max_completion_length} (fresh completions must fit the training layout)"
            )
        batch = cfg.data.batch_size
        self.fresh_only = isinstance(batches, FreshOnly)
        check_fresh_rows_fit(batches, rc)
        if rc.buffer_size < rc.num_prompts:
            log.warning(
                "rollout.buffer_size=%d holds fewer prompts than one rollout samples (rollout.num_prompts="
                "%d): the samples of %d prompts leave the buffer before any batch draws them",
                rc.buffer_size, rc.num_prompts, rc.num_prompts - rc.buffer_size,
            )  # fmt: skip
        drawn = rc.fresh_per_batch(batch) * cfg.optim.grad_accum_steps
        if cfg.optim.grad_accum_steps > 1 and rc.buffer_size < drawn:
            log.warning(
                "rollout.buffer_size=%d is less than the %d prompts an update draws from it (%d microbatches "
                "of %d): prompts repeat across the microbatches of an update, each weighted as often as "
                "drawn",
                rc.buffer_size, drawn, cfg.optim.grad_accum_steps, rc.fresh_per_batch(batch),
            )  # fmt: skip
        if rc.fresh_fraction < 1 and rc.fresh_per_batch(batch) == batch:
            log.warning(
                "rollout.fresh_fraction=%g of data.batch_size=%d rounds to all %d prompts fresh: no logged "
                "prompt trains once the buffer holds a batch (1.0 if meant; %.6g keeps one logged prompt)",
                rc.fresh_fraction, batch, batch, (batch - 1) / batch,
            )  # fmt: skip
        self.rc, self.data_cfg, self.tokenizer, self.mesh = rc, cfg.data, tokenizer, mesh
        self.graphdef, self.batches = graphdef, batches
        self.frozen = nnx.State({}) if frozen is None else frozen
        if pool is None:
            pool = rollout_pool(cfg, tokenizer)
            pool.agree()
        self.pool = pool
        # what the buffer was filled from, recorded with the rollout state and checked at a resume
        self.prompts_digest = pool.digest().hex()
        allowed = cfg.checkpoint.allow_changes
        self.allow_other_prompts = any(covers(e, "rollout.prompts_path") for e in allowed)
        self.sampling = SamplingConfig(
            rc.max_new_tokens, rc.temperature, rc.top_k, rc.top_p, end_token=cfg.data.eos_token
        )
        # the TRUE reference: a snapshot of the initial weights (LoRA: the base), never updated by training
        self.reference = initial_reference(graphdef, initial_params, self.frozen)
        self.param_shardings = jax.tree.map(lambda x: x.sharding, initial_params)
        self.buffer = ReplayBuffer(rc.buffer_size)
        # params of the last `policy_lag` rollouts, oldest first; the initial policy stands in before that
        self.history: list[nnx.State] = [_copy(initial_params)] if rc.policy_lag else []
        self.fresh_trained = 0  # prompts from the buffer trained on so far
        self.scored = False  # whether a rollout of this process has been scored yet

    # ---------------------------------------------------------------------------------------- rollouts

    def _behaviour(self, params: nnx.State) -> nnx.State:
        """The policy that samples this rollout: current params, or those of `policy_lag` rollouts ago."""
        if not self.rc.policy_lag:
            return params
        self.history.append(_copy(params))
        behaviour = self.history[0]
        self.history = self.history[-self.rc.policy_lag :]
        return behaviour

    def _reference_logps(self, prompts: list[np.ndarray], completions: list[list[np.ndarray]]) -> np.ndarray:
        """[n, K] summed reference log-probs of all the rollout's completions (every process gets them all):
        one fixed-shape padded batch, its rows sharded over the mesh like training rows."""
        length = bucket_length(
            self.data_cfg.max_prompt_length + self.rc.max_new_tokens, (), self.data_cfg.pad_multiple
        )
        examples = list(zip(prompts, completions, strict=True))
        return self.reference.completion_logps(examples, self.rc.num_completions, length, mesh=self.mesh)

    def rollout(self, index: int, params: nnx.State) -> dict[str, float]:
        """Rollout `index`: sample, score, reference-score and buffer completions; returns its metrics."""
        rc, start = self.rc, time.perf_counter()
        behaviour = nnx.merge(self.graphdef, self._behaviour(params), self.frozen)
        pool = self.pool
        picks = np.random.default_rng([rc.seed, 0, index]).choice(
            len(pool.rows), size=rc.num_prompts, replace=False
        )
        prompts = [pool.prompt_ids[i] for i in picks]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(rc.seed), streams.ROLLOUT), index)
        gen_start = time.perf_counter()
        samples = sample_completions(
            behaviour,
            self.tokenizer,
            prompts,
            rc.num_completions,
            self.sampling,
            key,
            batch_size=rc.num_prompts * rc.num_completions,
            mesh=self.mesh,
        )
        gen_seconds = time.perf_counter() - gen_start
        completions = [[np.asarray(c["token_ids"], np.int32) for c in comps] for comps in samples]
        ref_logps = self._reference_logps(prompts, completions)
        k = rc.num_completions
        result = score_rows_shared(  # each process scores its share of the prompts; all get every score
            pool.reward_fn,
            [pool.rows[i]["prompt"] for i in picks for _ in range(k)],
            [c["text"] for comps in samples for c in comps],
            [c["finished"] for comps in samples for c in comps],  # a cut completion is scored as cut
            with_completion_ids(
                take_fields(pool.fields, [i for i in picks for _ in range(k)]),
                [c["token_ids"] for comps in samples for c in comps],
            ),
        )
        if not self.scored:  # a reward failing on every completion at once is broken, not unlucky; later
            refuse_all_failed(result.errors, f"rollout {index}")  # (a judge's outage) it is warned, counted
        self.scored = True  # every process holds every error: all stop together
        scores = result.scores.reshape(len(picks), k)
        ok = np.asarray([e is None for e in result.errors]).reshape(len(picks), k)
        failed = result.num_failed
        if failed:
            shown = "; ".join(sorted({e for e in result.errors if e is not None})[:3])
            log.warning(
                "rollout %d: %d of %d completions have no reward and are dropped (%s)",
                index,
                failed,
                ok.size,
                shown,
            )
        fresh, dropped_prompts, dropped_completions = [], 0, 0
        for b in range(len(picks)):
            keep = np.flatnonzero(ok[b])
            if len(keep) < 2:  # CoPG compares completions of one prompt: one alone carries no signal
                dropped_prompts, dropped_completions = dropped_prompts + 1, dropped_completions + len(keep)
                continue
            fresh.append(
                FreshPrompt(
                    prompt_ids=prompts[b],
                    completions=tuple(completions[b][i] for i in keep),
                    rewards=scores[b, keep].astype(np.float32),
                    ref_logps=ref_logps[b, keep],
                    rollout=index,
                )
            )
        self.buffer.add(fresh)
        gen_tokens = sum(len(c) for cs in completions for c in cs)
        return {
            "rollout/reward_mean": float(np.mean(scores[ok])) if ok.any() else float("nan"),
            "rollout/failures": float(failed),
            "rollout/prompts_dropped": float(dropped_prompts),
            "rollout/completions_dropped": float(dropped_completions),
            "rollout/completions_added": float(sum(len(f.completions) for f in fresh)),
            "rollout/buffer_size": float(len(self.buffer)),
            "rollout/gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            "rollout/time_s": time.perf_counter() - start,
            "rollout/fresh_prompts_trained": float(self.fresh_trained),
            # several reward functions (reward.fn a list): each one's mean where it scored, as TRL logs them
            **{f"rollout/reward/{name}": _nanmean(values) for name, values in result.parts.items()},
        }

    # ----------------------------------------------------------------------------------------- batches

    def next_batches(self, step: int, params: nnx.State, grad_accum: int, writer=None) -> list[ScoredBatch]:
        """The microbatches of update `step + 1`, after a rollout with `params` when one is due (its
        metrics go to `writer` at `step`): fresh prompts from the buffer (no prompt in two microbatches
        while the buffer holds enough), the rest logged."""
        if step % self.rc.every_n_steps == 0:
            metrics = self.rollout(step // self.rc.every_n_steps, params)
            if writer is not None:
                writer.write(step, metrics)
        b = self.data_cfg.batch_size
        n = min(self.rc.fresh_per_batch(b), len(self.buffer))
        if self.fresh_only and n == 0:  # every process holds the same buffer: all stop together
            raise ValueError(
                f"update {step + 1}: the replay buffer is empty (no rollout prompt kept two scored "
                "completions: see the rollout's warnings) and there is no logged data (data.path) to train on"
            )
        if n == 0:
            return [next(self.batches) for _ in range(grad_accum)]
        if self.fresh_only and n < b:
            log.warning(
                "update %d: the replay buffer holds %d prompts, fewer than data.batch_size=%d, and there is "
                "no logged data: %d padding prompts in each microbatch",
                step + 1, n, b, b - n,
            )  # fmt: skip
        draws = self.buffer.sample(np.random.default_rng([self.rc.seed, 1, step]), n, grad_accum)
        out = []
        for fresh in draws:
            self.fresh_trained += n
            # without logged data, a buffer holding less than a batch leaves padding prompts (-1)
            logged = np.full(b - n, -1, np.int64) if self.fresh_only else next_rows(self.batches)[: b - n]
            out.append(mixed_batch(self.batches, logged, fresh))
        return out

    # -------------------------------------------------------------------------------------- checkpoints

    def _check_prompts(self, saved_digest: str) -> None:
        """Refuses a resume whose prompts (`PromptPool.digest`: their rows, token ids and the fields the
        reward takes) differ from those the checkpoint's rollouts sampled, unless checkpoint.allow_changes
        covers rollout.prompts_path (then warned of): a file edited in place keeps its path, the one setting
        a resume compares.

        Raises:
          ValueError: naming the change and the ways on.
        """
        if saved_digest == self.prompts_digest:
            return
        what = f"the {self.pool.what} (another file, prompts edited, or other tokenisation settings)"
        if self.allow_other_prompts:
            log.warning("resuming with other rollout prompts (checkpoint.allow_changes): %s", what)
            return
        raise ValueError(
            f"the checkpoint was trained from other prompts: {what}: resume with those, allow it with "
            "checkpoint.allow_changes=[rollout.prompts_path], or use a new train.output_dir"
        )

    @staticmethod
    def state_path(checkpoint_dir: str | Path, step: int) -> str:
        return paths.join(checkpoint_dir, "rollout", f"{int(step)}.npz")

    def save(self, checkpoint_dir: str | Path, step: int, listed_steps=()) -> str:
        """Writes buffer, lagged params and counter for checkpoint `step` (atomically: paths.atomic_writer).

        Call it before saving the checkpoint itself. Files of steps older than the newest listed checkpoint
        that are not listed (`listed_steps`: the manager's `all_steps()`) are removed: their checkpoints are
        gone. A checkpoint still being written asynchronously is newer than every listed one, so it keeps its
        file.
        """
        path = self.state_path(checkpoint_dir, step)
        arrays = {f"buffer/{k}": v for k, v in self.buffer.to_arrays().items()}
        dtypes = []
        for i, params in enumerate(self.history):
            leaves = [to_host(x) for x in jax.tree.leaves(params)]  # gathered by every process
            dtypes.append([str(x.dtype) for x in leaves])
            # raw bits: numpy's npz has no bfloat16
            arrays.update({f"lag{i}/{j}": x.view(f"u{x.dtype.itemsize}") for j, x in enumerate(leaves)})
        meta = {
            "step": int(step),
            "fresh_trained": self.fresh_trained,
            "lag_dtypes": dtypes,
            "prompts_digest": self.prompts_digest,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        on_main_process(  # every process holds the same state; one writes it, all learn if it failed
            f"write the rollout state {path}", lambda: self._write(path, arrays, step, listed_steps)
        )
        return path

    @staticmethod
    def _write(path: str, arrays: dict[str, np.ndarray], step: int, listed_steps) -> None:
        arrays = {**arrays, "checksum": np.frombuffer(_checksum(arrays).encode(), np.uint8)}
        with paths.atomic_writer(path) as f:
            np.savez(f, **arrays)
        OnlineRollouts._prune(paths.parent(path), {int(s) for s in listed_steps} | {step})

    @staticmethod
    def _prune(folder: str, listed: set[int]) -> None:
        """Removes the files of steps not `listed` that are older than the newest listed one (their
        checkpoints are gone; a newer one may be a checkpoint still being written)."""
        for name in paths.listdir(folder):
            old = name.removesuffix(".npz")
            if name.endswith(".npz") and old.isdigit() and int(old) not in listed:
                if int(old) < max(listed, default=0):
                    paths.remove(paths.join(folder, name))

    def prune(self, checkpoint_dir: str | Path, listed_steps) -> None:
        """Removes the rollout files whose checkpoints the manager no longer lists (`listed_steps`: its
        `all_steps()`): a save removes those of checkpoints dropped before it, this those dropped by it. Every
        process calls it at the same point."""
        folder = paths.join(checkpoint_dir, "rollout")
        listed = {int(s) for s in listed_steps}
        on_main_process(f"prune {folder}", lambda: paths.isdir(folder) and self._prune(folder, listed))

    def restore(self, checkpoint_dir: str | Path, step: int) -> None:
        """Reads back what `save` wrote for checkpoint `step`.

        Raises:
          FileNotFoundError: no rollout state for that step (e.g. the checkpoint is from an offline run).
          CheckpointError: the file is unreadable or fails its checksum (resuming falls back a step).
        """
        path = self.state_path(checkpoint_dir, step)
        if not paths.isfile(path):
            raise FileNotFoundError(
                f"checkpoint step {step} has no online-mode state {path} (was it written by a run without "
                "rollout.every_n_steps?); resume it offline or start a new train.output_dir"
            )
        try:
            with paths.open(path, "rb") as raw, np.load(raw) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # noqa: BLE001 - a damaged zip fails in many ways
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
        saved = arrays.pop("checksum", np.zeros(0, np.uint8)).tobytes().decode(errors="replace")
        if saved != _checksum(arrays):
            raise CheckpointError(f"{path} does not match its checksum (damaged or edited)")
        meta = json.loads(arrays["meta"].tobytes())
        if meta["step"] != step:
            raise ValueError(f"{path} holds the rollout state of step {meta['step']}, not {step}")
        self._check_prompts(meta.get("prompts_digest", self.prompts_digest))  # (not recorded before)
        buffer = {k.removeprefix("buffer/"): v for k, v in arrays.items() if k.startswith("buffer/")}
        if len(buffer["counts"]) > self.rc.buffer_size:
            raise ValueError(
                f"{path} holds {len(buffer['counts'])} buffered prompts > rollout.buffer_size="
                f"{self.rc.buffer_size}; resume with the run's buffer_size"
            )
        self.buffer = ReplayBuffer.from_arrays(self.rc.buffer_size, buffer)
        self.fresh_trained = int(meta["fresh_trained"])
        treedef = jax.tree.structure(self.param_shardings)
        shardings = jax.tree.leaves(self.param_shardings)
        history = []
        for i, dtypes in enumerate(meta["lag_dtypes"]):
            leaves = [arrays[f"lag{i}/{j}"].view(jnp.dtype(d)) for j, d in enumerate(dtypes)]
            placed = [global_array(x, s) for x, s in zip(leaves, shardings, strict=True)]
            history.append(jax.tree.unflatten(treedef, placed))
        if (not history) != (not self.rc.policy_lag) or len(history) > self.rc.policy_lag:
            raise ValueError(
                f"{path} holds {len(history)} lagged policies; rollout.policy_lag={self.rc.policy_lag}"
            )
        self.history = history
