"""The top-level run `Config`: the sections of a training run, composed from `copg_jax.config` machinery.

Lives apart from `config.py` so that section modules (e.g. `copg_jax.data.config`) may import the generic
machinery without an import cycle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml

from copg_jax import config as config_lib
from copg_jax import paths
from copg_jax.config import MAX_SEED, ConfigError
from copg_jax.data.config import DataConfig
from copg_jax.distributed import DistributedConfig
from copg_jax.losses import LOSSES
from copg_jax.rewards.config import RewardConfig

DTYPES = ("float32", "bfloat16", "float16")


def _require(obj: Any, section: str, rules: dict[str, tuple[bool, str]]) -> None:
    """Raises ConfigError naming the first failing key; `rules` maps key -> (ok, "must be ...")."""
    for name, (ok, rule) in rules.items():
        if not ok:
            raise ConfigError(f"{section}.{name}: {rule}, got {getattr(obj, name)!r}")


@dataclasses.dataclass
class ModelSection:
    """The policy: a local HF folder, or an inline HF-style config for a random-init (tiny) model."""

    path: str = ""
    """Local HF folder (config.json + *.safetensors [+ tokenizer]) to fine-tune."""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Inline HF config.json contents (with `model_type`) for a randomly initialised model; used when `path`
    is empty."""
    tokenizer: str = ""
    """Tokenizer folder; "" = `path`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Compute dtype of activations and matmuls (parameters are cast to it inside the step)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the master parameters and optimizer moments."""
    remat: Literal["none", "full", "dots_saveable", "minimal", "attention", "minimal_attention"] = "none"
    """Rematerialisation of each decoder block in the backward pass ("attention": keep only each block's
    attention output and log-sum-exp; "minimal_attention": those plus the weight matmuls)."""
    attention: Literal["auto", "xla", "blockwise", "pallas_gpu", "cudnn", "splash"] = "auto"
    """Attention backend (copg_jax.models.attention): xla = explicit-mask reference; blockwise = flash
    attention in plain JAX; pallas_gpu / cudnn / splash = fused kernels; auto = the platform's fastest."""
    head_remat: Literal["auto", "none", "full"] = "auto"
    """The output head's softmax in the backward pass: "none" keeps it from the forward pass (N x T x V
    float32 per microbatch), "full" recomputes it (one more head matmul), "auto" keeps it up to 1 GiB."""
    scan_layers: bool = False
    """Run the decoder blocks as one `lax.scan` over layer-stacked parameters: compile time no longer grows
    with depth (HF folders in and out are unchanged)."""
    grouped_matmul: Literal["auto", "ragged_dot", "megablox", "pallas"] = "auto"
    """A mixture of experts' expert matmuls (copg_jax.models.moe): ragged_dot = jax.lax.ragged_dot (the
    reference); megablox = ragged_dot with megablox's TPU kernel for the weights' gradient; pallas = the GPU
    Pallas kernels; auto = pallas on GPU, megablox on TPU, when they tile the sizes, else ragged_dot."""

    def __post_init__(self):
        if bool(self.path) == bool(self.config):
            raise ConfigError(
                "model: set exactly one of model.path (HF folder) or model.config (inline HF dict)"
            )
        if self.config and "model_type" not in self.config:
            raise ConfigError("model.config: an inline HF config needs a 'model_type' key (e.g. 'llama')")
        if not (self.tokenizer or self.path):
            raise ConfigError("model.tokenizer: a random-init model (model.config) needs a tokenizer folder")


