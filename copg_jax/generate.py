"""Sampling completions with the model's KV cache: temperature / top-k / top-p, per-row EOS, one jitted loop.

`generate` takes a batch of (left- or right-) padded prompt token ids, prefills the cache once, then samples
up to `max_new_tokens` tokens per row inside `jax.lax.while_loop` (stopping early when every row is done). It
returns the tokens (padded after each row's EOS), their log-probabilities under the sampling distribution
(the behaviour policy mu actually used) and under the model's plain softmax (pi), and the lengths.

Phi-3's LongRoPE (`Decoder.reencode_position`): transformers' generation drops the cache when a sequence first
reaches past the pretrained length and re-encodes it whole with the long factors, so that from then on its
log-probs are those of a full forward (training's). Here a row does the same at its own crossing step (rows
cross at different steps, and LongRoPE decides per row: `layers.longrope_long`); other models never re-encode.

`sample_completions` is the text-level wrapper: prompts -> K completions each, via a tokenizer, in batches.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import xxhash
from flax import nnx, struct
from jax.sharding import Mesh

from copg_jax import paths
from copg_jax.config import MAX_SEED
from copg_jax.data.chat import TemplateRefused, check_template_kwargs, prompt_text, warn_untemplated
from copg_jax.data.config import DataConfig
from copg_jax.data.formats import BadRow, load_sources, prompt_to_sample, skip_summary, template_columns
from copg_jax.data.tokenize import cut_prompt, end_token_id, end_tokens
from copg_jax.jsonl import BadLine, dumps_row, read_jsonl_lines, write_jsonl
from copg_jax.models import from_pretrained, load_tokenizer
from copg_jax.sharding import global_array, logical_sharding, make_mesh, to_host

log = logging.getLogger(__name__)

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn (hashable: a static argument of the jitted loop).

    Attributes:
      max_new_tokens: tokens sampled per row at most (EOS included).
      temperature: softmax temperature; 0 = greedy (argmax).
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all).
      end_token: one more token that ends a row (`sample_completions`), beside the tokenizer's EOS and the
        model's own end tokens: data.eos_token, the token training ends finished completions with.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    end_token: str = ""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # nan sampled padding, inf uniformly
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}"
            )


@struct.dataclass
class Generation:
    """Sampled completions of N prompts.

    Attributes:
      tokens: [N, M] int32, `pad_id` after each row's end.
      logprobs: [N, M] float32 log-prob of each token under the sampling distribution (0 for greedy and pads).
      policy_logprobs: [N, M] float32 log-prob under the model's untempered, untruncated softmax (0 for pads).
      lengths: [N] int32 tokens per row, EOS included.
      finished: [N] bool, True where the row ended with an EOS (False: cut at max_new_tokens).
    """

    tokens: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits of the sampling distribution: divided by temperature, then top-k, then top-p masked to -inf.

    Ties at a cut-off are kept (so slightly more than k tokens may survive when logits tie).

    Args:
      logits: [N, V] float32.
    Returns:
      [N, V] float32; masked entries are NEG_INF.
    """
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < top_p  # the most likely token always has before = 0
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def sample_step(
    key: jax.Array, logits: jax.Array, cfg: SamplingConfig, num_tokens: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row, among ids < `num_tokens` when it is > 0.

    Args:
      key: PRNG key, or [N] keys: one per row.
      logits: [N, V] float32 model logits.
      num_tokens: the ids that may be drawn (the tokenizer's: a model's vocabulary padded past it has rows
        no text decodes to); 0 = all V.
    Returns:
      (tokens [N] int32, sampling log-probs [N], policy log-probs [N] under softmax(logits), all V ids).
    """
    policy = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    allowed = logits
    if 0 < num_tokens < logits.shape[-1]:
        allowed = jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits.astype(jnp.float32), NEG_INF)
    if cfg.temperature == 0.0:
        tokens = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
        sampling = jnp.zeros(tokens.shape, jnp.float32)
    else:
        filtered = jax.nn.log_softmax(filter_logits(allowed, cfg.temperature, cfg.top_k, cfg.top_p), axis=-1)
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        if key.ndim > (0 if typed else 1):  # a key per row (a raw uint32 key is [2] itself)
            tokens = jax.vmap(lambda k, x: jax.random.categorical(k, x))(key, filtered).astype(jnp.int32)
        else:
            tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        sampling = jnp.take_along_axis(filtered, tokens[:, None], axis=-1)[:, 0]
    return tokens, sampling, jnp.take_along_axis(policy, tokens[:, None], axis=-1)[:, 0]


def _reencode(model, rows, prompt_ids, prompt_positions, prompt_mask, tokens, t, hidden, cache):
    """A decoding step's (hidden, cache) with the rows `rows` re-encoded: the whole sequence of each (prompt
    and the t + 1 tokens sampled so far) prefilled into a fresh cache, every layer's keys and values
    recomputed (re-rotating the cached keys is not enough: the new rotation changes every layer's hidden
    states), as transformers' Phi-3 generation re-encodes. The other rows keep what `decode` gave them.

    Args:
      rows: [N] bool, the rows to re-encode.
      prompt_ids, prompt_positions, prompt_mask: [N, P] int32, as prefilled (mask 0 on padding).
      tokens: [N, M] int32 the tokens sampled, step t's included (in slots P + t of the cache).
      t: [] int32 the step.
      hidden: [N, 1, D] step t's hidden states by `decode`; cache: after that `decode` (P + M slots).
    Returns:
      (hidden [N, 1, D], cache), the rows' entries replaced.
    """
    n, p = prompt_ids.shape
    m = tokens.shape[1]
    sampled = jnp.broadcast_to(jnp.arange(m) <= t, (n, m)).astype(jnp.int32)  # slots written so far
    segments = jnp.concatenate([prompt_mask, sampled], axis=1)
    lengths = prompt_mask.sum(axis=1, keepdims=True)
    positions = jnp.concatenate([prompt_positions, (lengths + jnp.arange(m)) * sampled], axis=1)
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    full, fresh = model.prefill(ids, positions, segments, model.init_cache(n, p + m))
    step = jax.lax.dynamic_slice_in_dim(full, p + t, 1, axis=1)
    # the decoded cache's index (P + t + 1): the prefill's is P + M, its slots past P + t hold segment 0
    return jnp.where(rows[:, None, None], step, hidden), cache.where(~rows, fresh)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_ids", "pad_id", "num_tokens"))
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    row_ids,
    key,
    *,
    cfg: SamplingConfig,
    eos_ids,
    pad_id,
    num_tokens,
):
    model = nnx.merge(graphdef, state)
    n, p = prompt_ids.shape
    m = cfg.max_new_tokens
    mask = prompt_mask.astype(jnp.int32)
    prompt_lengths = mask.sum(axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) * mask
    cache = model.init_cache(n, p + m)
    hidden, cache = model.prefill(prompt_ids, positions, mask, cache)
    last = p - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # slot of each row's last prompt token
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    reencode_at = model.reencode_position  # static: None keeps other models' loop as it was

    def cond(carry):
        t, _, done, *_ = carry
        return (t < m) & ~jnp.all(done)

    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r[0]), r[1]))(row_ids)

    def body(carry):
        t, logits, done, cache, out = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)  # a row's draws are its own
        token, logp, policy_logp = sample_step(step_keys, logits, cfg, num_tokens)
        active = ~done
        token = jnp.where(active, token, pad_id)
        tokens, logps, policy_logps, lengths = out
        tokens = tokens.at[:, t].set(token)
        logps = logps.at[:, t].set(jnp.where(active, logp, 0.0))
        policy_logps = policy_logps.at[:, t].set(jnp.where(active, policy_logp, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        done = done | (active & jnp.isin(token, eos))
        step_pos = (prompt_lengths + t)[:, None]
        hidden, cache = model.decode(token[:, None], step_pos, jnp.ones((n, 1), jnp.int32), cache)
        if reencode_at is not None:  # only where some row's new token is the first past the pretrained length
            crossing = prompt_lengths + t == reencode_at
            reencode = functools.partial(_reencode, model, crossing, prompt_ids, positions, mask, tokens, t)
            hidden, cache = jax.lax.cond(crossing.any(), reencode, lambda *a: a, hidden, cache)
        logits = model.logits(hidden[:, 0])
        return t + 1, logits, done, cache, (tokens, logps, policy_logps, lengths)

    out = (
        jnp.full((n, m), pad_id, jnp.int32),
        jnp.zeros((n, m), jnp.float32),
        jnp.zeros((n, m), jnp.float32),
        jnp.zeros((n,), jnp.int32),
    )
    done = jnp.zeros((n,), bool)
    carry = (jnp.zeros((), jnp.int32), logits, done, cache, out)
    _, _, done, _, (tokens, logps, policy_logps, lengths) = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens, logps, policy_logps, lengths, done)


def _check_positions(config, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuses positions a learned position table lacks; warns past a rotary model's trained length."""
    needed, limit = longest_prompt + max_new_tokens, config.max_position_embeddings
    if needed <= limit:
        return
    msg = (
        f"the longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) needs {needed} "
        f"positions, more than the model's max_position_embeddings={limit}"
    )
    if config.position_embedding == "learned":
        raise ValueError(msg)
    log.warning("%s: rotary positions past the trained length degrade the samples", msg)


