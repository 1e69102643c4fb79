"""Sequence-classification reward models: our decoder as the backbone and a linear score head on the last
token, as HF `*ForSequenceClassification` (every family of `copg_jax.models`). Loaded to score
completions (`RewardModel`, `copg score --reward-model`), trained by `copg train-rm` (`ScoreModel` in the
training loop, Bradley-Terry loss) and exported as an HF folder transformers loads (`save_reward_model`).

reward(x, y) = score.weight[label] . h_last, with h_last the final-normed hidden state of the last token of
the prompt+completion sequence, as transformers' `LlamaForSequenceClassification` computes it.

Which sequence is scored: a folder written by `save_reward_model` records (config.json key
`copg_reward_input`) that its model was trained on sequences laid out by the data pipeline -- the prompt as
training tokenises it, the completion, EOS (`data.tokenize.sequence_ids`) -- and is scored on exactly those.
Other folders score the tokenizer's chat template over [user: prompt, assistant: completion] when it has one
(or the prompt is a message list), else prompt + completion with the tokenizer's special tokens.

A completion is scored as the text it is: special-token strings written out in it (`<|im_end|>` as
characters) are tokenised as plain text, never as those tokens, so a policy cannot close its turn or open
new ones in the reward model's input by spelling control tokens (`_spelled`, `encode`). Completions that spell
none are tokenised exactly as the tokenizer tokenises the whole text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copg_jax import paths
from copg_jax.batch import TokenBatch, last_token_index
from copg_jax.data.chat import PLACEHOLDER, split_around
from copg_jax.data.layout import padded_layout
from copg_jax.data.tokenize import sequence_ids
from copg_jax.models import Decoder, ModelConfig, load_tokenizer, save_pretrained
from copg_jax.models.config import family
from copg_jax.models.hf_io import open_checkpoint, put_slice, read_slices, state_index
from copg_jax.models.hub import find_tensor
from copg_jax.models.layers import param

log = logging.getLogger(__name__)

INPUT_KEY = "copg_reward_input"  # config.json: how the sequences a copg-trained reward model scores are built


class ScoreModel(nnx.Module):
    """A decoder backbone without LM head (tied config) and a score head [num_labels, D]."""

    def __init__(self, backbone: Decoder, score: nnx.Param):
        self.backbone, self.score = backbone, score

    def __call__(self, tokens: TokenBatch, num_slots: int) -> jax.Array:
        """Scores of the completion slots of a TokenBatch (any layout of `copg_jax.batch`).

        Returns:
          [num_slots, num_labels] float32: the head applied to each slot's last token.
        """
        hidden = self.backbone(tokens.input_ids, tokens.positions, tokens.segment_ids, tokens.prefix_ids)
        last = hidden.reshape(-1, hidden.shape[-1])[last_token_index(tokens.target_slots, num_slots)]
        return last.astype(jnp.float32) @ self.score[...].astype(jnp.float32).T


def new_score_model(cfg: ModelConfig, *, rngs: nnx.Rngs, num_labels: int = 1, **decoder_kwargs) -> ScoreModel:
    """A randomly initialised ScoreModel (head ~ N(0, 0.02), as transformers initialises it).

    Args:
      decoder_kwargs: `Decoder` keyword arguments (dtype, param_dtype, remat).
    """
    backbone = Decoder(dataclasses.replace(cfg, tie_embeddings=True), rngs=rngs, **decoder_kwargs)
    dtype = decoder_kwargs.get("param_dtype", jnp.float32)
    head = jax.random.normal(rngs.params(), (num_labels, cfg.hidden_size), dtype) * 0.02
    return ScoreModel(backbone, param(head, (None, "embed")))


def sequence_classification_class(model_type: str) -> str | None:
    """The class transformers' AutoModelForSequenceClassification loads a `model_type` folder as (GPT-2's is
    GPT2ForSequenceClassification, not its LM class renamed; Gemma 3 text's Gemma3TextFor...); None where
    transformers has none (Granite, OLMoE)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)


