"""Silent wrong training signals, each turned into a loud one: reference caches computed in other dtypes or
from weights changed outside sampled blocks, cut completions trained as finished, a chat template used for
sampling but not for training, parameters a mesh leaves replicated, non-finite updates."""

import collections
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from copg_jax import train as tr
from copg_jax.config import apply_overrides, from_dict
from copg_jax.data.config import DataConfig
from copg_jax.data.fingerprint import _SAMPLES, checkpoint_fingerprint, file_hash
from copg_jax.data.pipeline import DataIterator
from copg_jax.data.refcache import ReferenceModel, StaleCacheError, open_ref_cache, precompute_ref
from copg_jax.data.testing import THINKING_TEMPLATE, kway_rows, make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import tokenize_dataset
from copg_jax.generate import main as generate_main
from copg_jax.jsonl import read_jsonl
from copg_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained
from copg_jax.run_config import Config, load_config
from copg_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
F32 = {"dtype": "float32", "param_dtype": "float32"}


@pytest.fixture(scope="module")
def ref_env(tmp_path_factory):
    """A tiny Llama with a sharpened head (so bf16 rounding shows in the log-probs), saved as an HF folder,
    and a tokenised K-way dataset."""
    tmp = tmp_path_factory.mktemp("signals")
    tok = make_tiny_tokenizer(str(tmp / "ckpt"))
    cfg = ModelConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    model = from_config(cfg, rngs=nnx.Rngs(3))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 30.0
    save_pretrained(model, tmp / "ckpt")
    path = write_jsonl(kway_rows(8, seed=5, k_range=(2, 3)), str(tmp / "d.jsonl"))
    data_cfg = DataConfig(
        path=path, cache_dir=str(tmp / "cache"), batch_size=4, pad_multiple=16, max_prompt_length=12,
        max_completion_length=12, shuffle=False,
    )  # fmt: skip
    return {"tmp": tmp, "tok": tok, "data_cfg": data_cfg, "data": tokenize_dataset(data_cfg, tok)}


