"""Evaluation by generation, as the paper measures a policy (arXiv 2406.19185, Sec. 6): the reward of its
own samples on held-out prompts, with the Monte-Carlo KL to the reference and the length.

`evaluate_generations` samples `num_samples` completions for each prompt with the policy
(`generate.sample_completions`), scores them with a reward function (`rewards.score_rows`: a failed reward is
recorded, never made 0), and computes the reference log-probs of the same tokens (`ReferenceModel`):

    KL(pi || pi_ref) ~ mean over samples y ~ pi of  sum_t log pi(y_t | ...) - log pi_ref(y_t | ...)

(pi's log-probs are those of its untempered softmax, recorded while sampling). `GenerationScores.summary`
gives the `eval_gen/*` metrics: reward mean and standard error (over per-prompt means, so samples of one
prompt are not counted as independent), KL and its standard error, length in tokens, the fraction of samples
that ended with EOS, and the count of failed rewards.

`GenerationEval` binds a run's settings (the `eval_generation:` config section): the held-out prompts, the
reward and the reference; `copg train` calls it every `every_steps` updates, `copg eval` on a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from copg_jax import streams
from copg_jax.data.config import DataConfig
from copg_jax.data.layout import bucket_length
from copg_jax.data.refcache import ReferenceModel
from copg_jax.generate import SamplingConfig, sample_completions
from copg_jax.prompt_pool import PromptPool, prompt_rows, read_pool
from copg_jax.rewards import RewardFn, refuse_all_failed, score_rows_shared, take_fields, with_completion_ids
from copg_jax.run_config import EvalGenerationSection, policy_sampling

log = logging.getLogger(__name__)

PREFIX = "eval_gen/"


@dataclasses.dataclass(frozen=True)
class GenerationScores:
    """Per-sample results of N prompts x S samples.

    Attributes:
      rewards: [N, S] float64, NaN where the reward failed.
      log_ratios: [N, S] float64 summed log pi - log pi_ref of each sample's tokens.
      lengths: [N, S] int completion tokens (EOS included when sampled).
      finished: [N, S] bool, True where the sample ended with EOS.
      texts: [N][S] decoded completions.
      token_ids: [N][S] sampled token ids (EOS included when sampled).
      errors: [N * S] None, or why the reward failed (row-major).
      parts: with several reward functions, each one's [N, S] unweighted scores by name (NaN where it failed
        or does not apply).
      policy_samples: whether the samples were drawn from the policy itself (`policy_sampling`): only then is
        the mean log-ratio a KL(pi || pi_ref) estimate.
    """

    rewards: np.ndarray
    log_ratios: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    errors: list[str | None]
    parts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    policy_samples: bool = True

    def summary(self) -> dict[str, float]:
        """`eval_gen/*` metrics. The reward is the mean over prompts of each prompt's mean over its scored
        samples (prompts without one left out; NaN when none is scored), so that a prompt whose samples failed
        more weighs no less; the standard errors are those of means over prompts (a prompt's samples are not
        independent of each other: the spread between prompts is the estimate's). With several reward
        functions, each one's reward alike (`reward/<function>`). The mean log-ratio is `kl` where the samples
        are the policy's own, else `log_ratio` (tempered or truncated samples: E_q[log pi - log pi_ref] under
        the sampling distribution q is not KL(pi || pi_ref), and may be negative)."""
        scored = ~np.isnan(self.rewards)
        kl = "kl" if self.policy_samples else "log_ratio"
        per_prompt = _per_prompt_means(self.rewards)
        return {
            f"{PREFIX}reward": float(np.mean(per_prompt)) if scored.any() else float("nan"),
            **{
                f"{PREFIX}reward/{name}": float(np.mean(means)) if len(means) else float("nan")
                for name, means in ((name, _per_prompt_means(v)) for name, v in self.parts.items())
            },
            f"{PREFIX}reward_stderr": _stderr(per_prompt),
            f"{PREFIX}{kl}": float(np.mean(self.log_ratios)),
            f"{PREFIX}{kl}_stderr": _stderr(self.log_ratios.mean(axis=1)),
            f"{PREFIX}length": float(np.mean(self.lengths)),
            f"{PREFIX}finished": float(np.mean(self.finished)),
            f"{PREFIX}failures": float(np.sum(~scored)),
            f"{PREFIX}samples": float(self.rewards.size),
        }


def _per_prompt_means(values: np.ndarray) -> np.ndarray:
    """[N', ] each prompt's mean over its values that are not NaN, of the N' prompts that have one."""
    scored = ~np.isnan(values)
    counts = scored.sum(axis=1)
    return np.where(scored, values, 0.0).sum(axis=1)[counts > 0] / counts[counts > 0]


def _stderr(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def evaluate_generations(
    policy: nnx.Module,
    reference: ReferenceModel,
    tokenizer,
    prompts: Sequence,
    prompt_ids: Sequence[Sequence[int]],
    reward_fn: RewardFn,
    sampling: SamplingConfig,
    num_samples: int,
    key: jax.Array,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    policy_scorer: ReferenceModel | None = None,
    fields: Mapping[str, Sequence] | None = None,
) -> GenerationScores:
    """Samples, scores and reference-scores `num_samples` completions of each prompt. The KL's policy
    log-probs come from a full forward pass, as the reference's do (those recorded while sampling differ where
    the model's decoding does: Phi-3 LongRoPE re-encodes a row at its pretrained length, as transformers'
    generate() does, where a full forward uses the long factors throughout).

    Args:
      policy: the policy to evaluate (a copg_jax decoder).
      reference: pi_ref, for the KL.
      tokenizer: the policy's tokenizer.
      prompts: N prompts as the reward sees them (strings or chat messages).
      prompt_ids: N token-id lists, as training tokenises the prompts.
      reward_fn: batched `fn(prompts, completions[, finished]) -> scores` (`rewards.base`).
      sampling: how tokens are drawn.
      num_samples: S completions per prompt.
      key: PRNG key of the samples.
      batch_size: prompt-completion rows per generation and reference call.
      mesh: shard generation and reference rows over the mesh's batch axes (needed on several processes:
        every process passes the same prompts and gets all the results).
      policy_scorer: a `ReferenceModel` of the policy's structure whose compiled forward to reuse (its
        `with_weights(policy)` scores the policy); None: `reference`'s when the policy has its structure (no
        LoRA: no program compiled for the policy at all), else one made for this call.
      fields: name -> N values of each prompt's other fields (`rewards.base.row_fields`), for a reward
        function that takes them.
    Returns:
      GenerationScores of [N, S] arrays.
    """
    n, s = len(prompt_ids), num_samples
    samples = sample_completions(policy, tokenizer, prompt_ids, s, sampling, key, batch_size, mesh)
    flat = [c for comps in samples for c in comps]
    # each process of a multi-host run scores its share of the samples; every process gets all scores
    result = score_rows_shared(
        reward_fn,
        [p for p in prompts for _ in range(s)],
        [c["text"] for c in flat],
        [c["finished"] for c in flat],
        with_completion_ids(
            take_fields(fields, [i for i in range(n) for _ in range(s)]), [c["token_ids"] for c in flat]
        ),
    )
    # one row length for every call: a single compilation of the reference forward
    length = bucket_length(max(len(p) for p in prompt_ids) + sampling.max_new_tokens, (), 32)
    per_call = max(1, batch_size // s)
    examples = [
        (np.asarray(p, np.int32), [np.asarray(c["token_ids"], np.int32) for c in comps])
        for p, comps in zip(prompt_ids, samples, strict=True)
    ]

    def full_forward(scorer: ReferenceModel) -> np.ndarray:
        out = []
        for start in range(0, n, per_call):
            chunk = examples[start : start + per_call]
            chunk += [None] * (per_call - len(chunk))  # padding prompts keep the shape fixed
            out.append(scorer.completion_logps(chunk, s, length, mesh=mesh))
        return np.concatenate(out)[:n].astype(np.float64)

    ref_logps = full_forward(reference)
    policy_logps = full_forward((reference if policy_scorer is None else policy_scorer).scorer_for(policy))
    return GenerationScores(
        rewards=result.scores.reshape(n, s),
        log_ratios=policy_logps - ref_logps,
        lengths=np.asarray([len(c["token_ids"]) for c in flat]).reshape(n, s),
        finished=np.asarray([c["finished"] for c in flat]).reshape(n, s),
        texts=[[c["text"] for c in comps] for comps in samples],
        token_ids=[[c["token_ids"] for c in comps] for comps in samples],
        errors=result.errors,
        parts={name: values.reshape(n, s) for name, values in result.parts.items()},
        policy_samples=policy_sampling(sampling),
    )


def eval_pool(section: EvalGenerationSection, data_cfg: DataConfig, tokenizer) -> PromptPool:
    """The held-out prompts, read on this process (`PromptPool.agree` compares them across processes): the
    rows of `prompts_path`, or the distinct prompts of `data.eval_path`, the first `num_prompts` of them (all
    when 0), and the reward.

    Raises:
      ValueError: as `prompt_pool.read_pool`.
    """
    rows = prompt_rows(
        section.prompts_path,
        section.prompt_col,
        data_cfg,
        data_cfg.eval_path,
        data_cfg.eval_split,
        "eval_generation.prompts_path",
    )
    where = section.prompts_path or data_cfg.eval_path
    if section.num_prompts > len(rows):
        log.warning(
            "eval_generation.num_prompts=%d: %s holds %d distinct prompts; evaluating on all of them",
            section.num_prompts,
            where,
            len(rows),
        )
    rows = rows[: section.num_prompts] if section.num_prompts else rows
    return read_pool(rows, tokenizer, data_cfg, section.reward, where, "evaluation-by-generation prompts")


class GenerationEval:
    """A run's evaluation by generation: `evaluator(policy) -> eval_gen/* metrics` on fixed held-out prompts.

    Args:
      section: the `eval_generation:` settings (a reward must be set).
      data_cfg: how prompts are tokenised (chat template, max_prompt_length, side).
      tokenizer: the policy's tokenizer.
      reference: pi_ref, e.g. `ReferenceModel(from_pretrained(model.path))`, or a snapshot of the initial
        weights taken before training updates (donates) them.
      mesh: shard generation rows over the training mesh.
      pool: the prompts and reward (`eval_pool`, agreed by the processes); None: read here.
    """

    def __init__(
        self,
        section: EvalGenerationSection,
        data_cfg: DataConfig,
        tokenizer,
        reference: ReferenceModel,
        mesh: Mesh | None = None,
        pool: PromptPool | None = None,
    ):
        if not section.enabled:
            raise ValueError("eval_generation.reward: no reward set (reward.fn, reward.model or code_tests)")
        self.section, self.tokenizer, self.reference, self.mesh = section, tokenizer, reference, mesh
        if pool is None:
            pool = eval_pool(section, data_cfg, tokenizer)
            pool.agree()
        self.pool = pool
        self.sampling = SamplingConfig(
            section.max_new_tokens, section.temperature, section.top_k, section.top_p, data_cfg.eos_token
        )
        if not policy_sampling(self.sampling):
            log.warning(
                "eval_generation samples at temperature %g, top_k %d, top_p %g, not from the policy itself: "
                "eval_gen/log_ratio (the mean log-ratio of those samples) is logged in place of eval_gen/kl, "
                "which it does not estimate",
                section.temperature, section.top_k, section.top_p,
            )  # fmt: skip
        self._scorer: ReferenceModel | None = None  # the policy's forward, compiled once for every call
        self.scored = False  # whether an evaluation of this process has been scored yet

    def scores(self, policy: nnx.Module) -> GenerationScores:
        """Per-sample scores of `policy`'s completions of the held-out prompts (same draws every call)."""
        if self._scorer is None:  # the reference's compiled forward where the policy has its structure
            self._scorer = self.reference.scorer_for(policy)
        return evaluate_generations(
            policy,
            self.reference,
            self.tokenizer,
            [r["prompt"] for r in self.pool.rows],
            self.pool.prompt_ids,
            self.pool.reward_fn,
            self.sampling,
            self.section.num_samples,
            jax.random.fold_in(jax.random.key(self.section.seed), streams.EVAL_GENERATION),
            self.section.batch_size,
            self.mesh,
            self._scorer,
            self.pool.fields,
        )

    def __call__(self, policy: nnx.Module) -> dict[str, float]:
        scores = self.scores(policy)
        if not self.scored:  # the first one only: a later one runs before its step's save would
            refuse_all_failed(scores.errors, "evaluation by generation")
        self.scored = True
        failed = [e for e in scores.errors if e is not None]
        if failed:  # as rollouts warn: a reward failing on every sample left eval_gen/reward NaN, unsaid
            log.warning(
                "evaluation by generation: the reward failed on %d of %d samples (e.g. %s)",
                len(failed), len(scores.errors), failed[0],
            )  # fmt: skip
        return scores.summary()
