"""load_tokenizer: a BPE tokenizer trained here and saved by transformers loads offline, round-trips text."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from copg_jax.models import load_tokenizer

TEXT = ["the cat sat on the mat", "a dog ate the hat", "contrastive policy gradient"] * 20


def test_round_trip(tmp_path):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TEXT, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path
    )

    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<eos>" and tok.eos_token_id == bpe.token_to_id("<eos>")
    for text in ["the cat ate the dog", "unseen words: zebra!"]:
        ids = tok(text)["input_ids"]
        assert ids == bpe.encode(text).ids
        assert tok.decode(ids) == text
    assert (
        len(tok("the cat sat on the mat")["input_ids"]) < len("the cat sat on the mat") / 2
    )  # merges learned


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