def test_cache_computed_in_other_dtypes_is_refused_then_recomputed(ref_env):
    tmp, data, data_cfg, ckpt = (
        ref_env["tmp"],
        ref_env["data"],
        ref_env["data_cfg"],
        str(ref_env["tmp"] / "ckpt"),
    )
    bf16 = from_pretrained(ckpt, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    path = str(tmp / "bf16.parquet")
    precompute_ref(bf16, data, data_cfg, path, checkpoint=ckpt)
    with pytest.raises(StaleCacheError, match=r"reference's numerics \(dtype: bfloat16 -> float32"):
        open_ref_cache(path, data, reference=ckpt, numerics=F32)
    weights16 = from_pretrained(ckpt, dtype=jnp.float32, param_dtype=jnp.bfloat16)
    precompute_ref(weights16, data, data_cfg, str(tmp / "w16.parquet"), checkpoint=ckpt)
    with pytest.raises(StaleCacheError, match="param_dtype: bfloat16 -> float32"):
        open_ref_cache(str(tmp / "w16.parquet"), data, reference=ckpt, numerics=F32)
    stale = open_ref_cache(
        path, data, reference=ckpt, numerics={"dtype": "bfloat16", "param_dtype": "float32"}
    )

    # a float32 run recomputes the bf16 cache; its values are then the float32 reference's own log-probs
    overrides = [f"model.path={ckpt}", "model.dtype=float32", "mesh.data=1", "train.progress=false"]
    overrides += [f"data.{k}={v}" for k, v in data_cfg.__dict__.items() if k in ("path", "cache_dir")]
    overrides += ["data.batch_size=4", "data.pad_multiple=16", "data.max_prompt_length=12"]
    overrides += ["data.max_completion_length=12", "data.shuffle=false"]
    cfg = load_config(None, overrides)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    fresh = tr.reference_cache(cfg, data, mesh, ckpt, path)
    it = DataIterator(
        data, data_cfg, ref=None, process_index=0, process_count=1, shuffle=False, split_length=None
    )
    host, rows = it.batch(it.global_rows(0, 0))
    policy = ReferenceModel(from_pretrained(ckpt, dtype=jnp.float32)).fill(host).ref_logps  # policy == ref
    mask = host.completion_mask
    kl_fresh = np.abs(policy - fresh.logps[rows][:, : mask.shape[1]])[mask]
    kl_stale = np.abs(policy - stale.logps[rows][:, : mask.shape[1]])[mask]
    assert kl_fresh.max() < 1e-4 and kl_stale.mean() > 1e-2, (kl_fresh.max(), kl_stale.mean())
    open_ref_cache(path, data, reference=ckpt, numerics=F32)  # the rewritten cache is current


def test_weights_changed_outside_sampled_blocks_change_the_full_fingerprint(tmp_path):
    cfg = ModelConfig(
        model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=64, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(0)), tmp_path)
    file = tmp_path / "model.safetensors"
    size = file.stat().st_size
    full, sampled = checkpoint_fingerprint(str(tmp_path)), checkpoint_fingerprint(str(tmp_path), "sampled")
    assert (tmp_path / ".model.safetensors.copg-hash.json").is_file()  # the hash is cached beside the file
    # perturb 4 KiB of weights half way between two sampled blocks (the files' tail: lm_head / embed rows)
    blocks = np.linspace(0, size - (1 << 16), _SAMPLES).astype(int)
    offset = (int(blocks[-3] + blocks[-2]) // 2) // 4 * 4
    with open(file, "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(4096), np.float32) * 1.1
        f.seek(offset)
        f.write(values.astype(np.float32).tobytes())
    assert checkpoint_fingerprint(str(tmp_path), "sampled") == sampled  # what the sampled mode cannot see
    assert checkpoint_fingerprint(str(tmp_path)) != full


def test_file_hash_cache_is_keyed_by_stat(tmp_path):
    file = tmp_path / "w.safetensors"
    file.write_bytes(os.urandom(1 << 20))
    true_hash = file_hash(str(file))
    sidecar = tmp_path / ".w.safetensors.copg-hash.json"
    entry = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**entry, "hash": "cached"}))
    assert file_hash(str(file)) == "cached"  # an unchanged file is not read again
    with open(file, "r+b") as f:  # rewritten in place (same size, same inode): the stat key changes
        f.write(b"\0")
    assert file_hash(str(file)) not in ("cached", true_hash)


def _tokenized(tok, tmp_path, rows, model_end_tokens=(), keep_sampled_end=True, **kw):
    path = write_jsonl(rows, str(tmp_path / f"rows{len(list(tmp_path.iterdir()))}.jsonl"))
    cfg = DataConfig(path=path, cache_dir=str(tmp_path / "c"), **kw)
    return tokenize_dataset(cfg, tok, model_end_tokens=model_end_tokens, keep_sampled_end=keep_sampled_end)


def test_eos_only_after_finished_completions(tmp_path):
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    eos = tok.eos_token_id
    rows = [
        {"prompt": "w1 w2", "completions": ["w3 w4", "w5"], "rewards": [1.0, 0.0], "finished": [True, False]},
        {"prompt": "w6", "completions": ["w7", "w8 w9"], "rewards": [0.0, 1.0]},
    ]
    for add_eos in (True, False):
        got = _tokenized(tok, tmp_path, rows, add_eos=add_eos).rows["completion_ids"]
        assert got[0] == [[10, 11, eos], [12]]  # w3 = id 10: the row's flags decide, whatever add_eos says
        assert got[1] == ([[14, eos], [15, 16, eos]] if add_eos else [[14], [15, 16]])
    bad = [{**rows[0], "finished": [True]}]
    with pytest.raises(ValueError, match=r"row 0: field 'finished': 1 flags for 2 completions"):
        _tokenized(tok, tmp_path, bad)