@dataclasses.dataclass
class LoRASection:
    """Parameter-efficient training: LoRA adapters on the policy's dense layers, the base weights frozen
    (settings and module names as PEFT's `LoraConfig`; copg_jax/models/lora.py)."""

    rank: int = 0
    """Adapter rank r; 0 = off (full fine-tuning)."""
    alpha: float = 8.0
    """The adapters' update is scaled by alpha / rank (PEFT's lora_alpha, default 8)."""
    rslora: bool = False
    """Rank-stabilised LoRA (PEFT's use_rslora, arXiv 2312.03732): the update is scaled by alpha / sqrt(rank)
    instead, so that larger ranks keep learning; with `adapter_path`, the adapter's use_rslora."""
    dora: bool = False
    """Weight-decomposed LoRA (PEFT's use_dora, arXiv 2402.09353): each adapted layer also trains a magnitude
    per output feature, y = (m / ||W + dW||) x (W + dW), the norm held constant in the backward pass as PEFT
    does (on a fused module, per output feature of the fused weight). With `adapter_path`, the adapter's
    use_dora."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs in training (PEFT's lora_dropout); its randomness derives from
    train.seed and the update number, so a resumed run draws the same masks."""
    target_modules: list[str] | str = dataclasses.field(default_factory=list)
    """Modules to adapt, named as PEFT names them: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj (Llama, Mistral, Qwen, SmolLM3, Seed-OSS, Gemma, OLMo, EXAONE, Granite); qkv_proj, o_proj,
    gate_up_proj, down_proj (Phi-3; GLM-4 with q/k/v apart); c_attn, c_proj, c_fc (GPT-2); query_key_value,
    dense, dense_h_to_4h, dense_4h_to_h (GPT-NeoX); "all-linear" = all of them. A fused module gets one
    adapter, as PEFT gives it. [] = PEFT's default for the family (q_proj and v_proj; c_attn;
    query_key_value; where PEFT has none, Phi-3's qkv_proj and Granite's and GLM-4's q_proj and v_proj), or
    the adapter's own modules with `adapter_path`. A string that is a regular expression matches full module
    names as PEFT matches them (".*\\.(q|v)_proj"); it must select the same modules in every block."""
    adapter_path: str = ""
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. trained with TRL +
    PEFT) to start from; its r and lora_alpha must equal rank and alpha, its modules target_modules."""
    reference: Literal["adapters_off", "cache"] = "adapters_off"
    """The reference policy's log-probs: "adapters_off" = computed inside each train / eval step by the
    frozen base with the adapters off (no reference cache, no second copy of the weights; one more forward
    pass per step); "cache" = the reference cache as without LoRA (data.ref_cache)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def __post_init__(self):
        _require(
            self,
            "lora",
            {
                "rank": (self.rank >= 0, "must be >= 0 (0 = off)"),
                "alpha": (self.alpha > 0, "must be > 0"),
                "dropout": (0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            },
        )
        if self.adapter_path and not self.enabled:
            raise ConfigError("lora.adapter_path: set lora.rank (the adapter's r) to train an adapter")


@dataclasses.dataclass
class LossSection:
    """Which objective, and its KL strength."""

    name: str = "copg"
    """One of `copg_jax.losses.LOSSES`: copg, ipo, dpo, offpolicy_pg, offpolicy_pg_loo."""
    beta: float = 0.1
    """KL regularisation strength (IPO's tau for ipo; CoPG(beta) on preference rows is IPO(tau = beta))."""
    length_average: bool | None = None
    """Divide each sequence log-ratio by its completion length (arXiv 2406.19188); null = the loss's default,
    TRL's for the names TRL has: true for ipo (TRL's "ipo"), false for the others (`losses`)."""
    router_aux_loss_coef: float | None = None
    """A mixture of experts' router load-balancing loss, added to the loss times this coefficient
    (transformers' load_balancing_loss_func over the policy's rows, as transformers and TRL add it); null =
    as the model's config.json asks (its router_aux_loss_coef with output_router_logits: true, else 0)."""

    def __post_init__(self):
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ConfigError(f"loss.router_aux_loss_coef: must be >= 0, got {self.router_aux_loss_coef}")
        if self.name not in LOSSES:
            raise ConfigError(f"loss.name: {self.name!r} is not one of {sorted(LOSSES)}")
        if self.beta <= 0:
            raise ConfigError(f"loss.beta: must be > 0, got {self.beta}")


@dataclasses.dataclass
class OptimSection:
    """AdamW with linear warmup, a decay schedule, global-norm clipping and gradient accumulation."""

    lr: float = 1e-6
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `lr` over this many updates."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to `lr * end_lr_ratio` at `train.steps`."""
    end_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine/linear)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW's), not applied to biases and norms (`train.NO_DECAY`)."""
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip gradients by global norm; <= 0 disables."""
    grad_accum_steps: int = 1
    """Data batches (each `data.batch_size` prompts) accumulated per update, scanned as microbatches."""
    bf16_compensation: bool = True
    """With model.param_dtype=bfloat16 in a full fine-tune: updates enter the weights by Kahan summation,
    a bfloat16 residual per weight keeping what rounding dropped (2 more bytes per parameter). Off, any
    update below half a weight's bfloat16 spacing (2^-9 of it) is lost: most of them at lr <= 1e-5."""

    def __post_init__(self):
        _require(
            self,
            "optim",
            {
                "lr": (self.lr >= 0, "must be >= 0"),
                "warmup_steps": (self.warmup_steps >= 0, "must be >= 0"),
                "grad_accum_steps": (self.grad_accum_steps >= 1, "must be >= 1"),
                "end_lr_ratio": (0.0 <= self.end_lr_ratio <= 1.0, "must be in [0, 1]"),
                "weight_decay": (self.weight_decay >= 0, "must be >= 0"),
                "b1": (0.0 <= self.b1 < 1.0, "must be in [0, 1)"),
                "b2": (0.0 <= self.b2 < 1.0, "must be in [0, 1)"),
                "eps": (self.eps > 0, "must be > 0 (Adam divides by sqrt(nu) + eps: 0/0 for unused weights)"),
            },
        )


