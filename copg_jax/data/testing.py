"""Tiny offline fixtures for tests and demos: a word-level tokenizer and random scored-completion rows."""

from __future__ import annotations

import json
import os

import numpy as np

WORDS = [f"w{i}" for i in range(200)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The tiny tokenizer's template with a variable of its own, as Qwen3's `enable_thinking` (false: an empty
# reasoning block, here the words "w0 w0", after the generation prompt) and transformers' generation tags.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %} w0 w0{% endif %}{% endif %}"
)


def make_tiny_tokenizer(out_dir: str):
    """Writes a word-level `PreTrainedTokenizerFast` (vocab 207: specials + w0..w199, BOS prepended to plain
    text, EOS/PAD set, a simple chat template) to `out_dir` and returns it loaded back from disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_chatml_tokenizer(out_dir: str):
    """Writes a byte-level BPE `PreTrainedTokenizerFast` with ChatML control tokens (<|endoftext|> as BOS and
    pad, <|im_start|>, <|im_end|> as EOS) and the ChatML template to `out_dir`, and returns it loaded back.
    Unlike the word-level tokenizer's, its control tokens are not words of its vocabulary: text that spells
    one out has a tokenisation without it (`split_special_tokens`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(
        ["rate the answer out of ten", "the answer is fine", "user assistant"] * 20, trainer
    )
    bos = bpe.token_to_id("<|endoftext|>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def random_text(rng: np.random.Generator, low: int, high: int) -> str:
    """A string of between low and high (inclusive) random words w0..w199."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1))))


def kway_rows(
    num_rows: int, seed: int = 0, k_range=(2, 4), prompt_words=(1, 6), completion_words=(1, 5)
) -> list[dict]:
    """Random K-way rows {prompt, completions, rewards} with K varying in k_range (inclusive)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        k = int(rng.integers(k_range[0], k_range[1] + 1))
        rows.append(
            {
                "prompt": random_text(rng, *prompt_words),
                "completions": [random_text(rng, *completion_words) for _ in range(k)],
                "rewards": [round(float(x), 3) for x in rng.normal(size=k)],
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: str) -> str:
    """Writes rows as JSON lines; returns the path."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def slot_targets(batches) -> dict[int, list[int]]:
    """Slot -> its target tokens in row-major order (a completion's tokens, in order, in every layout), over
    the token rows of several host ScoredBatches: what the shares of a global batch hold, wherever each
    host's rows sit."""
    out: dict[int, list[int]] = {}
    for batch in batches:
        slots, targets = np.asarray(batch.tokens.target_slots), np.asarray(batch.tokens.targets)
        for r, c in zip(*np.nonzero(slots >= 0), strict=True):
            out.setdefault(int(slots[r, c]), []).append(int(targets[r, c]))
    return out
