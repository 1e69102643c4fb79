"""Sampling with the KV cache: greedy = step-by-step argmax of full forwards, sampling frequencies = softmax,
top-k / top-p masks = a numpy reference, EOS handling, padding sides, sharded = unsharded; Phi-3's LongRoPE
generation = transformers' generate()."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from copg_jax.generate import SamplingConfig, filter_logits, generate, sample_completions, sample_step
from copg_jax.models import ModelConfig, from_config, from_pretrained
from copg_jax.sharding import make_mesh

V = 48


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    m = from_config(cfg, rngs=nnx.Rngs(0))
    # sharpen the random model so that sampling and greedy differ visibly from uniform
    m.lm_head.kernel[...] = m.lm_head.kernel[...] * 20.0
    return m


@nnx.jit
def _forward_logits(model, ids, segments):
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    return model.logits(model(ids, positions, segments, jnp.zeros_like(ids)))


def full_logits(model, ids):
    """Last-position logits of one unpadded sequence by a plain full forward (no cache), padded to 16."""
    row = np.zeros((1, 16), np.int32)
    row[0, : len(ids)] = ids
    segments = (np.arange(16) < len(ids)).astype(np.int32)[None]
    return _forward_logits(model, jnp.asarray(row), jnp.asarray(segments))[0, len(ids) - 1]


PROMPTS = [[5, 7, 9, 11, 2], [3], [17, 4, 4]]


def padded(prompts, side, width=6, pad=0):
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros_like(ids, bool)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, True
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_equals_stepwise_argmax_of_full_forward(model, side):
    ids, mask = padded(PROMPTS, side)
    out = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6, temperature=0.0))
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for t in range(6):
            logits = full_logits(model, seq)
            nxt = int(jnp.argmax(logits))
            assert int(out.tokens[i, t]) == nxt, (i, t)
            np.testing.assert_allclose(out.policy_logprobs[i, t], jax.nn.log_softmax(logits)[nxt], atol=1e-4)
            seq.append(nxt)
    assert out.lengths.tolist() == [6, 6, 6] and not out.finished.any()
    np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: the sampling policy is deterministic


def test_eos_stops_rows_and_pads_after(model):
    ids, mask = padded(PROMPTS, "left")
    free = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6, temperature=0.0))
    eos = int(free.tokens[0, 2])  # row 0 emits this at step 2: make it the EOS
    out = generate(
        model, ids, mask, jax.random.key(0), SamplingConfig(6, temperature=0.0), eos_ids=[eos], pad_id=1
    )
    for i in range(3):
        row = free.tokens[i].tolist()
        stop = row.index(eos) + 1 if eos in row else 6
        assert out.tokens[i, :stop].tolist() == row[:stop]
        assert out.tokens[i, stop:].tolist() == [1] * (6 - stop)
        assert int(out.lengths[i]) == stop and bool(out.finished[i]) == (eos in row)
        np.testing.assert_array_equal(out.policy_logprobs[i, stop:], 0.0)


class _IdTokenizer:
    """A tokenizer without an EOS: its text is the token ids; token "t<id>" is id <id>."""

    eos_token_id, pad_token_id, unk_token_id = None, 0, None

    def __init__(self, size: int = V):
        self.size = size

    def __len__(self):
        return self.size

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def convert_tokens_to_ids(self, token):
        return int(token[1:]) if token[:1] == "t" and token[1:].isdigit() else None

    def convert_ids_to_tokens(self, token_id):
        return f"t{token_id}"


def test_completions_end_at_the_models_own_end_tokens(model):
    """A token of ModelConfig.eos_token_ids (e.g. generation_config.json's <|eot_id|>), not the tokenizer's
    EOS, ends a completion: finished, kept in token_ids, left out of the text. So does data.eos_token in
    online rollouts and evaluation by generation (SamplingConfig.end_token), where training ends finished
    completions with it (fresh samples ran past it)."""
    greedy, key = SamplingConfig(max_new_tokens=6, temperature=0.0), jax.random.key(0)
    free = [c for (c,) in sample_completions(model, _IdTokenizer(), PROMPTS, 1, greedy, key)]
    end = free[0]["token_ids"][2]
    ending = nnx.merge(*nnx.split(model))
    ending.config = dataclasses.replace(model.config, eos_token_ids=(end,))
    by_model = sample_completions(ending, _IdTokenizer(), PROMPTS, 1, greedy, key)
    by_data = sample_completions(
        model, _IdTokenizer(), PROMPTS, 1, dataclasses.replace(greedy, end_token=f"t{end}"), key
    )
    assert by_data == by_model
    with pytest.raises(ValueError, match="data.eos_token='x' is not a token of the tokenizer"):
        sample_completions(model, _IdTokenizer(), PROMPTS, 1, dataclasses.replace(greedy, end_token="x"), key)
    for want, (got,) in zip(free, by_model, strict=True):
        ids = want["token_ids"]
        stop = ids.index(end) + 1 if end in ids else len(ids)
        assert got["token_ids"] == ids[:stop] and got["finished"] == (end in ids)
        assert got["text"] == " ".join(map(str, ids[: stop - got["finished"]]))
    assert not any(c["finished"] for c in free)


def test_ids_past_the_tokenizer_are_never_sampled(model):
    """A model's vocabulary padded past its tokenizer's (Qwen2.5: 151936 rows, 151665 tokens): those rows
    decode to no text, so they are never drawn, greedy or sampled, top-k or not, even where they hold the
    largest logits; the policy log-probs stay those of the model's softmax over all its rows."""
    size = V - 8
    padded_vocab = nnx.merge(*nnx.split(model))
    kernel = np.array(padded_vocab.lm_head.kernel[...])
    kernel[:, size:] *= 5.0  # their logits the largest (or smallest) of all
    padded_vocab.lm_head.kernel[...] = jnp.asarray(kernel)
    key = jax.random.key(3)
    prompts = [[5, 7, 9], [3], [17, 4, 4, 8]]
    unmasked = generate(padded_vocab, *padded(prompts, "left"), key, SamplingConfig(4, temperature=0.0))
    assert (np.asarray(unmasked.tokens) >= size).mean() > 0.5  # what an unmasked model draws
    for cfg in (SamplingConfig(8, temperature=0.0), SamplingConfig(8), SamplingConfig(8, top_k=3)):
        rows = sample_completions(padded_vocab, _IdTokenizer(size), prompts, 16, cfg, key)
        ids = [c["token_ids"] for per_prompt in rows for c in per_prompt]
        assert max(max(x) for x in ids) < size
    # a model end token past the tokenizer's ids stays samplable: the row whose unmasked greedy draw is one
    # of those ids, made the end token, finishes on it at once
    row = int(np.flatnonzero(np.asarray(unmasked.tokens[:, 0]) >= size)[0])
    end = int(unmasked.tokens[row, 0])
    ending = nnx.merge(*nnx.split(padded_vocab))
    ending.config = dataclasses.replace(model.config, eos_token_ids=(end,))
    greedy = SamplingConfig(4, temperature=0.0)
    ((ended,),) = sample_completions(ending, _IdTokenizer(size), prompts[row : row + 1], 1, greedy, key)
    assert ended["finished"] and ended["token_ids"] == [end]
    first = rows[0][0]["token_ids"][0]
    full = jax.nn.log_softmax(full_logits(padded_vocab, prompts[0]).astype(jnp.float32))
    one = sample_completions(padded_vocab, _IdTokenizer(size), prompts[:1], 1, SamplingConfig(1), key)[0][0]
    assert one["policy_logprob"] == pytest.approx(float(full[one["token_ids"][0]]), abs=1e-5)
    assert first < size


def np_filter(logits, temperature, top_k, top_p):
    """Reference: keep the top_k largest, then the smallest most-likely prefix with mass >= top_p."""
    x = logits.astype(np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        order = np.argsort(-x[r], kind="stable")
        keep = order[:top_k] if top_k else order
        p = np.exp(x[r, keep] - x[r, keep].max())
        p /= p.sum()
        mass, chosen = 0.0, []
        for j, tok in enumerate(keep):
            if mass >= top_p:
                break
            chosen.append(tok)
            mass += p[j]
        out[r, chosen] = x[r, chosen]
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.5), (1, 1.0), (0, 0.05)])
def test_top_k_top_p_masks_match_numpy(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 2
    got = np.asarray(filter_logits(jnp.asarray(logits), 0.8, top_k, top_p))
    want = np_filter(logits, 0.8, top_k, top_p)
    np.testing.assert_array_equal(got > -1e29, np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5)


def test_sampled_frequencies_match_softmax(model):
    """2000 draws of the first token of one prompt: chi-square against the tempered (top-k) softmax."""
    n, temperature, top_k = 2000, 1.5, 8
    ids, mask = padded([[5, 7, 9]] * n, "left", width=3)
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k)
    out = generate(model, ids, mask, jax.random.key(1), cfg)
    probs = np.asarray(
        jax.nn.softmax(filter_logits(full_logits(model, [5, 7, 9])[None], temperature, top_k))
    )[0]
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V)
    support = probs > 1e-6
    assert counts[~support].sum() == 0
    expected = n * probs[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: the 99.9% quantile is 24.3
    assert chi2 < 24.3, (chi2, counts[support], expected)
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[np.asarray(out.tokens[:, 0])]), atol=1e-4)