def test_completions_ending_with_another_token_than_the_chat_templates_turn_end_are_warned(tmp_path, caplog):
    """A chat model trained on chat rows whose completions end with the tokenizer's EOS where its template
    ends assistant turns with another token (Qwen base tokenizers: <|endoftext|> against <|im_end|>; Gemma-it:
    <eos> against <end_of_turn>) learns to end its turns with a token its chat never shows there: the data
    log says so and names data.eos_token. Text prompts that skip the template are not warned about."""
    from copg_jax.data.testing import make_chatml_tokenizer

    tok = make_chatml_tokenizer(str(tmp_path / "tok"))  # EOS <|im_end|>, as its template's turn end
    chat = [
        {"prompt": [{"role": "user", "content": "rate the answer"}], "completions": ["the answer", "is fine"]}
    ]
    chat[0]["rewards"] = [1.0, 0.0]
    text = [{**chat[0], "prompt": "rate the answer"}]
    warning = (
        "the chat template ends an assistant turn with '<|im_end|>', but 2 finished completions end with"
    )
    for rows, eos_token, warned in [
        (chat, "", False),
        (chat, "<|endoftext|>", True),
        (text, "<|endoftext|>", False),  # no prompt templated
    ]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="copg_jax.data.tokenize"):
            data = _tokenized(tok, tmp_path, rows, eos_token=eos_token)
        assert (warning in caplog.text) == warned, caplog.text
        assert data.report.templated_prompts == (rows is chat)
    assert "'<|endoftext|>' (data.eos_token): set data.eos_token=<|im_end|>" in _warned(
        tok, tmp_path, chat, caplog
    )
    # completions that end with the end token they were sampled ending on (their recorded ids) end as the
    # template does, whatever data.eos_token says
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sampled = [
        {**chat[0], "finished": [True, True]}
        | {
            "completion_token_ids": [
                tok(c, add_special_tokens=False)["input_ids"] + [im_end] for c in chat[0]["completions"]
            ]
        }
    ]
    assert "ends an assistant turn" not in _warned(tok, tmp_path, sampled, caplog)
    tok.eos_token = "<|endoftext|>"  # a base model's tokenizer, its chat template the instruct model's
    assert "(the tokenizer's EOS): set data.eos_token=<|im_end|>" in _warned(
        tok, tmp_path, chat, caplog, eos_token=""
    )
    tiny = make_tiny_tokenizer(str(tmp_path / "tiny"))
    tiny.chat_template = THINKING_TEMPLATE
    words = [{"prompt": "w1", "completions": ["w2", "w3"], "rewards": [1.0, 0.0]}]
    assert "data.chat_template_kwargs: set, but no prompt goes through the chat template" in _warned(
        tiny, tmp_path, words, caplog, eos_token="", chat_template_kwargs={"enable_thinking": False}
    )


def _warned(tok, tmp_path, rows, caplog, **settings) -> str:
    caplog.clear()
    with caplog.at_level("WARNING", logger="copg_jax.data.tokenize"):
        _tokenized(tok, tmp_path, rows, eos_token=settings.pop("eos_token", "<|endoftext|>"), **settings)
    return caplog.text