def score_model_from_decoder(decoder: Decoder, rngs: nnx.Rngs) -> ScoreModel:
    """A ScoreModel whose backbone holds `decoder`'s weights (an untied LM head is dropped) and a new head:
    a reward model initialised from a policy, as the paper initialises it from the SFT model. A family
    transformers has no sequence-classification class for is warned of: its export is copg's alone."""
    if sequence_classification_class(decoder.config.model_type) is None:
        log.warning(
            "transformers has no sequence-classification class for %s: the reward model's export scores in "
            "copg (copg score --reward-model, reward.model), but AutoModelForSequenceClassification cannot "
            "load it",
            decoder.config.model_type,
        )
    params = jax.tree.leaves(nnx.state(decoder, nnx.Param))
    # the decoder's settings: scanned, its layers' parameters are stacked, and the backbone's must be too
    kwargs = {**decoder.settings, "param_dtype": params[0].dtype}
    shape = nnx.eval_shape(lambda: new_score_model(decoder.config, rngs=nnx.Rngs(0), **kwargs))
    graphdef, abstract = nnx.split(shape)
    weights = dict(nnx.to_flat_state(nnx.state(decoder)))
    flat = {}
    for path, var in nnx.to_flat_state(abstract):
        if path[0] == "backbone":
            flat[path] = weights[path[1:]]
        else:
            value = jax.random.normal(rngs.params(), var.shape, var.dtype) * 0.02
            flat[path] = var.replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_reward_model(
    model: ScoreModel,
    path: str | Path,
    *,
    chat_template: bool,
    eos_token: str = "",
    pad_token_id=None,
    end_token_id=None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    write: bool = True,
) -> None:
    """Writes an HF `*ForSequenceClassification` folder (config.json + model.safetensors; tokenizer apart);
    `write=False` only joins the gathers (`save_pretrained`).

    Args:
      chat_template: whether the training data went through the chat template (data.chat_template): recorded
        so that `RewardModel` scores the sequences the model was trained on.
      eos_token: the token that ended finished completions in training (data.eos_token; "" = the
        tokenizer's EOS), recorded likewise.
      pad_token_id: written when the model config has none (transformers needs one to find the last token of
        padded rows). Neither is written when it is `end_token_id`: transformers scores the last token that
        is not padding, and the training sequences end with that token, which it would then pass over (a
        warning says so; transformers then scores one row at a time).
      end_token_id: the id of `eos_token` (the tokenizer's EOS when "").
      chat_template_kwargs: the chat template's variables in training (data.chat_template_kwargs), recorded
        where set.
    """
    cfg = model.backbone.config
    labels = range(model.score.shape[0])
    updates = {
        "architectures": [
            sequence_classification_class(cfg.model_type)
            or cfg.to_hf()["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
        ],
        "id2label": {str(i): f"LABEL_{i}" for i in labels},
        "label2id": {f"LABEL_{i}": i for i in labels},
        INPUT_KEY: {
            "sequence": "prompt, completion, eos",
            "chat_template": chat_template,
            "eos_token": eos_token,
            **({"chat_template_kwargs": dict(chat_template_kwargs)} if chat_template_kwargs else {}),
        },
    }
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else pad_token_id
    if pad is not None and pad == end_token_id:
        log.warning(
            "%s: the pad token is the token that ends every training sequence (id %d): config.json gets no "
            "pad_token_id, or transformers would score the token before it; it scores one row at a time then "
            "(give the tokenizer another pad token to batch)",
            path,
            pad,
        )
        updates["pad_token_id"] = None
    elif pad is not None:
        updates["pad_token_id"] = int(pad)
    save_pretrained(
        model.backbone,
        path,
        extra_tensors={"score.weight": model.score[...]},
        config_updates=updates,
        write=write,
    )


def load_backbone_and_head(path: str | Path, dtype=jnp.float32) -> tuple[nnx.Module, np.ndarray]:
    """(decoder without an LM head, score weight [num_labels, D]) from an HF sequence-classification folder.

    Raises:
      KeyError / ValueError naming the missing or mis-shaped tensor and the folder.
    """
    path = Path(paths.stage(path))
    hf = json.loads((path / "config.json").read_text())
    cfg = dataclasses.replace(ModelConfig.from_hf(hf), tie_embeddings=True)  # no lm_head in the backbone
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32))
    )
    tensors = open_checkpoint(path)
    flat, values = dict(nnx.to_flat_state(abstract)), {}
    for tmap in family(cfg.model_type).tensor_maps(cfg):
        found = find_tensor(tensors, tmap.name)[1]  # a multimodal classifier's under language_model.
        if found is None:
            raise ValueError(f"tensor {tmap.name} is missing from reward model checkpoint {path}")
        array, file = found
        if tuple(array.shape) != tmap.hf_shape:
            raise ValueError(
                f"tensor {tmap.name} in {file}: expected shape {tmap.hf_shape}, got {array.shape}"
            )
        for p, value in zip(tmap.paths, tmap.to_params(array), strict=True):
            put_slice(values, *state_index(p, scan_layers=False), value)
    for key, value in values.items():
        flat[key] = flat[key].replace(jnp.asarray(read_slices(value).astype(np.float32)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if "score.weight" not in tensors:
        raise ValueError(
            f"{path}: no 'score.weight' tensor; is this a *ForSequenceClassification checkpoint?"
        )
    head = np.asarray(tensors["score.weight"][0], np.float32)
    if head.ndim != 2 or head.shape[1] != cfg.hidden_size:
        raise ValueError(
            f"{path}: score.weight has shape {head.shape}, expected [num_labels, {cfg.hidden_size}]"
        )
    return model, head


def _spelled(tokenizer) -> re.Pattern | None:
    """A pattern matching the strings of the tokenizer's special tokens (None: it has none), which its
    tokenisation of text turns into those tokens."""
    strings = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len)
    return re.compile("|".join(map(re.escape, reversed(strings)))) if strings else None


def _ids(tokenizer, text: str, literal: bool = False) -> list[int]:
    """Token ids of `text` without added BOS/EOS; `literal`: special-token strings in it as plain text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"])


def _split_around(text: str, placeholder_text: str) -> tuple[str, str, str]:
    """`chat.split_around`'s (before, completion as rendered, after).

    Raises:
      ValueError: the template does not render the completion once, at one place, whatever its content.
    """
    if (span := split_around(text, placeholder_text)) is not None:
        return span
    raise ValueError(
        "the completion spells special tokens, and the reward model's chat template does not render it as "
        "one piece of text that can be tokenised apart, so it cannot be scored as plain text"
    )


def _plain_with_specials(tokenizer, prompt: str, completion_ids: list[int]) -> list[int]:
    """The prompt's ids, then `completion_ids`, with the special tokens the tokenizer adds to text (BOS
    before, any it adds after) around both.

    Raises:
      ValueError: the prompt's ids with those special tokens do not contain its ids without them.
    """
    bare, full = _ids(tokenizer, prompt), list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
    if not starts:
        raise ValueError(
            "the completion spells special tokens, and the reward model's tokenizer tokenises the prompt "
            "differently with its special tokens, so it cannot be scored as plain text"
        )
    end = starts[0] + len(bare)
    return full[:end] + completion_ids + full[end:]


def _without_added_end(ids: list[int], plain: list[int]) -> list[int]:
    """`ids` (a text tokenised with the tokenizer's added special tokens) without those it added after the
    text's own ids `plain` (an EOS of its post-processor): a cut completion gets no end token."""
    ids = list(ids)
    if not plain:
        return ids
    for start in range(len(ids) - len(plain) + 1):
        if ids[start : start + len(plain)] == plain:
            return ids[: start + len(plain)]
    return ids


@nnx.jit(static_argnames="num_slots")
def _scores(model: ScoreModel, tokens: TokenBatch, num_slots: int) -> jax.Array:
    return model(tokens, num_slots)


def _positions_kept(cfg: ModelConfig, max_length: int) -> int:
    """Tokens scored per sequence: `max_length`, or fewer where the model's learned position table
    (GPT-2's n_positions) has fewer rows: a position past it would read outside the table (NaN scores)."""
    if max_length < 2:
        raise ValueError(f"reward max_length={max_length} must be >= 2")
    if cfg.position_embedding == "learned" and max_length > cfg.max_position_embeddings:
        log.warning(
            "reward.max_length=%d is more than the reward model's %d learned positions: sequences are cut "
            "to their last %d tokens",
            max_length,
            cfg.max_position_embeddings,
            cfg.max_position_embeddings,
        )
        return cfg.max_position_embeddings
    return max_length


class RewardModel:
    """Batched reward `fn(prompts, completions) -> list[float]` from a sequence-classification checkpoint.

    Over-long sequences keep their last `max_length` tokens (the completion's end is what is scored); a call
    that cuts some warns with their count (`cut` counts them all).

    Args:
      path: HF folder with config.json, safetensors (backbone + score.weight) and a tokenizer.
      batch_size: texts per forward.
      max_length: tokens kept per text.
      label: which output of score.weight is the reward: required for a classifier of several outputs
        (num_labels > 1), where none is the reward by convention (logit 0 of a "label 1 = good" model
        ranks completions backwards); None for the usual one.
    Raises:
      ValueError: several outputs and no `label`, or a `label` out of range; no tokenizer in `path`.
    """

    def __init__(
        self, path: str | Path, batch_size: int = 32, max_length: int = 1024, label: int | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"reward model batch_size={batch_size} must be >= 1")
        self.tokenizer = load_tokenizer(path)  # first: its absence is told before the model loads
        backbone, head = load_backbone_and_head(path)
        config = json.loads(paths.read_text(paths.join(path, "config.json")))
        outputs = head.shape[0]
        if label is None and outputs > 1:
            names = config.get("id2label") or {}
            listed = ", ".join(f"{i}: {names[str(i)]}" if str(i) in names else str(i) for i in range(outputs))
            raise ValueError(
                f"{path}: the reward model has {outputs} outputs ({listed}): name the one that is the reward "
                "with reward.label (copg score: --label)"
            )
        label = 0 if label is None else label
        if not 0 <= label < outputs:
            raise ValueError(f"{path}: label {label} out of range for {outputs} score outputs")
        self.model = ScoreModel(backbone, param(jnp.asarray(head[label : label + 1]), (None, "embed")))
        self.batch_size, self.max_length = (
            batch_size,
            _positions_kept(ModelConfig.from_hf(config), max_length),
        )
        self.trained_on = config.get(INPUT_KEY)
        # a multimodal model's (Gemma 3's) is its text model's, as transformers reads it
        self.pad_id = config.get("pad_token_id")
        if self.pad_id is None:
            self.pad_id = (config.get("text_config") or {}).get("pad_token_id")
        self.specials = _spelled(self.tokenizer)
        self.cut = 0  # sequences scored on their last max_length tokens

    def encode(self, prompt, completion: str, finished: bool = True) -> list[int]:
        """The token ids of the sequence the model scores (`__call__` keeps the last `max_length`), its score
        read at the last of them. A
        completion that did not finish (cut at the sampling limit) is scored as it stands: no EOS after it (a
        copg-trained model's training sequences carry EOS only after finished completions), and a chat
        template leaves the assistant turn open (`continue_final_message`) instead of closing it.
        Special-token strings written out in the completion are tokenised as plain text (the module
        docstring says why). Trailing ids equal to config.json's pad_token_id are left out: transformers
        reads the score at the last token that is not padding, so where the pad token is the one that ends
        the sequence (EOS), it scores the token before it, and so do we."""
        tok = self.tokenizer
        spelled = bool(self.specials and self.specials.search(completion))
        if self.trained_on is not None:  # a copg-trained reward model: the training sequences
            templated, eos_token = (
                bool(self.trained_on["chat_template"]),
                self.trained_on.get("eos_token", ""),
            )
            variables = self.trained_on.get("chat_template_kwargs")
            ids = sequence_ids(tok, prompt, completion, templated, eos_token, spelled, variables)
            ids = ids if finished else ids[:-1]  # sequence_ids ends with EOS
        elif isinstance(prompt, list) or tok.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

            def render(content: str) -> str:
                turns = [*messages, {"role": "assistant", "content": content}]
                return tok.apply_chat_template(turns, tokenize=False, continue_final_message=not finished)

            text = render(completion)
            if spelled:
                before, rendered, after = _split_around(text, render(PLACEHOLDER))
                ids = _ids(tok, before) + _ids(tok, rendered, literal=True) + _ids(tok, after)
            else:
                ids = _ids(tok, text)
        elif spelled:
            ids = _plain_with_specials(tok, prompt, _ids(tok, completion, literal=True))
        else:
            ids = tok(prompt + completion, add_special_tokens=True)["input_ids"]
            if not finished:  # no end token the tokenizer adds to a text (its post-processor's EOS)
                ids = _without_added_end(ids, tok(prompt + completion, add_special_tokens=False)["input_ids"])
        ids = list(ids)
        while len(ids) > 1 and ids[-1] == self.pad_id:
            ids.pop()
        return ids

    def score_ids(self, ids: list[list[int]]) -> np.ndarray:
        """[N] rewards of token lists (each >= 2 tokens; rows padded to a multiple of 32 tokens)."""
        width = -(-max(len(x) for x in ids) // 32) * 32
        examples = [(np.asarray(x[:1], np.int32), [np.asarray(x[1:], np.int32)]) for x in ids]
        tokens = jax.tree.map(jnp.asarray, padded_layout(examples, 1, width))
        return np.asarray(jax.device_get(_scores(self.model, tokens, len(ids))))[:, 0]

    def __call__(
        self, prompts: list, completions: list[str], finished: list[bool] | None = None
    ) -> list[float]:
        """[N] rewards; `finished` [N] (None: all finished) says which completions ended with EOS."""
        finished = [True] * len(prompts) if finished is None else finished
        rows = zip(prompts, completions, finished, strict=True)
        whole = [self.encode(p, c, f) for p, c, f in rows]
        if long := [i for i, x in enumerate(whole) if len(x) > self.max_length]:
            self.cut += len(long)
            log.warning(
                "reward model: %d of %d sequences are longer than max_length=%d and are scored on their last "
                "%d tokens, without their start (the prompt's first); the longest has %d",
                len(long), len(whole), self.max_length, self.max_length, max(len(whole[i]) for i in long),
            )  # fmt: skip
        ids = [x[-self.max_length :] for x in whole]
        short = [i for i, x in enumerate(ids) if len(x) < 2]
        if short:
            raise ValueError(f"rows {short[:10]} have fewer than 2 tokens")
        scores = [self.score_ids(ids[s : s + self.batch_size]) for s in range(0, len(ids), self.batch_size)]
        return np.concatenate(scores).tolist()


def load_reward_model(
    path: str | Path, batch_size: int = 32, max_length: int = 1024, label: int | None = None
) -> RewardModel:
    return RewardModel(path, batch_size=batch_size, max_length=max_length, label=label)