def test_sharded_generation_equals_unsharded(model):
    """3 rows over a 4 x 2 (data x fsdp) mesh: padded internally to 8 rows, then dropped."""
    ids, mask = padded(PROMPTS, "right")
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    plain = generate(model, ids, mask, jax.random.key(0), greedy)
    sharded = generate(model, ids, mask, jax.random.key(0), greedy, mesh=make_mesh(data=4, fsdp=2))
    assert sharded.tokens.shape == (3, 6)
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_allclose(plain.policy_logprobs, sharded.policy_logprobs, atol=1e-4)


def test_samples_do_not_depend_on_batching_or_the_mesh(model):
    """Each row draws from the key folded with its number: eval_generation.batch_size, the generate
    command's batching and the devices a run has (a mesh pads rows to a multiple of its batch split) leave
    every sample as it was (one key split per batch once made them all differ)."""
    cfg, key = SamplingConfig(max_new_tokens=5, temperature=1.0), jax.random.key(4)
    prompts = [[5, 7, 9, 11, 2], [3], [17, 4, 4], [8, 1]]

    def ids(*args, key=key):
        rows = sample_completions(model, _IdTokenizer(), prompts, 3, cfg, key, *args)
        logps = np.array([c["logprob"] for per_prompt in rows for c in per_prompt])
        return [[c["token_ids"] for c in per_prompt] for per_prompt in rows], logps

    whole, logps = ids(64)
    for args in ((5,), (7, make_mesh(data=4, fsdp=2))):  # other padding widths: log-probs to rounding
        got, got_logps = ids(*args)
        assert got == whole
        np.testing.assert_allclose(got_logps, logps, rtol=1e-5)
    assert len({tuple(x) for per_prompt in whole for x in per_prompt}) > 6
    assert ids(64, key=jax.random.key(5))[0] != whole
    # nor on how many samples each prompt has: a prompt's first two of three are its two
    two = sample_completions(model, _IdTokenizer(), prompts, 2, cfg, key, 64)
    assert [[c["token_ids"] for c in per_prompt] for per_prompt in two] == [p[:2] for p in whole]
    with pytest.raises(ValueError, match=r"row_ids must be in \[0, 2\^31\)"):
        generate(model, *padded(prompts[:1], "left"), key, cfg, row_ids=[[2**31, 0]])
    with pytest.raises(ValueError, match=r"row_ids must be \[1, 2\] integers, got float64 \(1, 2\)"):
        generate(model, *padded(prompts[:1], "left"), key, cfg, row_ids=[[0.5, 0]])