def test_generated_rows_train_on_the_sampled_tokens(tmp_path):
    """`copg generate` records which completions finished and whether the chat template was used; training on
    its rows sees the sampled token ids exactly, the end token only where sampling produced one: the one it
    stopped on, of the model's two (a chat model's turn end beside its EOS: it was trained to end with the
    tokenizer's EOS, whatever it had stopped on)."""
    tok = make_tiny_tokenizer(str(tmp_path / "policy"))
    turn_end = tok.convert_tokens_to_ids("<|user|>")
    cfg = ModelConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
        eos_token_ids=(tok.eos_token_id, turn_end),
    )  # fmt: skip
    model = from_config(cfg, rngs=nnx.Rngs(1))
    for end in cfg.eos_token_ids:  # now and then: some completions finish, on either end token; some are cut
        model.lm_head.kernel[:, end] = 0.25
    save_pretrained(model, tmp_path / "policy")
    prompts = [{"prompt": f"w{i} w{i + 1}"} for i in range(6)]
    write_jsonl(prompts, str(tmp_path / "prompts.jsonl"))
    out = tmp_path / "out.jsonl"
    args = [
        "--model",
        str(tmp_path / "policy"),
        "--prompts",
        str(tmp_path / "prompts.jsonl"),
        "--out",
        str(out),
    ]
    assert (
        generate_main([*args, "--num-completions", "4", "--max-new-tokens", "5", "--dtype", "float32"]) == 0
    )
    rows = read_jsonl(out)
    flags = [f for r in rows for f in r["finished"]]
    assert any(flags) and not all(flags), flags
    assert all(r["chat_template"] is False for r in rows)
    for r in rows:
        r["rewards"] = list(np.linspace(0, 1, 4))
    data = _tokenized(tok, tmp_path, rows, max_completion_length=16, model_end_tokens=cfg.eos_token_ids)
    assert (data.report.sampled_ids_used, data.report.sampled_ids_ignored) == (len(flags), 0)
    ends = collections.Counter()
    for r, ids in zip(rows, data.rows["completion_ids"], strict=True):
        for text, finished, sampled, got in zip(
            r["completions"], r["finished"], r["completion_token_ids"], ids, strict=True
        ):
            assert got == sampled  # the end token it stopped on last, where it finished
            assert tok.decode(sampled[:-1] if finished else sampled, skip_special_tokens=False) == text
            assert finished or len(got) == 5  # a cut completion keeps its 5 sampled tokens and no EOS
            ends[got[-1] if finished else None] += 1
    assert ends[tok.eos_token_id] and ends[turn_end], ends
    assert data.report.other_end_tokens == ends[turn_end]
    assert f"{ends[turn_end]} finished completions end with the end token they were sampled" in (
        data.report.summary()
    )
    (tmp_path / "turn_end").mkdir()  # with data.eos_token the turn end, the tokenizer's EOS is the other one
    again = _tokenized(tok, tmp_path / "turn_end", rows, max_completion_length=16, eos_token="<|user|>")
    assert list(again.rows["completion_ids"]) == list(data.rows["completion_ids"])
    assert again.report.other_end_tokens == ends[tok.eos_token_id]
    with pytest.raises(ValueError, match="sampled without the chat template but training would tokenise"):
        _tokenized(tok, tmp_path, rows, chat_template=True)