def generate(
    model: nnx.Module,
    prompt_ids: np.ndarray | jax.Array,
    prompt_mask: np.ndarray | jax.Array,
    key: jax.Array,
    cfg: SamplingConfig,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    num_tokens: int = 0,
    row_ids: np.ndarray | None = None,
) -> Generation:
    """Samples one completion per prompt row.

    Args:
      model: a copg_jax decoder (`init_cache`, `decode`, `logits`).
      prompt_ids: [N, P] int32 prompt tokens, left- or right-padded.
      prompt_mask: [N, P] bool, True on real prompt tokens (at least one per row).
      key: PRNG key.
      cfg: sampling settings.
      eos_ids: tokens that end a row (kept in the output and counted in its length).
      pad_id: written after a row's end.
      mesh: when given, rows are split along the mesh's batch axes ("batch" logical axis), as in training;
        rows are padded internally to a multiple of that split. On several processes every process passes
        the same prompts and gets global arrays back (`sharding.to_host` gathers them).
      num_tokens: only ids below it are sampled (`sample_step`); 0 = every id of the model's vocabulary.
      row_ids: [N, 2] int in [0, 2^31), each row's name (prompt, sample): row (p, j) draws from `key` folded
        with p, then j, so a row's sample does not depend on the rows beside it (how prompts were batched,
        a mesh's padding rows, how many samples each prompt has). Default (r, 0) for row r: a caller that
        splits its rows into several calls passes their names, or another key per call.
    Returns:
      Generation with [N, max_new_tokens] tokens.
    """
    prompt_ids = np.asarray(prompt_ids, np.int32)
    prompt_mask = np.asarray(prompt_mask, bool)
    chex.assert_rank(prompt_ids, 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    empty = np.flatnonzero(~prompt_mask.any(axis=1))
    if empty.size:
        raise ValueError(f"prompt row(s) {empty[:10].tolist()} have no tokens")
    _check_positions(model.config, int(prompt_mask.sum(axis=1).max()), cfg.max_new_tokens)
    graphdef, state = nnx.split(model)
    n = prompt_ids.shape[0]
    if row_ids is None:
        row_ids = np.stack([np.arange(n), np.zeros(n, np.int64)], axis=1)
    row_ids = np.asarray(row_ids)
    if row_ids.shape != (n, 2) or (row_ids.size and not np.issubdtype(row_ids.dtype, np.integer)):
        raise ValueError(f"row_ids must be [{n}, 2] integers, got {row_ids.dtype} {row_ids.shape}")
    if row_ids.size and not (0 <= row_ids.min() and row_ids.max() < 2**31):
        raise ValueError(f"row_ids must be in [0, 2^31), got [{row_ids.min()}, {row_ids.max()}]")
    row_ids = row_ids.astype(np.int32)
    kwargs = dict(
        cfg=cfg, eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id), num_tokens=int(num_tokens)
    )
    if mesh is None:
        return _generate(graphdef, state, prompt_ids, prompt_mask, row_ids, key, **kwargs)
    sharding = logical_sharding(mesh, ("batch", "length"))
    split = int(np.prod([mesh.shape[a] for a in sharding.spec[0] or ()])) if sharding.spec[0] else 1
    extra = -n % split
    if extra:  # dummy one-token rows, dropped below
        prompt_ids = np.concatenate([prompt_ids, np.zeros((extra, prompt_ids.shape[1]), np.int32)])
        dummy = np.zeros((extra, prompt_mask.shape[1]), bool)
        dummy[:, -1] = True
        prompt_mask = np.concatenate([prompt_mask, dummy])
        dummy_ids = np.stack([np.full(extra, 2**31 - 1), np.arange(extra)], axis=1).astype(np.int32)
        row_ids = np.concatenate([row_ids, dummy_ids])
    with jax.set_mesh(mesh):  # every process passes the same prompts and places its own devices' rows
        out = _generate(
            graphdef,
            state,
            global_array(prompt_ids, sharding),
            global_array(prompt_mask, sharding),
            global_array(row_ids, logical_sharding(mesh, ("batch", None))),
            key,
            **kwargs,
        )
    return jax.tree.map(lambda x: x[:n], out)