def test_sample_step_takes_one_key_or_a_key_per_row_typed_or_raw():
    logits = jax.random.normal(jax.random.key(0), (5, 11))
    cfg, rows = SamplingConfig(1), jnp.arange(5)
    one = [sample_step(k, logits, cfg)[0] for k in (jax.random.key(1), jax.random.PRNGKey(1))]
    np.testing.assert_array_equal(*one)
    per_row = [
        sample_step(jax.vmap(lambda r, k=k: jax.random.fold_in(k, r))(rows), logits, cfg)[0]
        for k in (jax.random.key(1), jax.random.PRNGKey(1))
    ]
    np.testing.assert_array_equal(*per_row)
    # row r's draw is its own key's, whatever the other rows
    alone = sample_step(jax.random.fold_in(jax.random.key(1), 3), logits[3:4], cfg)[0]
    assert int(alone[0]) == int(per_row[0][3])


def test_rejects_empty_prompt_rows(model):
    ids, mask = padded(PROMPTS, "left")
    mask[1] = False
    with pytest.raises(ValueError, match=r"prompt row\(s\) \[1\] have no tokens"):
        generate(model, ids, mask, jax.random.key(0), SamplingConfig(2))


def test_generate_command_writes_k_completions_per_prompt(tmp_path, caplog):
    import json

    from copg_jax.data.testing import make_tiny_tokenizer
    from copg_jax.generate import main
    from copg_jax.models import save_pretrained

    tok = make_tiny_tokenizer(str(tmp_path / "policy"))
    cfg = ModelConfig(
        model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
        eos_token_ids=(tok.eos_token_id,),
    )  # fmt: skip
    save_pretrained(from_config(cfg, rngs=nnx.Rngs(1)), tmp_path / "policy")
    prompts = [{"prompt": "w1 w2 w3", "id": 7}, {"prompt": [{"role": "user", "content": "w4"}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    args = ["--model", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl")]
    args += ["--out", str(tmp_path / "out.jsonl"), "--num-completions", "3", "--max-new-tokens", "4"]
    assert main([*args, "--dtype", "float32", "--temperature", "0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts] and rows[0]["id"] == 7
    for r in rows:
        assert len(r["completions"]) == 3 and len(set(r["completions"])) == 1  # greedy: K equal completions
        assert all(
            w.startswith("w") or w.startswith("[") or w.startswith("<") for w in r["completions"][0].split()
        )
        assert r["behaviour_logprobs"] == [0.0] * 3
    snapshot = tmp_path / "snapshot"  # a hub snapshot of prompts: the split's files only
    snapshot.mkdir()
    for split, prompt in (("train", "w5"), ("test", "w6")):
        (snapshot / f"{split}.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    args = ["--model", str(tmp_path / "policy"), "--prompts", str(snapshot), "--split", "test"]
    with caplog.at_level("WARNING", logger="copg_jax.generate"):  # a cut prompt is counted, not silent
        assert (
            main(
                [
                    *args,
                    "--out",
                    str(tmp_path / "test.jsonl"),
                    "--max-new-tokens",
                    "2",
                    "--max-prompt-length",
                    "1",
                ]
            )
            == 0
        )
    assert (
        "1 of 1 prompts are longer than --max-prompt-length=1 and are sampled after their last 1"
        in caplog.text
    )
    assert [json.loads(line)["prompt"] for line in (tmp_path / "test.jsonl").read_text().splitlines()] == [
        "w6"
    ]


def test_generate_command_refuses_what_it_cannot_sample_or_write_before_sampling(tmp_path, capsys):
    """`copg generate` stops with one line, before sampling, where it wrote samples of nothing or lost them:
    a tokenizer that is not the model's (ids past its vocabulary gave NaN logits, sampled as token 0, and
    the run said it succeeded), a carried column JSON cannot hold (bytes: a traceback after all the
    sampling, and the earlier --out file left empty), a learned position table too short for a prompt
    (naming the row and the flag to lower). A timestamp column is carried as ISO 8601 text."""
    import datetime
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from copg_jax.data.testing import make_tiny_tokenizer
    from copg_jax.generate import main
    from copg_jax.models import save_pretrained

    tok = make_tiny_tokenizer(str(tmp_path / "small"))
    small = ModelConfig(
        model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    save_pretrained(from_config(small, rngs=nnx.Rngs(1)), tmp_path / "small")
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": "w1 w2"}) + "\n" + json.dumps({"prompt": "w150"})
    )
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n")
    args = [
        "--model",
        str(tmp_path / "small"),
        "--out",
        str(out),
        "--max-new-tokens",
        "2",
        "--dtype",
        "float32",
    ]
    with pytest.raises(
        ValueError, match=r"^prompt 1: token id \d+ is outside the model's vocab_size 100: the tokenizer"
    ):
        main([*args, "--prompts", str(tmp_path / "prompts.jsonl")])
    stamp = datetime.datetime(2026, 12, 1, 7, 30)
    table = {"prompt": ["w1", "w2"], "when": [stamp, stamp], "blob": [b"\x00", b"\x01"]}
    pq.write_table(pa.table(table), tmp_path / "bytes.parquet")
    with pytest.raises(
        ValueError, match=r"bytes.parquet: prompt row 0, column 'blob' holds a value of type bytes"
    ):
        main([*args, "--prompts", str(tmp_path / "bytes.parquet")])
    assert out.read_text() == "earlier\n"
    pq.write_table(pa.table({k: table[k] for k in ("prompt", "when")}), tmp_path / "dates.parquet")
    assert main([*args, "--prompts", str(tmp_path / "dates.parquet")]) == 0
    assert [json.loads(line)["when"] for line in out.read_text().splitlines()] == ["2026-12-01T07:30:00"] * 2
    learned = ModelConfig.from_hf(
        {
            "model_type": "gpt2",
            "vocab_size": len(tok),
            "n_embd": 16,
            "n_layer": 1,
            "n_head": 2,
            "n_positions": 6,
        }
    )
    save_pretrained(from_config(learned, rngs=nnx.Rngs(1)), tmp_path / "learned")
    tok.save_pretrained(tmp_path / "learned")
    (tmp_path / "long.jsonl").write_text(
        json.dumps({"prompt": "w1"}) + "\n" + json.dumps({"prompt": "w1 w2 w3 w4 w5"})
    )
    args[1] = str(tmp_path / "learned")
    with pytest.raises(SystemExit):
        main([*args, "--prompts", str(tmp_path / "long.jsonl")])
    error = capsys.readouterr().err
    assert "prompt row 1 (" in error and "max_position_embeddings=6: set --max-prompt-length <= 4" in error
    with pytest.raises(FileNotFoundError, match="prompts file .*missing.jsonl' does not exist"):
        main([*args, "--prompts", str(tmp_path / "missing.jsonl")])


def test_positions_past_the_model_length(model, caplog):
    prompts, mask = np.ones((2, 8), np.int32), np.ones((2, 8), bool)
    learned = ModelConfig.from_hf(
        {"model_type": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 16}
    )
    with pytest.raises(ValueError, match=r"\(8 tokens\) \+ max_new_tokens \(9\) needs 17 positions.*=16"):
        generate(from_config(learned, rngs=nnx.Rngs(0)), prompts, mask, jax.random.key(0), SamplingConfig(9))
    with caplog.at_level("WARNING", logger="copg_jax.generate"):  # rotary: allowed, with a warning
        out = generate(model, prompts, mask, jax.random.key(0), SamplingConfig(60, temperature=0.0))
    assert out.tokens.shape == (2, 60) and "needs 68 positions" in caplog.text


@pytest.mark.parametrize("side, scan_layers", [("left", False), ("right", True)])
def test_phi3_longrope_greedy_generation_equals_transformers_generate(side, scan_layers, tmp_path):
    """Phi-3 with LongRoPE over a pretrained length of 6, generating past it: our greedy tokens and their
    log-probs are transformers' generate() of each prompt alone (transformers decides long or short by the
    whole batch, we per row). transformers drops the cache when a sequence first reaches 7 tokens and
    re-encodes it with the long factors; rows of 2, 4 and 6 prompt tokens do so at steps 4, 2 and 0 of one
    batch, a row of 8 starts past the pretrained length (prefilled long)."""
    config = transformers.Phi3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=64,
        original_max_position_embeddings=6, partial_rotary_factor=0.5, sliding_window=None,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]},
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    assert config.rope_parameters["original_max_position_embeddings"] == 6
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    torch_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, scan_layers=scan_layers)
    assert model.reencode_position == 6
    rng = np.random.default_rng(0)
    prompts, steps = [rng.integers(3, 128, n).tolist() for n in (2, 4, 6, 8)], 6
    ids, mask = padded(prompts, side, width=8)
    out = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=steps, temperature=0.0))
    tokens, logprobs = [], []
    for prompt in prompts:
        with torch.no_grad():
            theirs = torch_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        tokens.append(theirs.sequences[0, len(prompt) :].tolist())
        policy = torch.log_softmax(torch.stack(theirs.logits)[:, 0].float(), -1)  # [steps, V]
        logprobs.append(policy[torch.arange(steps), theirs.sequences[0, len(prompt) :]].numpy())
    assert out.tokens.tolist() == tokens
    np.testing.assert_allclose(out.policy_logprobs, np.stack(logprobs), atol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "nan"], "temperature must be finite and >= 0, got nan"),  # sampled padding
        (["--temperature", "inf"], "temperature must be finite and >= 0, got inf"),  # sampled uniformly
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--max-prompt-length", "0"], "--max-prompt-length must be >= 1"),  # 0 kept all, -1 dropped BOS
        (["--seed", str(2**32)], "--seed must be in [0, 2^32)"),
        (
            ["--tokenizer", "examples/tiny/tokenizer", "--eos-token", "<nope>"],
            "--eos-token: data.eos_token='<no",
        ),
    ],
)
def test_bad_generate_flags_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    from copg_jax import cli

    (tmp_path / "p.jsonl").write_text('{"prompt": "w1"}\n')
    monkeypatch.chdir(Path(__file__).parents[1])  # the repo: examples/tiny/tokenizer
    argv = ["generate", "--model", str(tmp_path / "none"), "--prompts", str(tmp_path / "p.jsonl")]
    argv += ["--out", str(tmp_path / "o.jsonl"), *flags]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's usage error
        status = e.code
    assert status in (1, 2) and message in capsys.readouterr().err