def test_chat_template_variables_render_prompts_alike_for_sampling_and_training(tmp_path, capsys):
    """`data.chat_template_kwargs` (Qwen3's `enable_thinking: false`) renders every prompt the template
    renders, in training and in sampling alike; `copg generate` records them and training refuses rows sampled
    under other ones (they trained silently in a context the policy never sampled in); a variable the
    template never reads (a typo) and one of apply_chat_template's own arguments are refused."""
    from copg_jax.data.testing import THINKING_TEMPLATE
    from copg_jax.generate import prompt_token_ids

    tok = make_tiny_tokenizer(str(tmp_path / "policy"))
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(tmp_path / "policy")
    cfg = ModelConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(1)), tmp_path / "policy")
    write_jsonl([{"prompt": f"w{i} w{i + 1}"} for i in range(3)], str(tmp_path / "prompts.jsonl"))
    args = ["--model", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--chat-template", "--num-completions", "2", "--max-new-tokens", "3",
            "--dtype", "float32"]  # fmt: skip
    thinking_off = '{"enable_thinking": false}'
    out = tmp_path / "out.jsonl"
    assert generate_main([*args, "--out", str(out), "--chat-template-kwargs", thinking_off]) == 0
    rows = read_jsonl(out)
    assert all(r["chat_template"] and r["chat_template_kwargs"] == thinking_off for r in rows)
    for r in rows:
        r["rewards"] = [1.0, 0.0]
    off = {"enable_thinking": False}
    data = _tokenized(tok, tmp_path, rows, chat_template=True, chat_template_kwargs=off)
    user = tok.convert_tokens_to_ids("<|user|>")
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    w0, w1, w2 = tok.convert_tokens_to_ids(["w0", "w1", "w2"])
    assert data.rows["prompt_ids"][1] == [user, w1, w2, assistant, w0, w0]  # the empty reasoning block
    sampled, _ = prompt_token_ids(rows, tok, DataConfig(chat_template=True, chat_template_kwargs=off))
    assert [list(x) for x in sampled] == list(data.rows["prompt_ids"])  # rollouts, evaluation by generation
    with pytest.raises(
        ValueError, match=r'sampled with the chat template variables \{"enable_thinking":false\}'
    ):
        _tokenized(tok, tmp_path, rows, chat_template=True)  # training without them
    zero = [{**r, "chat_template_kwargs": '{"enable_thinking": 0}'} for r in rows]  # the template: not false
    with pytest.raises(ValueError, match=r'variables \{"enable_thinking":0\} but training renders it'):
        _tokenized(tok, tmp_path, zero, chat_template=True, chat_template_kwargs=off)
    plain = _tokenized(tok, tmp_path, [{**r, "chat_template_kwargs": None} for r in rows], chat_template=True)
    assert plain.rows["prompt_ids"][1] == [user, w1, w2, assistant]  # rows that record none: as configured
    with pytest.raises(
        ValueError, match="chat_template_kwargs.enable_thinkng: the tokenizer's chat template never"
    ):
        _tokenized(tok, tmp_path, rows, chat_template=True, chat_template_kwargs={"enable_thinkng": False})
    for name in ("tokenize", "messages"):
        with pytest.raises(ValueError, match=f"chat_template_kwargs.{name}: set by copg itself"):
            DataConfig(chat_template_kwargs={name: True})
    assert "chat_template_kwargs" not in DataConfig().tokenization_settings()  # caches made before stay valid
    assert DataConfig(chat_template_kwargs=off).tokenization_settings()["chat_template_kwargs"] == off
    for bad, message in (
        ("[1]", "--chat-template-kwargs: expected a JSON object"),
        ("{", "--chat-template-kwargs: Expecting property name"),
        ('{"tokenize": 1}', "error: --chat-template-kwargs.tokenize: set by copg itself"),
        (
            '{"enable_thinkng": 0}',
            "--chat-template-kwargs.enable_thinkng: the tokenizer's chat template never",
        ),
    ):
        with pytest.raises(SystemExit):
            generate_main([*args, "--out", str(out), "--chat-template-kwargs", bad])
        assert message in capsys.readouterr().err


def test_chat_template_variables_are_read_through_macros_namespaces_and_generation_tags(tmp_path, caplog):
    """What `check_template_kwargs` holds a variable against: what the template reads anywhere; a template
    it cannot parse (a filter only transformers' environment would know) is warned of, not refused."""
    import types

    from copg_jax.data.chat import check_template_kwargs, template_variables
    from copg_jax.data.testing import THINKING_TEMPLATE
    from copg_jax.generate import tokenize_prompts

    template = (
        "{% macro turn(m) %}{{ m['content'] }}{% if reasoning_effort %}!{% endif %}{% endmacro %}"
        "{% set ns = namespace(first=true) %}{% for m in messages %}"
        "{% if loop.index > 9 %}{% break %}{% endif %}"
        "{% generation %}{{ turn(m) }}{% endgeneration %}{% endfor %}{{ tools | tojson }}"
    )
    assert template_variables(template) == {"messages", "reasoning_effort", "tools"}
    tok = types.SimpleNamespace(get_chat_template=lambda name=None, tools=None: template)
    check_template_kwargs(tok, {"reasoning_effort": "low", "tools": []}, "s")
    with pytest.raises(
        ValueError, match=r"s.effort: the tokenizer's chat template never reads it.*: reasoning_eff"
    ):
        check_template_kwargs(tok, {"effort": "low"}, "s")
    named = types.SimpleNamespace(
        chat_template={"default": template, "tool_use": template},
        get_chat_template=lambda name, tools: template,
    )
    check_template_kwargs(named, {"chat_template": "tool_use", "tools": []}, "s")
    with pytest.raises(
        ValueError, match=r"s.chat_template: the tokenizer has no template 'tools' \(its named"
    ):
        check_template_kwargs(named, {"chat_template": "tools"}, "s")
    one = types.SimpleNamespace(chat_template=template)  # transformers would render the name as the template
    with pytest.raises(ValueError, match=r"has no template 'tool_use' \(it has one, unnamed\)"):
        check_template_kwargs(one, {"chat_template": "tool_use"}, "s")
    tok = make_tiny_tokenizer(str(tmp_path))
    tok.chat_template = THINKING_TEMPLATE
    with caplog.at_level("WARNING", logger="copg_jax.generate"):  # text prompts, no template to render
        tokenize_prompts(tok, ["w1"], False, {"enable_thinking": False})
    assert "data.chat_template_kwargs: set, but no prompt goes through the chat template" in caplog.text
    unreadable = types.SimpleNamespace(get_chat_template=lambda name=None, tools=None: "{{ x | nofilter }}")
    with caplog.at_level("WARNING", logger="copg_jax.data.chat"):
        check_template_kwargs(unreadable, {"effort": "low"}, "s")
    assert "s: the chat template's variables cannot be read" in caplog.text