def _batch_prompts(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to [N, P] (P rounded up to a multiple of 8 to limit recompilation)."""
    width = -(-max(len(x) for x in ids) // 8) * 8
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
        tokens[i, width - len(x) :] = x
        mask[i, width - len(x) :] = True
    return tokens, mask


def end_token_ids(model: nnx.Module, tokenizer, end_token: str = "") -> list[int]:
    """The tokens that end a completion, the tokenizer's EOS first: it, the model's own end tokens
    (`ModelConfig.eos_token_ids`, from config.json and generation_config.json: e.g. Llama-3-Instruct's
    <|eot_id|>, Gemma-it's <end_of_turn>) and `end_token` (data.eos_token) when given; the ones training
    recognises at the end of a finished completion's recorded ids (`data.tokenize.end_tokens`).

    Raises:
      ValueError: `end_token` is not one token of the tokenizer.
    """
    ends = end_tokens(tokenizer, end_token, model.config.eos_token_ids)  # those training recognises
    return sorted(ends, key=lambda i: i != tokenizer.eos_token_id)


def check_prompt_vocab(prompt_ids: Sequence[Sequence[int]], vocab_size: int, what: str = "prompt") -> None:
    """Refuses prompt token ids past the model's vocabulary (a tokenizer that is not the model's): looked up
    past its embedding table they give NaN logits, which sampling reads as token 0, and a reward scores what
    it drew as any other completion.

    Raises:
      ValueError: naming the first such prompt (`what` i, from 0), an id outside and the vocabulary size.
    """
    for i, ids in enumerate(prompt_ids):
        low, high = (int(np.min(ids)), int(np.max(ids))) if len(ids) else (0, 0)
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{what} {i}: token id {low if low < 0 else high} is outside the model's vocab_size "
                f"{vocab_size}: the tokenizer is not this model's"
            )


def sample_completions(
    model: nnx.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    num_completions: int,
    cfg: SamplingConfig,
    key: jax.Array,
    batch_size: int = 64,
    mesh: Mesh | None = None,
) -> list[list[dict]]:
    """K completions for each tokenised prompt.

    Args:
      model: the sampling (behaviour) policy.
      tokenizer: HF tokenizer (EOS / pad ids, decoding); rows also end at the model's own end tokens and
        at `cfg.end_token` (`end_token_ids`).
      prompt_ids: one token-id list per prompt.
      num_completions: K.
      cfg: sampling settings.
      key: PRNG key; sample j of prompt p draws from it folded with p, then j, so the samples do not
        depend on `batch_size`, the mesh or `num_completions` (prompt p's first samples are the same for
        every K).
      batch_size: prompt-completion rows per generate call.
      mesh: optional mesh to shard rows over.
    Returns:
      per prompt, K dicts {text, token_ids, logprob (sum under mu), policy_logprob (sum under pi), finished};
      the end token of a finished row is in token_ids, not in text.
    Raises:
      ValueError: a prompt's ids past the model's vocabulary (`check_prompt_vocab`).
    """
    check_prompt_vocab(prompt_ids, model.config.vocab_size)
    eos = end_token_ids(model, tokenizer, cfg.end_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    # a vocabulary padded past the tokenizer's (Qwen2.5: 151936 rows for 151665 tokens): its extra rows
    # decode to no text, so a completion sampling one would train as another text than it was
    vocab_ids = tokenizer.get_vocab().values() if hasattr(tokenizer, "get_vocab") else ()  # may have gaps
    num_tokens = max(len(tokenizer), max(vocab_ids, default=-1) + 1, max(eos, default=-1) + 1)
    num_tokens = num_tokens if num_tokens < model.config.vocab_size else 0
    rows = [list(p) for p in prompt_ids for _ in range(num_completions)]
    results: list[dict] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens, mask = _batch_prompts(chunk, pad)
        # named (prompt, sample): the samples do not depend on batch_size, the mesh or num_completions
        row_ids = np.divmod(np.arange(start, start + len(chunk)), num_completions)
        row_ids = np.stack(row_ids, axis=1)
        out = jax.tree.map(
            to_host, generate(model, tokens, mask, key, cfg, eos, pad, mesh, num_tokens, row_ids)
        )
        for i in range(len(chunk)):
            length = int(out.lengths[i])
            ids = out.tokens[i, :length].tolist()
            text_ids = ids[:-1] if out.finished[i] else ids  # the EOS is not part of the text
            results.append(
                {
                    "text": tokenizer.decode(text_ids, skip_special_tokens=False),
                    "token_ids": ids,
                    "logprob": float(out.logprobs[i, :length].sum()),
                    "policy_logprob": float(out.policy_logprobs[i, :length].sum()),
                    "finished": bool(out.finished[i]),
                }
            )
    return [results[i : i + num_completions] for i in range(0, len(results), num_completions)]


def tokenize_prompts(
    tokenizer,
    prompts: Sequence,
    chat_template: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
    setting: str = "data.chat_template_kwargs",
    allow_empty: bool = False,
) -> list[list[int]]:
    """Prompt token ids, the way the data pipeline tokenises prompts for training (a prompt of no tokens
    refused, or with `allow_empty` left for the caller to treat).

    A message list (or any prompt when `chat_template`) goes through the tokenizer's chat template with the
    generation prompt, the template's variables `template_kwargs` (checked to be ones it reads; `setting`
    names them in errors) and no extra special tokens; a plain string gets the tokenizer's special tokens
    (BOS).
    """
    check_template_kwargs(tokenizer, template_kwargs or {}, setting)
    if not (chat_template or any(isinstance(p, list) for p in prompts)):
        warn_untemplated(template_kwargs or {}, setting)
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str | list):
            raise ValueError(f"prompt {i}: expected a string or a list of messages, got {type(p).__name__}")
        try:
            text, templated = prompt_text(tokenizer, p, chat_template, template_kwargs)
        except TemplateRefused as e:
            raise ValueError(f"prompt {i}: {e}") from None
        ids.append(list(tokenizer(text, add_special_tokens=not templated)["input_ids"]))
        if not ids[-1] and not allow_empty:
            raise ValueError(f"prompt {i} has no tokens after tokenisation")
    return ids


def _shown(prompt) -> str:
    text = json.dumps(prompt, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def prompt_token_ids(
    rows: list[dict], tokenizer, data_cfg: DataConfig, what: str = "prompts"
) -> tuple[list[np.ndarray], list[int]]:
    """[P_i] int32 token ids per {prompt, ...} row, tokenised and cut (to `max_prompt_length`, on
    `prompt_side`) the way the data pipeline treats training prompts: the prompts cut are counted in a logged
    warning; a prompt of no tokens, or one too long under `data.truncation=error`, is a bad row: refused, or
    under `data.on_bad_row=skip` left out and counted.

    Returns:
      (the ids of the rows kept, the indices of the rows left out).
    Raises:
      ValueError: a bad row (data.on_bad_row=error), naming the first.
    """
    limit = data_cfg.max_prompt_length
    prompts = [r["prompt"] for r in rows]
    ids = tokenize_prompts(
        tokenizer, prompts, data_cfg.chat_template, data_cfg.chat_template_kwargs, allow_empty=True
    )
    bad = {i: "has no tokens" for i, x in enumerate(ids) if not len(x)}
    long = [i for i, x in enumerate(ids) if len(x) > limit]
    if data_cfg.truncation == "error":
        reason = f"more than data.max_prompt_length={limit} (data.truncation=error)"
        bad |= {i: f"has {len(ids[i])} tokens, {reason}" for i in long}
        long = []
    if bad:
        first = min(bad)
        message = f"prompt {_shown(prompts[first])} (prompt row {first}) {bad[first]}"
        if data_cfg.on_bad_row == "error":
            raise ValueError(f"{what}: {message} (data.on_bad_row=skip drops and counts such rows)")
        log.warning(
            "%s: %d of %d prompts left out (data.on_bad_row=skip); the first: %s",
            what,
            len(bad),
            len(ids),
            message,
        )
    if long:
        log.warning(
            "%s: %d of %d prompts are longer than data.max_prompt_length=%d and are cut on the %s (data."
            "prompt_side), as training cuts them; the longest has %d tokens (prompt row %d)",
            what, len(long), len(ids), limit, data_cfg.prompt_side, max(len(ids[i]) for i in long),
            max(long, key=lambda i: len(ids[i])),
        )  # fmt: skip
    bos = tokenizer.bos_token_id
    cut = [np.asarray(cut_prompt(x, limit, data_cfg.prompt_side, bos), np.int32) for x in ids]
    return [x for i, x in enumerate(cut) if i not in bad], sorted(bad)


def prompts_digest(rows: list[dict], prompt_ids: list[np.ndarray], keys: Sequence[str] = ("tests",)) -> bytes:
    """16 bytes (xxh3-128) of prompt rows' prompts and `keys` (what a reward reads of them: code tests and
    the function they call; other columns, e.g. a dataset's images, are left out) and of their token ids:
    equal where the same prompts were read with the same tokenizer and settings. Keys past the first that
    no row has leave it as it was before they were read (a resume's digest of an earlier version)."""
    read = [[row.get("prompt"), row.get(keys[0])] for row in rows]
    h = xxhash.xxh3_128(json.dumps(read, sort_keys=True, ensure_ascii=False, default=repr).encode())
    for ids in prompt_ids:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.asarray(ids, np.int32).tobytes())
    if more := [key for key in keys[1:] if any(key in row for row in rows)]:
        values = {key: [row.get(key) for row in rows] for key in more}
        h.update(json.dumps(values, sort_keys=True, ensure_ascii=False, default=repr).encode())
    return h.digest()


