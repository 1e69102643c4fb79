"""load_tokenizer: a BPE tokenizer trained here and saved by transformers loads offline, round-trips text."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from copg_jax.data.config import DataConfig
from copg_jax.data.tokenize import sequence_ids, tokenize_dataset
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


# Mistral's template (no trim: an answer is written as it is) and Llama 3's (it trims every message)
MISTRAL_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    "Hello there, how are you today? Sure! Here is the answer.",
    "Answer: 4. The capital is Paris.",
] * 20


def _trained(tmp_path, name, pre_tokenizer, decoder, specials, bos, eos, template):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizer, decoder
    alphabet = sorted(set("".join(CORPUS)) | {"▁"}) if name == "sentencepiece" else []
    alphabet = alphabet or pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=alphabet))  # fmt: skip
    if name == "sentencepiece":  # trained on words (as SentencePiece), reading whole texts (as Llama 2's)
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   additional_special_tokens=specials[3:])  # fmt: skip
    fast.chat_template = template
    fast.save_pretrained(tmp_path / name)
    return load_tokenizer(tmp_path / name)


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("chat_tokenizers")
    return {
        "sentencepiece": _trained(
            tmp_path, "sentencepiece", pre_tokenizers.Metaspace(prepend_scheme="first", split=True),
            decoders.Metaspace(prepend_scheme="first"), ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
            "<s>", "</s>", MISTRAL_STYLE,
        ),
        "bytelevel": _trained(
            tmp_path, "bytelevel", pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
            ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", LLAMA3_STYLE,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["sentencepiece", "bytelevel"])
def test_completions_are_the_tokens_of_the_chat_as_its_template_writes_it(name, chat_tokenizers, tmp_path):
    """A completion is tokenised after its prompt as one text, as the template writes it: a SentencePiece
    tokenizer reading it alone put a space before it ("[/INST]Sure!" trained as "[/INST] Sure!", "Hello
    there" + ", how" as "Hello there , how"); Llama 3's template trims an answer, and its leading space and
    trailing newline were trained though the chat never shows them. Both as TRL 1.16 builds the sequence (the
    rendered conversation, split after the prompt's ids). The reward model's sequences are the same."""
    tok = chat_tokenizers[name]
    chat = [{"role": "user", "content": "Hello there"}]
    rows = [
        {"prompt": chat, "chosen": " Sure! Here is the answer.\n", "rejected": "Paris."},
        {"prompt": "Hello there", "chosen": ", how are you today?", "rejected": " Sure!"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tokenize_dataset(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")), tok)
    for row, got in zip(rows, data.rows, strict=True):
        for k, answer in enumerate((row["chosen"], row["rejected"])):
            ids = got["prompt_ids"] + got["completion_ids"][k]
            if isinstance(row["prompt"], list):
                turns = [*row["prompt"], {"role": "assistant", "content": answer}]
                text = tok.apply_chat_template(turns, tokenize=False)  # ends with the template's end token
                want = tok(text, add_special_tokens=False)["input_ids"]
                if want[-1] != tok.eos_token_id:  # Llama 3's <|eot_id|> ends the turn: the template's EOS
                    want.append(tok.eos_token_id)
            else:  # text: exactly the text, the prompt's ids kept ("there" + "," is read "there," at once)
                assert tok.decode(ids, skip_special_tokens=True) == row["prompt"] + answer
                whole = tok(row["prompt"] + answer)["input_ids"]
                prefix = whole[: len(got["prompt_ids"])] == got["prompt_ids"]
                want = (whole if prefix else ids[:-1]) + [tok.eos_token_id]
            assert ids == want, (row, k, tok.convert_ids_to_tokens(ids))
            assert ids == sequence_ids(tok, row["prompt"], answer, chat_template=False)
    if name == "sentencepiece":  # no space before an answer, as tokenising it alone put
        assert tok.decode(data.rows[0]["completion_ids"][1]) == "Paris.</s>"
        assert tok.convert_ids_to_tokens(data.rows[1]["completion_ids"][0][0]) == ","
    else:  # trimmed as the template writes it
        assert tok.decode(data.rows[0]["completion_ids"][0]) == "Sure! Here is the answer.<|eot_id|>"


def test_a_long_templated_prompt_cut_from_the_left_keeps_its_bos(chat_tokenizers, tmp_path):
    """The template writes BOS as text; cut by characters before tokenising (a prompt far past
    max_prompt_length) or by tokens after, the prompt keeps it first, as training and sampling need."""
    tok = chat_tokenizers["bytelevel"]
    rows = [
        {"prompt": [{"role": "user", "content": "Hello there, how are you today? " * n}], "chosen": "Sure!",
         "rejected": "Paris."}
        for n in (3, 400)  # cut by tokens; cut by characters first
    ]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_prompt_length=12)
    data = tokenize_dataset(cfg, tok)
    assert data.report.prompts_truncated == 2
    for ids in data.rows["prompt_ids"]:
        assert len(ids) == 12 and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids[1:]).endswith("<|end_header_id|>\n\n")  # the prompt's end