@dataclasses.dataclass
class MeshSection:
    """Device mesh (data, fsdp, expert, tensor); `data: -1` takes all remaining devices."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    """Expert parallelism for a mixture of experts: each device along this axis holds (and runs) 1/expert of
    the experts, whole, and the tokens of its group are all-gathered to them instead of the expert weights
    to the tokens; it must divide the model's experts. For the other parameters and the batch: like fsdp."""
    tensor: int = 1
    replication_tolerance: float = 0.05
    """Largest fraction of parameters (by element count) the mesh may leave less sharded than their logical
    axes ask (a dimension its fsdp/tensor axes do not divide is replicated); above it the run stops before
    loading data, naming the tensors and axes. The fraction is always logged."""

    def __post_init__(self):
        if self.data == 0 or self.data < -1 or min(self.fsdp, self.expert, self.tensor) < 1:
            raise ConfigError(f"mesh: sizes must be >= 1 (data may be -1), got {self}")
        if not 0.0 <= self.replication_tolerance <= 1.0:
            raise ConfigError(
                f"mesh.replication_tolerance: must be in [0, 1], got {self.replication_tolerance}"
            )


@dataclasses.dataclass
class CheckpointSection:
    """Orbax checkpoints of the run (state, optimizer, RNG, data position)."""

    dir: str = ""
    """Checkpoint folder (a local path or a URL); "" = `<train.output_dir>/checkpoints`. Orbax writes local
    paths and gs:// itself; other URLs are mirrored from a local staging folder, one process only
    (copg_jax/checkpoint.py)."""
    every_steps: int = 100
    """Save every this many updates (0 = only at the end and on SIGTERM)."""
    keep_last: int = 3
    """Keep the latest N checkpoints."""
    keep_best: int = 0
    """Also keep the best N by `best_metric` (needs periodic eval; its metrics are saved beside each step, so
    a resumed run ranks the steps before it; steps of versions that saved none there are kept, unranked)."""
    best_metric: str = "eval/loss"
    """An evaluation metric (eval/... or eval_gen/...: only those are saved with a checkpoint); a name the
    first evaluation does not give stops the run there, before a save could rank checkpoints by nothing."""
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = True
    """Write checkpoints in the background while training continues (false: each save waits for its write,
    within `async_timeout_s` as well)."""
    async_timeout_s: int = 1200
    """Seconds a background write may take before every process gives up on it (orbax's AsyncOptions
    timeout, its default): a write that failed on one host (a full disk there, its log says why) left the
    others waiting for it in a barrier until then; the run then stops on every process."""
    resume: bool = True
    """Resume from the latest good checkpoint in `dir` when there is one."""
    allow_changes: list[str] = dataclasses.field(default_factory=list)
    """Settings of what the run learns (loss, optimiser and schedule, model function, LoRA, rollouts,
    train.seed) that a resume may change from the checkpoint's: keys or whole sections (e.g. [loss.beta,
    optim]). A resume that changes any other is refused, naming them (`resume_changes`)."""

    def __post_init__(self):
        _require(
            self,
            "checkpoint",
            {
                "every_steps": (self.every_steps >= 0, "must be >= 0"),
                "keep_last": (self.keep_last >= 1, "must be >= 1"),
                "keep_best": (self.keep_best >= 0, "must be >= 0"),
                "async_timeout_s": (self.async_timeout_s >= 1, "must be >= 1"),
                "best_metric": (
                    self.keep_best == 0 or self.best_metric.startswith(("eval/", "eval_gen/")),
                    "must be an evaluation metric (eval/... or eval_gen/...), the metrics saved with a "
                    "checkpoint",
                ),
            },
        )


