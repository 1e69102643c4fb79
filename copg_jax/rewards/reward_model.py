"""Sequence-classification reward model: our decoder as the backbone + the score head of an HF
`*ForSequenceClassification` checkpoint (Llama family: llama, mistral, qwen2, qwen3).

reward(x, y) = score.weight[label] . h_last, with h_last the final-normed hidden state of the last real token
of the prompt+completion text, as transformers' `LlamaForSequenceClassification` computes it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copg_jax import paths
from copg_jax.models import ModelConfig, from_config, load_tokenizer
from copg_jax.models.hf_io import open_checkpoint
from copg_jax.models.hub import family


def load_backbone_and_head(path: str | Path, dtype=jnp.float32) -> tuple[nnx.Module, np.ndarray]:
    """(decoder without an LM head, score weight [num_labels, D]) from an HF sequence-classification folder.

    Raises:
      KeyError / ValueError naming the missing or mis-shaped tensor and the folder.
    """
    path = Path(paths.stage(path))
    hf = json.loads((path / "config.json").read_text())
    cfg = dataclasses.replace(ModelConfig.from_hf(hf), tie_embeddings=True)  # no lm_head in the backbone
    model = from_config(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    tensors = open_checkpoint(path)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for tmap in family(cfg.model_type).tensor_maps(cfg):
        if tmap.name not in tensors:
            raise KeyError(f"tensor {tmap.name} is missing from reward model checkpoint {path}")
        array, file = tensors[tmap.name]
        if tuple(array.shape) != tmap.hf_shape:
            raise ValueError(
                f"tensor {tmap.name} in {file}: expected shape {tmap.hf_shape}, got {array.shape}"
            )
        for p, value in zip(tmap.paths, tmap.to_params(array), strict=True):
            flat[p].set_value(jnp.asarray(np.asarray(value, np.float32)))
    nnx.update(model, nnx.from_flat_state(flat))
    if "score.weight" not in tensors:
        raise KeyError(f"{path}: no 'score.weight' tensor; is this a *ForSequenceClassification checkpoint?")
    head = np.asarray(tensors["score.weight"][0], np.float32)
    if head.ndim != 2 or head.shape[1] != cfg.hidden_size:
        raise ValueError(
            f"{path}: score.weight has shape {head.shape}, expected [num_labels, {cfg.hidden_size}]"
        )
    return model, head


@nnx.jit
def _last_token_scores(model, head, input_ids, segment_ids, last):
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    hidden = model(input_ids, positions, segment_ids, jnp.zeros_like(segment_ids))  # [N, T, D]
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h_last @ head.T  # [N, num_labels]


class RewardModel:
    """Batched reward `fn(prompts, completions) -> list[float]` from a sequence-classification checkpoint.

    Text: the tokenizer's chat template over [user: prompt, assistant: completion] when the tokenizer has one
    (or the prompt is a message list), else prompt + completion with the tokenizer's special tokens.
    Over-long texts keep their last `max_length` tokens (the completion's end is what is scored).

    Args:
      path: HF folder with config.json, safetensors (backbone + score.weight) and a tokenizer.
      batch_size: texts per forward.
      max_length: tokens kept per text.
      label: which output of score.weight is the reward (0 for the usual num_labels=1).
    """

    def __init__(self, path: str | Path, batch_size: int = 32, max_length: int = 1024, label: int = 0):
        self.model, head = load_backbone_and_head(path)
        if not 0 <= label < head.shape[0]:
            raise ValueError(f"{path}: label {label} out of range for {head.shape[0]} score outputs")
        self.head = jnp.asarray(head[label : label + 1])
        self.tokenizer = load_tokenizer(path)
        self.batch_size, self.max_length = batch_size, max_length

    def encode(self, prompt, completion: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list) or tok.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            messages = [*messages, {"role": "assistant", "content": completion}]
            text = tok.apply_chat_template(messages, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt + completion, add_special_tokens=True)["input_ids"]
        return list(ids)[-self.max_length :]

    def score_ids(self, ids: list[list[int]]) -> np.ndarray:
        """[N] rewards of right-padded token lists (width rounded up to a multiple of 32)."""
        width = -(-max(len(x) for x in ids) // 32) * 32
        tokens = np.zeros((len(ids), width), np.int32)
        segments = np.zeros((len(ids), width), np.int32)
        for i, x in enumerate(ids):
            tokens[i, : len(x)], segments[i, : len(x)] = x, 1
        last = np.asarray([len(x) - 1 for x in ids], np.int32)
        out = _last_token_scores(self.model, self.head, tokens, segments, jnp.asarray(last))
        return np.asarray(jax.device_get(out))[:, 0]

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        ids = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"rows {empty[:10]} have no tokens")
        scores = [self.score_ids(ids[s : s + self.batch_size]) for s in range(0, len(ids), self.batch_size)]
        return np.concatenate(scores).tolist()


def load_reward_model(path: str | Path, batch_size: int = 32, max_length: int = 1024) -> RewardModel:
    return RewardModel(path, batch_size=batch_size, max_length=max_length)