def test_completions_train_on_their_sampled_ids_where_these_decode_to_their_text(tmp_path):
    """A completion that spells a control token in characters (sampled as byte-level pieces) is trained on
    those pieces, not on the control token its text tokenises to; one whose text was edited after sampling,
    or whose ids are another tokenizer's, is tokenised from its text and counted; malformed ids are a bad row
    named by its field."""
    from copg_jax.data.testing import make_chatml_tokenizer

    tok = make_chatml_tokenizer(str(tmp_path / "tok"))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    spelled = "fine<|im_end|>\n<|im_start|>user\nsay ten"
    pieces = tok(spelled, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert end not in pieces and tok.decode(pieces) == spelled
    plain = tok("the answer", add_special_tokens=False)["input_ids"]
    row = {"prompt": "rate the answer", "completions": [spelled, "the answer"], "rewards": [1.0, 0.0]}
    rows = [
        {**row, "completion_token_ids": [pieces, plain]},
        {**row, "completions": [spelled + "!", "the answer"], "completion_token_ids": [pieces, plain]},
        {**row, "completion_token_ids": [[len(tok) + 5], plain]},  # not this tokenizer's ids
        row,
    ]
    data = _tokenized(tok, tmp_path, rows, max_completion_length=64)
    got = data.rows["completion_ids"]
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in (spelled, spelled + "!")]
    assert texts[0].count(end) == 1  # what tokenising the text alone would have trained
    assert got[0] == [pieces + [end], plain + [end]]
    assert got[1] == [texts[1] + [end], plain + [end]]
    assert got[2] == got[3] == [texts[0] + [end], plain + [end]]
    assert (data.report.sampled_ids_used, data.report.sampled_ids_ignored) == (4, 2)
    assert "2 tokenised from their text instead" in data.report.summary()
    for bad, match in (
        ([pieces], "field 'completion_token_ids': 1 id lists for 2 completions"),
        ([pieces, [True]], "field 'completion_token_ids': expected lists of token ids"),
        ([pieces, "the answer"], "field 'completion_token_ids': expected lists of token ids"),
    ):
        with pytest.raises(ValueError, match=match):
            _tokenized(tok, tmp_path, [{**row, "completion_token_ids": bad}])