@dataclasses.dataclass
class TrainSection:
    """The loop: length, seed, logging, evaluation and outputs."""

    steps: int = 1000
    """Optimizer updates."""
    seed: int = 0
    """Seeds parameter init (random-init models)."""
    log_every: int = 10
    """Write metrics every this many updates, and at every checkpoint (a row pools the updates since the last:
    `pooled_metrics`)."""
    eval_every: int = 0
    """Evaluate on `data.eval_path` every this many updates (0 = only at the end, if eval data is set)."""
    eval_batches: int = 0
    """Eval batches per evaluation (0 = the whole eval set)."""
    output_dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, export; a local path or a
    URL of an fsspec filesystem (gs://, s3://, ...; copg_jax/paths.py says what is guaranteed there)."""
    export_on_finish: bool = False
    """Write the final policy as an HF folder to `<output_dir>/export`."""
    progress: bool = True
    """tqdm progress bar (process 0 only)."""
    peak_flops: float = 0.0
    """Peak FLOP/s per device for MFU; 0 = a known table for GPU/TPU, a measured matmul rate for CPU."""
    objective: Literal["policy", "reward_model"] = "policy"
    """What the run trains: the policy (with `loss`), or a Bradley-Terry reward model (`copg train-rm`): the
    model of `model.path` / `model.config` with a score head on the last token, trained on the pairs the
    data's rewards order (preference rows: chosen over rejected); exported as *ForSequenceClassification."""
    on_nonfinite: Literal["error", "skip"] = "error"
    """A non-finite loss or gradient norm: "error" stops the run before anything is saved, naming the step
    and its data position (the last good checkpoint stays the latest); "skip" leaves the parameters and
    optimizer unchanged for that batch and counts it (metric `skipped_updates`). Updates with a non-finite
    loss or gradient are never applied either way."""

    def __post_init__(self):
        _require(
            self,
            "train",
            {
                "steps": (self.steps >= 1, "must be >= 1"),
                "seed": (0 <= self.seed < MAX_SEED, "must be in [0, 2^32) (a JAX random key's range)"),
                "peak_flops": (self.peak_flops >= 0, "must be >= 0 (0 = known or measured)"),
                "log_every": (self.log_every >= 1, "must be >= 1"),
                "eval_every": (self.eval_every >= 0, "must be >= 0"),
                "eval_batches": (self.eval_batches >= 0, "must be >= 0"),
            },
        )


@dataclasses.dataclass
class RolloutSection:
    """Online mode: every `every_n_steps` updates, sample fresh completions, score them, add them to a replay
    buffer, and train on a mix of buffer and logged data (CoPG is off-policy, so both are valid samples)."""

    every_n_steps: int = 0
    """Updates between rollouts (a rollout also runs before the first update); 0 = offline training only."""
    num_prompts: int = 8
    """Prompts sampled per rollout (uniformly, without replacement, from the prompt pool)."""
    num_completions: int = 4
    """K completions generated per prompt (>= 2, <= the data's completion slots K)."""
    max_new_tokens: int = 64
    """Tokens sampled per completion at most (EOS included); <= data.max_completion_length."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    policy_lag: int = 0
    """Behaviour policy: 0 = the current policy; N = the policy as it was N rollouts ago (the initial policy
    until N rollouts have run)."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """How fresh completions are scored (exactly one of reward.fn / reward.model / reward.code_tests)."""
    prompts_path: str = ""
    """{prompt, ...} rows to roll out on (JSONL, or any source data.path takes, its data.split); "" = the
    prompts of the training data (data.path). Their other columns reach a reward function that names them.
    With data.path empty, training learns from these prompts' samples alone (GRPO's input: prompts, a
    reward, no logged completions)."""
    prompt_col: str = "prompt"
    """The prompts' column in `prompts_path` (GSM8K: question, MATH: problem)."""
    buffer_size: int = 256
    """Prompts (each with its scored completions) the replay buffer holds; the oldest leave first."""
    fresh_fraction: float = 0.5
    """Of each batch's data.batch_size prompts, round(fresh_fraction * batch_size) are drawn from the buffer,
    the rest from the logged data (all logged while the buffer is empty). The microbatches of one update
    draw disjoint prompts while the buffer holds enough for all of them (else each draws its own, distinct
    within it); a fraction that rounds to no prompt is refused. Without data.path (training from
    `prompts_path` alone) it must be 1, and a buffer holding less than a batch leaves padding prompts."""
    seed: int = 0
    """Seeds prompt sampling, generation and buffer sampling."""

    def fresh_per_batch(self, batch_size: int) -> int:
        """Prompts of a batch of `batch_size` drawn from the buffer (when it holds that many)."""
        return int(round(self.fresh_fraction * batch_size))

    def __post_init__(self):
        for name in ("every_n_steps", "policy_lag", "top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rollout.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("num_prompts", "max_new_tokens", "buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < MAX_SEED:
            raise ConfigError(f"rollout.seed: must be in [0, 2^32) (a JAX key's range), got {self.seed}")
        if self.num_completions < 2:
            raise ConfigError(f"rollout.num_completions: must be >= 2, got {self.num_completions}")
        if not 0.0 <= self.fresh_fraction <= 1.0:
            raise ConfigError(f"rollout.fresh_fraction: must be in [0, 1], got {self.fresh_fraction}")
        if self.every_n_steps and self.temperature == 0:
            raise ConfigError(
                f"rollout.temperature: 0 (greedy) samples {self.num_completions} identical completions of "
                "each prompt: no two differ, nothing trains; sample with a temperature > 0"
            )
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"rollout: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        if self.every_n_steps and not (self.reward.fn or self.reward.model or self.reward.code_tests):
            raise ConfigError(
                "rollout.reward: online mode (rollout.every_n_steps > 0) needs a reward: set one of "
                "rollout.reward.fn, rollout.reward.model, rollout.reward.code_tests"
            )


@dataclasses.dataclass
class EvalGenerationSection:
    """Evaluation by generation, as the paper measures a policy: sample held-out prompts with the current
    policy, score the samples with a reward, and log the reward (mean and standard error), the Monte-Carlo
    KL to the reference and the length (`eval_gen/*` metrics). On when a reward is set."""

    every_steps: int = 0
    """Updates between evaluations (0 = only at the end); also before the first update of a fresh run when
    `at_start`."""
    at_start: bool = True
    """Evaluate the initial policy (step 0) too, the start of the reward-over-steps curve."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """How samples are scored (one of reward.fn / reward.model / reward.code_tests); none = off."""
    prompts_path: str = ""
    """Held-out {prompt, ...} rows (JSONL, or any source data.path takes, its data.eval_split); "" = the
    distinct prompts of data.eval_path."""
    prompt_col: str = "prompt"
    """The prompts' column in `prompts_path`."""
    num_prompts: int = 64
    """Prompts evaluated: the first N of the pool, the same ones every time (0 = all)."""
    num_samples: int = 1
    """Completions sampled per prompt; the reward's standard error is taken over per-prompt means."""
    max_new_tokens: int = 128
    """Tokens sampled per completion at most (EOS included)."""
    temperature: float = 1.0
    """Sampling temperature. The KL estimate E[log pi - log pi_ref] is the KL of the policy only when the
    samples come from it: temperature 1, top_p 1, top_k 0; otherwise eval_gen/log_ratio is logged in place of
    eval_gen/kl."""
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64
    """Prompt-completion rows per generation / reference call."""
    seed: int = 0
    """Seeds the samples; the same seed each evaluation, so curves compare policies on the same draws."""

    @property
    def enabled(self) -> bool:
        return bool(self.reward.fn or self.reward.model or self.reward.code_tests)

    def __post_init__(self):
        _require(
            self,
            "eval_generation",
            {
                "every_steps": (self.every_steps >= 0, "must be >= 0"),
                "num_prompts": (self.num_prompts >= 0, "must be >= 0"),
                "num_samples": (self.num_samples >= 1, "must be >= 1"),
                "max_new_tokens": (self.max_new_tokens >= 1, "must be >= 1"),
                "temperature": (self.temperature >= 0, "must be >= 0"),
                "top_p": (0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
                "top_k": (self.top_k >= 0, "must be >= 0"),
                "batch_size": (self.batch_size >= 1, "must be >= 1"),
                "seed": (0 <= self.seed < MAX_SEED, "must be in [0, 2^32) (a JAX random key's range)"),
            },
        )


def policy_sampling(sampling: EvalGenerationSection | Any) -> bool:
    """Whether `sampling` (an EvalGenerationSection, or anything with its temperature, top_k and top_p: a
    generate.SamplingConfig) draws from the policy's own distribution: temperature 1, no top-k or top-p.
    Only then is the mean log-ratio of its samples a KL(pi || pi_ref) estimate."""
    return sampling.temperature == 1.0 and sampling.top_k == 0 and sampling.top_p == 1.0


@dataclasses.dataclass
class Config:
    """A training run. Load with `load_config(path, overrides)`."""

    model: ModelSection
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    eval_generation: EvalGenerationSection = dataclasses.field(default_factory=EvalGenerationSection)

    def __post_init__(self):
        if self.train.objective == "reward_model":
            for key, on in (("rollout.every_n_steps", self.rollout.every_n_steps),
                            ("eval_generation.reward", self.eval_generation.enabled)):  # fmt: skip
                if on:
                    raise ConfigError(f"{key}: not for a reward model (train.objective=reward_model)")
            if self.lora.enabled:
                raise ConfigError("lora.rank: LoRA trains policies, not reward models (train.objective)")
        rollout, batch = self.rollout, self.data.batch_size
        if rollout.every_n_steps and rollout.fresh_fraction > 0 and rollout.fresh_per_batch(batch) == 0:
            raise ConfigError(
                f"rollout.fresh_fraction: {rollout.fresh_fraction} of data.batch_size={batch} rounds to no "
                "fresh prompt: rollouts would train nothing (0 for none, or at least "
                f"{1 / batch:.3g}: one prompt)"
            )
        if not self.data.path and rollout.prompts_path and not rollout.every_n_steps:
            raise ConfigError(
                "rollout.every_n_steps: data.path is empty and rollout.prompts_path set, but online mode is "
                "off: training from prompts alone needs rollout.every_n_steps > 0 (1: on-policy) and "
                "rollout.fresh_fraction=1"
            )
        if rollout.every_n_steps and not self.data.path:  # online training from prompts alone
            if not rollout.prompts_path:
                raise ConfigError(
                    "rollout.prompts_path: online training without data.path samples the prompts of "
                    "rollout.prompts_path; set it (or data.path, scored data to mix fresh samples with)"
                )
            if rollout.buffer_size < batch:
                raise ConfigError(
                    f"rollout.buffer_size: {rollout.buffer_size}, less than data.batch_size={batch}: without "
                    "data.path every batch would be part padding; raise it (or lower data.batch_size)"
                )
            if rollout.fresh_fraction != 1:
                raise ConfigError(
                    f"rollout.fresh_fraction: {rollout.fresh_fraction}, but without data.path every prompt "
                    "of a batch is fresh: set it to 1 (or set data.path, the logged data to mix in)"
                )
        gen = self.eval_generation
        if gen.enabled and not (gen.prompts_path or self.data.eval_path):
            raise ConfigError(
                "eval_generation: a reward is set but no held-out prompts: set eval_generation.prompts_path "
                "or data.eval_path"
            )
        kl = self.checkpoint.best_metric.removeprefix("eval_gen/")
        if self.checkpoint.keep_best and not policy_sampling(gen) and kl in ("kl", "kl_stderr"):
            raise ConfigError(
                f"checkpoint.best_metric: {self.checkpoint.best_metric} is not logged when evaluation by "
                "generation samples at a temperature other than 1 or with top_k / top_p (its samples are not "
                f"the policy's); rank by eval_gen/{kl.replace('kl', 'log_ratio')}, or sample from the policy"
            )

        settings = settings_of(self) if self.checkpoint.allow_changes else {}
        for entry in self.checkpoint.allow_changes:  # a model.config key may be one a resume drops
            if not (any(covers(entry, key) for key in settings) or covers("model.config", entry)):
                raise ConfigError(f"checkpoint.allow_changes: {entry!r} names no setting or section")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or paths.join(self.train.output_dir, "checkpoints")

    def unread_settings(self) -> list[str]:
        """ "key (why)" for each setting moved off its default that this run never reads, and for settings
        that train otherwise than they read (a warmup past the run's end, a learning rate of 0): given on
        purpose they cost nothing, mistyped or forgotten they change nothing, which a run should say."""
        out = []

        def moved(section: Any, prefix: str, why: str, skip: tuple[str, ...] = ()) -> None:
            default = type(section)()
            for f in dataclasses.fields(section):
                if f.name not in skip and getattr(section, f.name) != getattr(default, f.name):
                    out.append(f"{prefix}.{f.name} (not read: {why})")

        if not self.lora.enabled:
            moved(self.lora, "lora", "lora.rank=0, a full fine-tune", ("rank",))
        if not self.rollout.every_n_steps:
            moved(self.rollout, "rollout", "rollout.every_n_steps=0, offline", ("every_n_steps",))
        if not self.eval_generation.enabled:
            moved(self.eval_generation, "eval_generation", "no eval_generation.reward", ("reward",))
        if not self.data.eval_path:
            for key in ("eval_every", "eval_batches"):
                if getattr(self.train, key):
                    out.append(f"train.{key} (not read: no data.eval_path)")
        if self.optim.schedule == "constant" and self.optim.end_lr_ratio != OptimSection.end_lr_ratio:
            out.append("optim.end_lr_ratio (not read: optim.schedule=constant)")
        if self.optim.warmup_steps >= self.train.steps:
            out.append(
                f"optim.warmup_steps={self.optim.warmup_steps} (>= train.steps={self.train.steps}: the "
                "learning rate never reaches optim.lr)"
            )
        if self.optim.lr == 0:
            out.append("optim.lr=0 (nothing trains)")
        if not self.optim.bf16_compensation and not self.trains_bf16_weights:
            out.append("optim.bf16_compensation (not read: no bfloat16 weights are trained)")
        return out

    @property
    def trains_bf16_weights(self) -> bool:
        """Whether the run trains bfloat16 master weights (model.param_dtype) — a full fine-tune: LoRA's
        adapters are float32 whatever the base's dtype."""
        return self.model.param_dtype == "bfloat16" and not self.lora.enabled

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer or self.model.path


# What a resume may change without checkpoint.allow_changes: where and how the run works (folders, mesh,
# logging, evaluation, kernels that compute the same function), and what the resume checks by content itself
# (data: the rows and their order, `DataIterator.set_state`; model.path: the reference's fingerprint). The
# rest sets what the run learns. Entries ending in "." are sections.
RESUME_FREE = (
    "checkpoint.",
    "mesh.",
    "distributed.",
    "eval_generation.",
    "data.",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.output_dir",
    "train.export_on_finish",
    "train.progress",
    "train.peak_flops",
    "train.on_nonfinite",
    "model.path",
    "model.tokenizer",
    "model.remat",
    "model.attention",
    "model.head_remat",
    "model.scan_layers",
    "model.grouped_matmul",
    "lora.adapter_path",
    "lora.reference",  # adapters_off or a cache of the same base's log-probs: the same reference
    "rollout.reward.batch_size",
    "rollout.reward.workers",
)
# sections compared only where a run uses them (on either side): (key prefix, the setting that turns it on)
RESUME_WHEN_ON = (("rollout.", "rollout.every_n_steps"), ("lora.", "lora.rank"), ("train.seed", "lora.rank"))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_of(cfg: Config) -> dict[str, Any]:
    """The config as flat `section.key` -> JSON value (tuples as lists; model.config's keys as
    model.config.<key>): what a checkpoint records of the run that wrote it."""
    return json.loads(json.dumps(_flat(config_lib.to_dict(cfg)), default=str))


def covers(entry: str, key: str) -> bool:
    """Whether `entry` (a key, a section, or a RESUME_FREE entry ending in ".") covers `key`."""
    entry = entry.rstrip(".")
    return key == entry or key.startswith(entry + ".")


def resume_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The settings of what the run learns that `cfg` changes from `saved` (a checkpoint's `settings_of`), as
    keys, sorted: not RESUME_FREE, nor train.steps under a constant schedule (it sets a decaying
    schedule's length), nor a section neither side uses (RESUME_WHEN_ON: rollouts of offline runs, LoRA
    settings and train.seed of full fine-tuning, whose random init the reference fingerprint checks). Only
    keys both know are compared (settings of another version of copg_jax are not), and model.config's
    keys, which a change may add or drop."""
    current = settings_of(cfg)
    free = RESUME_FREE + (("train.steps",) if cfg.optim.schedule == "constant" else ())
    free += tuple(prefix for prefix, on in RESUME_WHEN_ON if not (saved.get(on) or current.get(on)))
    return sorted(
        key
        for key in set(saved) | set(current)
        if ((key in saved and key in current) or key.startswith("model.config."))
        and saved.get(key) != current.get(key)
        and not any(covers(entry, key) for entry in free)
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Loads a run Config from YAML plus `key.sub=value` overrides; a bad key or value is a ConfigError."""
    try:
        return config_lib.load(Config, path, overrides)
    except ConfigError:
        raise
    except ValueError as e:  # a section's own validation (e.g. DataConfig.__post_init__)
        raise ConfigError(f"{e}" + (f" (in {path})" if path else "")) from None


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (loadable again by `load_config`)."""

    def plain(x):  # YAML's safe dumper knows lists, not tuples
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return yaml.dump(plain(config_lib.to_dict(cfg)), Dumper=_NoAliasDumper, sort_keys=False)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML (`config_yaml`)."""
    paths.write_text(path, config_yaml(cfg))


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value shared by two keys twice, never as an alias (configs refuse aliases on load)."""

    def ignore_aliases(self, data):
        return True