def _require_column(found: list[tuple[str, dict]], path: str, column: str, problem: str, advice: str) -> None:
    """Refuses prompt rows `found` (read from `path`) none of which has `column`: a setting naming a column
    the file has not, one line rather than an error per row.

    Raises:
      ValueError: "<path>: <problem> (the columns: ...): <advice>".
    """
    if found and not any(column in row for _, row in found):
        have = ", ".join(map(repr, list(found[0][1])[:12]))
        raise ValueError(f"{path}: {problem} (the columns: {have}): {advice}")


def read_prompts(
    path: str,
    prompt_col: str = "prompt",
    split: str = "train",
    cache_dir: str = "",
    data_cfg: DataConfig | None = None,
) -> list[dict]:
    """{prompt, ...} rows (the prompt a string or chat messages) from a JSONL file (errors name its line) or
    any source `data.path` takes (Parquet, Arrow, CSV, JSON, a folder, a `save_to_disk` folder or
    hf://datasets/ORG/NAME, its `split`; errors name the row, from 0). The prompt is column `prompt_col`
    (GSM8K's `question`, MATH's `problem`), read as training reads a prompt under `data_cfg`
    (`formats.prompt_to_sample`: its `prompt_template`, `system_col` and checks); the other columns are
    carried through (code tests, a reward's fields). A bad row stops the reading, naming it, or under
    `data_cfg.on_bad_row=skip` is left out and counted in a logged warning.

    Raises:
      ValueError: a bad row (on_bad_row=error); no prompt.
    """
    cfg = DataConfig() if data_cfg is None else data_cfg
    skip = cfg.on_bad_row == "skip"
    hint = "" if data_cfg is None else " (data.on_bad_row=skip drops and counts such rows)"
    rows, skipped, bad_lines = [], collections.defaultdict(list), []
    if path.endswith((".jsonl", ".jsonl.gz")):
        if not paths.exists(path):
            raise FileNotFoundError(f"prompts file {path!r} does not exist")
        try:
            found = [(f"{path}:{n}", row) for n, row in read_jsonl_lines(path, bad_lines if skip else None)]
        except BadLine as e:  # its own message says to set data.on_bad_row, which copg generate has not
            raise ValueError(f"{e.path}:{e.line_no}: {e.detail}{hint}") from None
        for line in bad_lines:
            skipped[line.reason].append(f"{line.path}:{line.line_no}")
    else:
        columns = template_columns(cfg) if cfg.prompt_template else (prompt_col,)
        # a CSV column of mixed cells stays text, as `datasets` reads it (one answer "1/2" among numbers)
        try:
            sources = load_sources(
                path, split, cache_dir, cfg.on_bad_row, text_columns=tuple(columns), typed_cells=False
            )
        except ValueError as e:  # copg generate has no data.on_bad_row to point to
            if data_cfg is not None:
                raise
            raise ValueError(
                str(e).replace(" (data.on_bad_row=skip drops and counts such lines)", "")
            ) from None
        found = [(f"{src.name} row {i}", dict(row)) for src in sources for i, row in enumerate(src.rows)]
        bad_lines = [line for src in sources for line in src.skipped]
        for line in bad_lines:
            skipped[line.reason].append(f"{line.path} line {line.line_no}")
    templated = cfg.prompt_template and any(all(c in r for c in template_columns(cfg)) for _, r in found)
    if not templated:  # a column, not a row
        _require_column(
            found, path, prompt_col, f"no row has a column {prompt_col!r}", "name the prompts' column "
            "(rollout.prompt_col, eval_generation.prompt_col; copg generate --prompt-col)",
        )  # fmt: skip
    if cfg.system_col:
        _require_column(
            found, path, cfg.system_col, f"data.system_col={cfg.system_col!r}: no row has such a column",
            "its prompts would be sampled without the system turn training gives",
        )  # fmt: skip
    for where, row in found:
        try:
            prompt = prompt_to_sample(row, cfg, prompt_col)
        except BadRow as e:
            if not skip:
                raise ValueError(f"{where}: {e}{hint}") from None
            skipped[e.reason].append(where)
            continue
        rows.append({**row, "prompt": prompt})
    summary = f"{len(rows)} prompts from {len(found) + len(bad_lines)} rows"
    if skipped:
        summary += "; " + skip_summary({r: len(w) for r, w in skipped.items()}, skipped)
        log.warning("prompts %s: %s", path, summary)
    if not rows:
        raise ValueError(f"{path}: no prompts ({summary})")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`copg generate`: K completions per prompt from a policy (the behaviour policy mu of the data)."""
    p = argparse.ArgumentParser(prog="copg generate", description=main.__doc__)
    p.add_argument("--model", required=True, help="HF model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: --model)")
    p.add_argument(
        "--prompts", required=True, help="{prompt, ...} rows: JSONL, or any data source data.path takes"
    )
    p.add_argument("--prompt-col", default="prompt", help="the prompts' column (GSM8K: question)")
    p.add_argument(
        "--split", default="train", help="the split to read: of a hub dataset, or of a folder named by split"
    )
    p.add_argument(
        "--out", required=True, help="JSONL of {prompt, completions, behaviour_logprobs, ...} rows"
    )
    p.add_argument("--num-completions", type=int, default=4, help="K completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="rows (prompt x completion) per generate call")
    p.add_argument("--max-prompt-length", type=int, default=1024, help="prompt tokens kept (from the end)")
    p.add_argument("--chat-template", action="store_true", help="wrap string prompts in the chat template")
    p.add_argument(
        "--chat-template-kwargs",
        default="{}",
        help="the chat template's variables as a JSON object, e.g. '{\"enable_thinking\": false}' "
        "(data.chat_template_kwargs of the training run)",
    )
    p.add_argument(
        "--eos-token",
        default="",
        help="one more token that ends a completion (data.eos_token of the training run: a chat model's turn "
        "end), beside the tokenizer's EOS and the model's end tokens",
    )
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    for flag in ("num_completions", "batch_size", "max_prompt_length"):  # checked before the model loads
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.seed < MAX_SEED:  # a JAX key: 2^32 + k drew what k draws
        p.error("--seed must be in [0, 2^32)")
    cfg = SamplingConfig(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.eos_token
    )  # its errors, first
    try:
        variables = json.loads(args.chat_template_kwargs)
        if not isinstance(variables, dict):
            raise ValueError(f"data.chat_template_kwargs: expected a JSON object, got {variables!r:.60}")
        DataConfig(chat_template_kwargs=variables)  # a reserved name, a value that is no plain data
    except ValueError as e:  # named as the flag (JSON's own errors: prefixed with it)
        message = str(e).replace("data.chat_template_kwargs", "--chat-template-kwargs", 1)
        p.error(message if message.startswith("--") else f"--chat-template-kwargs: {message}")

    rows = read_prompts(args.prompts, args.prompt_col, args.split)
    # the columns carried through to --out: one JSON cannot hold (bytes, an image) stops it before sampling
    extras = [{k: v for k, v in row.items() if k not in ("completions", "rewards")} for row in rows]
    for i, extra in enumerate(extras):
        dumps_row(extra, f"{args.prompts}: prompt row {i}")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    try:  # before the model loads
        if args.eos_token:
            end_token_id(tokenizer, args.eos_token)
        check_template_kwargs(tokenizer, variables, "--chat-template-kwargs")
    except ValueError as e:
        p.error(str(e) if str(e).startswith("--") else f"--eos-token: {e}")
    mesh = make_mesh() if jax.device_count() > 1 else None
    model = from_pretrained(args.model, dtype=jnp.dtype(args.dtype), mesh=mesh)
    whole = tokenize_prompts(
        tokenizer, [r["prompt"] for r in rows], args.chat_template, variables, "--chat-template-kwargs"
    )
    if long := [i for i, ids in enumerate(whole) if len(ids) > args.max_prompt_length]:
        longest = max(long, key=lambda i: len(whole[i]))
        log.warning(  # sampled after their end alone: training, cutting by its own settings, may see more
            "%d of %d prompts are longer than --max-prompt-length=%d and are sampled after their last %d "
            "tokens; the longest has %d tokens (prompt row %d)",
            len(long), len(whole), args.max_prompt_length, args.max_prompt_length,
            len(whole[longest]), longest,
        )  # fmt: skip
    prompt_ids = [cut_prompt(ids, args.max_prompt_length, "left", tokenizer.bos_token_id) for ids in whole]
    limit = model.config.max_position_embeddings
    if model.config.position_embedding == "learned" and prompt_ids:  # a learned table has no more positions
        longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        if len(prompt_ids[longest]) + args.max_new_tokens > limit:
            p.error(
                f"prompt row {longest} ({len(prompt_ids[longest])} tokens) + --max-new-tokens "
                f"{args.max_new_tokens} needs more positions than the model's "
                f"max_position_embeddings={limit}: set --max-prompt-length <= {limit - args.max_new_tokens} "
                "(or fewer new tokens)"
            )
    samples = sample_completions(
        model,
        tokenizer,
        prompt_ids,
        args.num_completions,
        cfg,
        jax.random.key(args.seed),
        args.batch_size,
        mesh,
    )
    out = args.out  # a local path or a URL (write_jsonl)
    unfinished = 0
    if jax.process_index() == 0:
        records = []
        for row, extra, comps in zip(rows, extras, samples, strict=True):
            unfinished += sum(not c["finished"] for c in comps)
            templated = isinstance(row["prompt"], list) or args.chat_template
            if templated:  # the variables it was rendered with, as JSON text (any reader keeps it as is)
                extra["chat_template_kwargs"] = json.dumps(variables, sort_keys=True)
            records.append(
                {
                    **extra,
                    "completions": [c["text"] for c in comps],
                    # the sampled tokens, a finished one's end token last (not in the text): training uses
                    # them where they still decode to the text, so it trains the tokens sampled (the end
                    # token the policy stopped on among several), not a re-tokenisation
                    "completion_token_ids": [c["token_ids"] for c in comps],
                    "behaviour_logprobs": [c["logprob"] for c in comps],
                    # training ends finished completions only, and tokenises the prompt the same way
                    "finished": [c["finished"] for c in comps],
                    "chat_template": templated,
                }
            )
        write_jsonl(out, records)
        total = len(rows) * args.num_completions
        print(
            f"wrote {total} completions of {len(rows)} prompts to {out} ({unfinished} cut at max-new-tokens)"
        )
    return 0