def test_a_finished_completion_ends_with_the_end_token_its_recorded_ids_end_with(tmp_path):
    """Recorded ids may end with the end token sampling stopped on after the ids of the text (`copg
    generate`, vLLM): the tokenizer's EOS, data.eos_token or one of the model's end tokens. A finished
    completion is trained to end with that token (a reward model's with data.eos_token, as it scores). Where
    the last id is no end token (another control token, a word), or the completion is marked unfinished, the
    ids are another text's: tokenised from the text and counted; a completion cut by max_completion_length
    ends with no end token. The end tokens are in the settings a reference cache is fingerprinted by."""
    from copg_jax.data.testing import make_chatml_tokenizer

    tok = make_chatml_tokenizer(str(tmp_path / "tok"))
    eos, other = tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")  # <|im_end|>; BOS and pad
    start = tok.convert_tokens_to_ids("<|im_start|>")
    plain = tok("the answer", add_special_tokens=False)["input_ids"]
    fine = tok("is fine", add_special_tokens=False)["input_ids"]
    row = {"prompt": "rate the answer", "completions": ["the answer", "is fine", ""]}
    row["rewards"] = [1.0, 0.0, 0.5]
    rows = [
        {**row, "finished": [True] * 3, "completion_token_ids": [plain + [other], fine + [eos], [other]]},
        {**row, "completions": row["completions"][:2], "rewards": [1.0, 0.0]}
        | {"completion_token_ids": [plain + [other], fine]},  # no `finished`: data.add_eos (true) ends both
        {**row, "finished": [True, False, True]}
        | {"completion_token_ids": [plain + fine[:1], fine + [other], [start]]},
    ]
    data = _tokenized(tok, tmp_path, rows, max_completion_length=64, model_end_tokens=[other])
    got = data.rows["completion_ids"]
    assert got[0] == [plain + [other], fine + [eos], [other]]
    assert got[1] == [plain + [other], fine + [eos]]
    # a word after the text's ids, an end token after an unfinished one's, a control token that ends
    # nothing: tokenised from the text
    assert got[2] == [plain + [eos], fine, [eos]]
    assert (data.report.sampled_ids_used, data.report.sampled_ids_ignored) == (5, 3)
    assert data.report.other_end_tokens == 3
    assert data.settings["end_tokens"] == sorted([eos, other])
    (tmp_path / "other").mkdir()  # not one of this model's end tokens: its text is tokenised, and ends in EOS
    alone = _tokenized(tok, tmp_path / "other", rows[:1], max_completion_length=64)
    assert alone.rows["completion_ids"][0] == [plain + [eos], fine + [eos], [eos]]
    assert (alone.report.sampled_ids_ignored, alone.report.other_end_tokens) == (2, 0)
    assert alone.settings != data.settings  # a reference cache of the other end tokens is stale
    (tmp_path / "rm").mkdir()
    kw = dict(max_completion_length=64, model_end_tokens=[other], keep_sampled_end=False)
    reward_model = _tokenized(tok, tmp_path / "rm", rows[:1], **kw)
    assert reward_model.rows["completion_ids"][0] == [plain + [eos], fine + [eos], [eos]]
    assert (reward_model.report.sampled_ids_used, reward_model.report.other_end_tokens) == (3, 0)
    (tmp_path / "cut").mkdir()
    cut = _tokenized(tok, tmp_path / "cut", rows[:1], max_completion_length=2, model_end_tokens=[other])
    assert len(fine) == len(plain) == 2
    assert cut.rows["completion_ids"][0] == [plain, fine, [other]] and cut.report.completions_truncated == 2
    assert cut.report.other_end_tokens == 1  # the empty one; the cut one ends with none


def test_an_end_token_that_is_no_special_token_is_recognised_in_recorded_ids(tmp_path):
    """data.eos_token may be any one token, and sampling stops at it: recorded ids ending with it are the
    sampled ids of a finished completion, whether or not the tokenizer calls the token special."""
    tok = make_tiny_tokenizer(str(tmp_path / "tok"))
    end = tok.convert_tokens_to_ids("w199")
    body = tok("w3 w4", add_special_tokens=False)["input_ids"]
    row = {"prompt": "w1", "completions": ["w3 w4", "w5"], "rewards": [1.0, 0.0], "finished": [True, True]}
    row["completion_token_ids"] = [body + [end], tok("w5", add_special_tokens=False)["input_ids"]]
    data = _tokenized(tok, tmp_path, [row], eos_token="w199")
    assert data.rows["completion_ids"][0] == [body + [end], [row["completion_token_ids"][1][0], end]]
    assert (data.report.sampled_ids_used, data.report.sampled_ids_ignored) == (2, 0)


TINY = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip


def test_mesh_that_leaves_parameters_replicated_is_refused_before_data(tmp_path):
    base = {
        "model": {"config": TINY, "tokenizer": "unused"},
        "data": {"path": "/nonexistent.jsonl"},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    cfg = from_dict(Config, apply_overrides(base, ["mesh.data=1", "mesh.tensor=8"]))
    _, abstract = tr.abstract_model(cfg)
    tensor8 = make_mesh(1, 1, 8)  # 4 query heads and 2 KV heads on a tensor axis of 8: replicated
    with pytest.raises(
        ValueError, match=r"layers\.0\.attn\.k\.kernel \(32, 2, 8\): dim 1 \(2\) not divisible"
    ):
        tr.check_param_sharding(abstract, tensor8, 0.05)
    per_layer = 32 * 4 * 8 * 2 + 32 * 2 * 8 * 2  # q, o and k, v kernels
    total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(abstract))
    assert tr.check_param_sharding(abstract, tensor8, 1.0) == pytest.approx(2 * per_layer / total)
    assert tr.check_param_sharding(abstract, make_mesh(2, 2, 2), 0.0) == 0.0
    with pytest.raises(ValueError, match="mesh.replication_tolerance=0.05"):  # before the missing data file
        tr.train(cfg)


def _tiny_run(tmp_path, *overrides):
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            f"model.tokenizer={REPO / 'examples/tiny/tokenizer'}",
            f"data.path={REPO / 'examples/tiny/train.jsonl'}", "data.eval_path=",
            f"data.ref_cache={tmp_path / 'ref.parquet'}", f"data.cache_dir={tmp_path / 'c'}",
            f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "train.steps=4",
            "train.log_every=1",
            "train.eval_every=0", "train.export_on_finish=false", "checkpoint.every_steps=1",
            "checkpoint.async_save=false", "checkpoint.keep_best=0", "checkpoint.keep_last=5",
            "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e30", *overrides,
        ],
    )  # fmt: skip


def test_nonfinite_loss_stops_the_run_before_saving_it(tmp_path):
    # lr 1e30: the first update throws the weights to ~1e30, so the second loss overflows
    cfg = _tiny_run(tmp_path)
    with pytest.raises(tr.NonFiniteError, match=r"step 2: .*data position \{'epoch': 0, 'index': 1\}"):
        tr.train(cfg)
    assert sorted(int(p.name) for p in Path(cfg.checkpoint_dir).iterdir() if p.name.isdigit()) == [1]


def test_nonfinite_updates_are_skipped_and_counted(tmp_path):
    cfg = _tiny_run(tmp_path, "train.on_nonfinite=skip")
    result = tr.train(cfg)
    assert result.step == 4 and result.metrics["skipped_updates"] == 3.0
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, params, _ = tr.restore_params(cfg, cfg.checkpoint_dir, mesh, 4)
    _, after_first, _ = tr.restore_params(cfg, cfg.checkpoint_dir, mesh, 1)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), nnx.to_pure_dict(after_first))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_hub_dataset_revision_enters_the_cache_fingerprint(ref_env, monkeypatch):
    import datasets

    from copg_jax.data import formats

    rows = kway_rows(8, seed=5, k_range=(2, 3))
    revision = {"sha": "rev-a"}

    def hub(name, split, cache_dir=None):  # what datasets.load_dataset returns for a hub name at a revision
        assert name == "org/prefs" and split == "train"
        ds = datasets.Dataset.from_list(rows)
        ds._fingerprint = revision["sha"]
        return ds

    monkeypatch.setattr(formats.datasets, "load_dataset", hub)
    cfg = DataConfig(
        path="hf://datasets/org/prefs", cache_dir=str(ref_env["tmp"] / "hubcache"), batch_size=4,
        pad_multiple=16, max_prompt_length=12, max_completion_length=12, shuffle=False,
    )  # fmt: skip
    data = tokenize_dataset(cfg, ref_env["tok"])
    assert data.revisions == {"org/prefs[train]": "rev-a"}
    model = from_pretrained(str(ref_env["tmp"] / "ckpt"), dtype=jnp.float32)
    path = str(ref_env["tmp"] / "hub.parquet")
    precompute_ref(model, data, cfg, path)
    open_ref_cache(path, data, reference=model, numerics=F32)
    revision["sha"] = "rev-b"  # the same rows under a new revision: the cache no longer vouches for them
    with pytest.raises(StaleCacheError, match="the data files' content"):
        open_ref_cache(path, tokenize_dataset(cfg, ref_env["tok"]), reference=model, numerics=F32)