def test_a_prompt_that_is_a_list_of_strings_is_named(tmp_path):
    from copg_jax.generate import read_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "w1"}\n{"prompt": ["w1", "w2"]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'prompt': message 0 is not \{role: str, content"):
        read_prompts(str(tmp_path / "p.jsonl"))


def test_prompts_come_from_any_data_source_and_a_named_column(tmp_path):
    """GSM8K-shaped prompt files as the hub ships them (Parquet, a `question` column) and as CSV: the prompt
    is read from the named column, the other columns ride along (a reward's `answer`); a bad row is named by
    its file and row."""
    import datasets

    from copg_jax.generate import read_prompts

    rows = [{"question": "w1 w2", "answer": "w3"}, {"question": "w4", "answer": "007"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "gsm.parquet"))
    (tmp_path / "gsm.csv").write_text("question,answer\nw1 w2,w3\nw4,007\n")
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("gsm.parquet", "gsm.jsonl"):
        got = read_prompts(str(tmp_path / name), "question", cache_dir=str(tmp_path / "cache"))
        assert got == [{**r, "prompt": r["question"]} for r in rows]
    got = read_prompts(str(tmp_path / "gsm.csv"), "question", cache_dir=str(tmp_path / "cache"))
    assert [r["prompt"] for r in got] == ["w1 w2", "w4"]
    # a column of mixed cells stays text, as `datasets` reads it (it was read cell by cell: 7, True, "1/2")
    assert [r["answer"] for r in got] == ["w3", "007"]
    (tmp_path / "mixed.csv").write_text("question,answer\nw1,0.50\nw2,007\nw3,1/2\nw4,True\n")
    got = read_prompts(str(tmp_path / "mixed.csv"), "question", cache_dir=str(tmp_path / "cache"))
    assert [r["answer"] for r in got] == ["0.50", "007", "1/2", "True"]
    datasets.Dataset.from_list([*rows, {"question": "", "answer": "w5"}]).to_parquet(
        str(tmp_path / "bad.parquet")
    )
    prefill = [{"prompt": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}]
    (tmp_path / "prefill.jsonl").write_text(json.dumps(prefill[0]) + "\n")
    with pytest.raises(
        ValueError, match=r"prefill.jsonl:1: field 'prompt': the prompt's last turn is the assistant's"
    ):
        read_prompts(str(tmp_path / "prefill.jsonl"))
    with pytest.raises(ValueError, match=r"bad.parquet row 2: field 'question': empty prompt"):
        read_prompts(str(tmp_path / "bad.parquet"), "question", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        ValueError,
        match=r"gsm.jsonl: no row has a column 'prompt' \(the columns: 'question', 'answer'\): name the",
    ):
        read_prompts(str(tmp_path / "gsm.jsonl"))


def test_prompts_to_sample_are_read_as_training_reads_prompts(tmp_path, caplog):
    """data.prompt_template and data.system_col shape sampled prompts as they shape training prompts (they
    were left out: a GSM8K run sampled bare questions); whitespace is no prompt; ShareGPT messages are read
    as chat turns; data.on_bad_row=skip leaves bad rows out, counted; a prompt past data.max_prompt_length is
    counted when cut, refused under data.truncation=error."""
    from copg_jax.data.config import DataConfig
    from copg_jax.data.testing import make_tiny_tokenizer
    from copg_jax.generate import prompt_token_ids, read_prompts
    from copg_jax.models import load_tokenizer

    rows = [
        {"question": "w1 w2", "answer": 2, "system": "w9"},
        {"question": "   ", "answer": 3, "system": ""},
        {"question": [{"from": "human", "value": "w3"}], "answer": 4, "system": ""},
        {"question": "w4 w5 w6 w7 w8", "answer": 5, "system": ""},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'question': prompt of whitespace only"):
        read_prompts(str(path), "question")
    cfg = DataConfig(prompt_template="Q: {question}", system_col="system", on_bad_row="skip")
    with caplog.at_level("WARNING", logger="copg_jax.generate"):
        got = read_prompts(str(path), "question", data_cfg=cfg)
    assert [r["prompt"] for r in got] == [
        [{"role": "system", "content": "w9"}, {"role": "user", "content": "Q: w1 w2"}],
        [{"role": "user", "content": "Q:    "}],  # as training templates it: the template's text is there
        [{"role": "user", "content": "Q: w4 w5 w6 w7 w8"}],
    ]
    assert [r["answer"] for r in got] == [2, 3, 5]
    assert "3 prompts from 4 rows" in caplog.text and "p.jsonl:3" in caplog.text
    # a template over other columns (the training data's) leaves a prompt file's own prompt column be
    (tmp_path / "plain.jsonl").write_text('{"prompt": "w1"}\n')
    assert read_prompts(
        str(tmp_path / "plain.jsonl"), data_cfg=DataConfig(prompt_template="{instruction}")
    ) == [{"prompt": "w1"}]
    with pytest.raises(
        ValueError, match=r"plain.jsonl: no row has a column 'question' \(the columns: 'prompt'\)"
    ):
        read_prompts(
            str(tmp_path / "plain.jsonl"), "question", data_cfg=DataConfig(prompt_template="{instruction}")
        )
    (tmp_path / "broken.jsonl").write_text('{"prompt": "w1"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON") as e:
        read_prompts(str(tmp_path / "broken.jsonl"))
    assert "on_bad_row" not in str(e.value)  # copg generate has no such setting to point to
    with caplog.at_level("WARNING", logger="copg_jax.generate"):
        assert read_prompts(str(tmp_path / "broken.jsonl"), data_cfg=DataConfig(on_bad_row="skip")) == [
            {"prompt": "w1"}
        ]
    assert "1 prompts from 2 rows" in caplog.text and "broken.jsonl:2" in caplog.text
    with pytest.raises(ValueError, match=r"plain.jsonl: data.system_col='sys': no row has such a column"):
        read_prompts(str(tmp_path / "plain.jsonl"), data_cfg=DataConfig(system_col="sys"))
    cfg = DataConfig(on_bad_row="skip")
    (got,) = [r for r in read_prompts(str(path), "question", data_cfg=cfg) if r["answer"] == 5]
    (tmp_path / "p3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[0], rows[2]]))
    assert read_prompts(str(tmp_path / "p3.jsonl"), "question")[-1]["prompt"] == [
        {"role": "user", "content": "w3"}
    ]
    tool = {**rows[2], "question": [{"from": "observation", "value": "w3"}]}
    (tmp_path / "p4.jsonl").write_text(json.dumps(tool) + "\n")
    with pytest.raises(
        ValueError,
        match=r"p4.jsonl:1: field 'question': message 0 is ShareGPT's from "
        r"'observation', a speaker no chat role is read for",
    ):
        read_prompts(str(tmp_path / "p4.jsonl"), "question")
    make_tiny_tokenizer(str(tmp_path / "tok"))
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="copg_jax.generate"):
        ids, left_out = prompt_token_ids(
            [{"prompt": "w1"}, got], tokenizer, DataConfig(max_prompt_length=3), "rollout"
        )
    assert [len(x) for x in ids] == [2, 3] and left_out == []  # BOS w1; BOS and the last 2 of w4 .. w8
    assert ids[1].tolist() == [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(["w7", "w8"])]
    assert "rollout: 1 of 2 prompts are longer than data.max_prompt_length=3" in caplog.text
    strict = DataConfig(max_prompt_length=3, truncation="error")
    with pytest.raises(ValueError, match=r"rollout: prompt \"w4 w5 w6 w7 w8\" \(prompt row 1\) has 6 tokens"):
        prompt_token_ids([{"prompt": "w1"}, got], tokenizer, strict, "rollout")
    skip = dataclasses.replace(strict, on_bad_row="skip")  # as training leaves such a row out
    ids, left_out = prompt_token_ids([{"prompt": "w1"}, got], tokenizer, skip, "rollout")
    assert [len(x) for x in ids] == [2] and left_out == [1]


def test_the_prompts_digest_reads_the_prompts_tests_and_ids_only():
    """Hosts compare it (sharding.same_everywhere): a dataset's other columns (an image whose repr holds a
    memory address) must not make equal prompts differ, nor a long array's elided repr hide a difference."""
    from copg_jax.generate import prompts_digest

    ids = [np.asarray([1, 2, 3], np.int32)]
    rows = [{"prompt": "w1", "tests": ["assert f(1) == 1"], "image": object()}]
    same = prompts_digest(rows, ids)
    assert prompts_digest([{**rows[0], "image": object()}], ids) == same
    assert prompts_digest([{**rows[0], "tests": ["assert f(1) == 2"]}], ids) != same
    assert prompts_digest(rows, [np.asarray([1, 2, 4], np.int32)]) != same
