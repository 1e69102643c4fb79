"""Online mode (`rollout.every_n_steps`) end to end on the tiny example setup: rollouts fill the buffer,
batches mix fresh and logged prompts, reference log-probs come from the initial weights, reward failures
are dropped and counted, fresh_fraction=0 is the offline run, interrupt + resume equals straight through."""

import dataclasses
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from copg_jax import train as tr
from copg_jax.config import ConfigError, apply_overrides, from_dict
from copg_jax.data.layout import verify_layout
from copg_jax.data.pipeline import DataIterator
from copg_jax.data.testing import slot_targets
from copg_jax.jsonl import read_jsonl, write_jsonl
from copg_jax.rollout import FreshPrompt, OnlineRollouts, ReplayBuffer, mixed_batch, next_rows
from copg_jax.run_config import Config, load_config
from copg_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
NUM_PROMPTS, K, EVERY = 4, 3, 2

REWARD = '''
def odd_first_fails(prompts, completions, bonus):
    """Fraction of words ending in an even digit, plus the prompt row's `bonus` (10 x its line: which row
    the reward was told it scores); raises for a completion whose first word ends odd."""
    out = []
    for c, extra in zip(completions, bonus, strict=True):
        words = c.split()
        if words and words[0][-1] in "13579":
            raise ValueError(f"first word {words[0]!r} ends in an odd digit")
        out.append(extra + sum(w[-1] in "02468" for w in words) / max(len(words), 1))
    return out
'''


def _even_fraction(text: str) -> float:
    words = text.split()
    return sum(w[-1] in "02468" for w in words) / max(len(words), 1)


def _fails(text: str) -> bool:
    words = text.split()
    return bool(words) and words[0][-1] in "13579"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny CPU config (no eval), its reference cache, and an importable reward module."""
    root = tmp_path_factory.mktemp("online")
    (root / "tiny_online_reward.py").write_text(textwrap.dedent(REWARD))
    sys.path.insert(0, str(root))
    base = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    base["model"]["tokenizer"] = str(REPO / base["model"]["tokenizer"])
    # the logged data, each row with a field the reward takes (a per-prompt constant: CoPG's loss, a
    # function of reward differences within a prompt, is unchanged by it)
    lines = read_jsonl(REPO / "examples/tiny/train.jsonl")
    write_jsonl(root / "train.jsonl", [{**row, "bonus": 10.0 * i} for i, row in enumerate(lines)])
    base["data"].update(
        path=str(root / "train.jsonl"),
        eval_path="",
        eval_ref_cache="",
        ref_cache=str(root / "ref.parquet"),
    )
    base["train"].update(steps=6, log_every=1, eval_every=0, export_on_finish=False, progress=False)
    base["checkpoint"].update(every_steps=3, keep_best=0, async_save=False)
    base["rollout"] = dict(
        every_n_steps=EVERY,
        num_prompts=NUM_PROMPTS,
        num_completions=K,
        max_new_tokens=6,
        fresh_fraction=0.5,
        buffer_size=6,
        policy_lag=1,
        reward={"fn": "tiny_online_reward:odd_first_fails"},
    )

    def cfg(name: str, *overrides) -> Config:
        data = apply_overrides(base, [f"train.output_dir={root / name}", *overrides])
        return from_dict(Config, data)

    tr.precompute_reference(cfg("ref"))
    yield {"root": root, "cfg": cfg}
    sys.path.remove(str(root))


def _state(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of the online-mode state saved with checkpoint `step`."""
    with np.load(OnlineRollouts.state_path(run_dir / "checkpoints", step)) as f:
        return {k: f[k] for k in f.files}


def _buffer(run_dir: Path, step: int) -> ReplayBuffer:
    arrays = _state(run_dir, step)
    return ReplayBuffer.from_arrays(6, {k[7:]: v for k, v in arrays.items() if k.startswith("buffer/")})


def _params(cfg: Config, step: int) -> dict:
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    _, params, got = tr.restore_params(cfg, cfg.checkpoint_dir, mesh, step)
    assert got == step
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


@pytest.fixture(scope="module")
def straight(setup):
    cfg = setup["cfg"]("straight")
    result = tr.train(cfg)
    assert result.step == 6 and not result.interrupted
    return cfg


def test_online_run_fills_the_buffer_and_trains_on_fresh_prompts(straight):
    rows = read_jsonl(Path(straight.train.output_dir) / "metrics.jsonl")
    rollouts = [r for r in rows if "rollout/reward_mean" in r]
    assert [r["step"] for r in rollouts] == [0, 2, 4]
    for r in rollouts:
        for key in ("rollout/failures", "rollout/buffer_size", "rollout/gen_tokens_per_s", "rollout/time_s"):
            assert r[key] is not None and r[key] >= 0, key
        assert r["rollout/gen_tokens_per_s"] > 0
    sizes = [int(r["rollout/buffer_size"]) for r in rollouts]
    assert sizes[0] > 0 and sizes[-1] <= 6 and sizes == sorted(sizes)
    # each update draws min(round(0.5 * 8), buffer size) prompts from the buffer
    expected = [0]
    for size in sizes:
        expected.append(expected[-1] + EVERY * min(4, size))
    assert [r["rollout/fresh_prompts_trained"] for r in rollouts] == expected[:3]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 6
    # the first update compiles the step: it is left out of the throughput (null where it is alone)
    assert train_rows[0]["perf/step_time_s"] is None and train_rows[0]["perf/mfu"] is None
    assert all(r["perf/step_time_s"] > 0 and r["perf/mfu"] > 0 for r in train_rows[1:])


def test_mixed_batch_holds_fresh_prompts_in_the_training_layout(straight):
    from copg_jax.models import load_tokenizer

    mesh = make_mesh(straight.mesh.data)
    batches = tr.load_data(straight, load_tokenizer(straight.tokenizer_path), mesh)
    buffer = _buffer(Path(straight.train.output_dir), 6)
    fresh = list(buffer.items)[:4]
    offline = next(batches)
    batches.set_state({"epoch": 0, "index": 0})
    rows = next_rows(batches)
    assert batches.get_state() == {"epoch": 0, "index": 1, **batches.order()}
    batch = mixed_batch(batches, rows[:4], fresh)
    k = batches.num_completions
    assert batch.tokens.input_ids.shape == offline.tokens.input_ids.shape  # no recompilation
    assert batch.rewards.shape == (8, k)
    # prompts 0-3: the logged rows, exactly as the iterator lays them out; 4-7: the buffer items
    np.testing.assert_array_equal(batch.ref_logps[:4], offline.ref_logps[:4])
    np.testing.assert_array_equal(batch.rewards[:4], offline.rewards[:4])
    for b, item in enumerate(fresh, start=4):
        n = len(item.completions)
        np.testing.assert_array_equal(batch.rewards[b, :n], item.rewards)
        np.testing.assert_array_equal(batch.ref_logps[b, :n], item.ref_logps)
        assert batch.completion_mask[b].tolist() == [True] * n + [False] * (k - n)
    from copg_jax.data.pipeline import host_examples

    examples = [e[:2] for e in host_examples(batches.data, rows[:4])]
    examples += [(f.prompt_ids, list(f.completions)) for f in fresh]
    verify_layout(batch.tokens, examples, k)
    # 2 hosts on a mesh whose batch shards alternate between them: host 0 holds prompts 0, 2, 4, 6 (logged
    # 0 and 2, fresh 4 and 6), with their per-prompt values and global slots
    d = jax.devices()
    interleaved = make_mesh(8, 1, 1, devices=[d[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
    hosts = [
        DataIterator(
            batches.data,
            batches.cfg,
            ref=batches.ref,
            mesh=interleaved,
            process_index=p,
            process_count=2,
            split_length=None,
        )
        for p in range(2)
    ]
    parts = [mixed_batch(h, rows[:4], fresh) for h in hosts]
    for part, where in zip(parts, ([0, 2, 4, 6], [1, 3, 5, 7]), strict=True):
        for f in ("rewards", "ref_logps", "completion_mask", "completion_lengths"):
            np.testing.assert_array_equal(getattr(part, f), getattr(batch, f)[where], err_msg=f)
    assert slot_targets(parts) == slot_targets([batch])


def test_fresh_reference_logps_come_from_the_initial_weights(straight):
    from copg_jax.experiments.demo import sequence_logps

    buffer = _buffer(Path(straight.train.output_dir), 6)
    items = [it for it in buffer.items if it.rollout >= 1]  # sampled after training had started
    assert items
    pairs = [(it.prompt_ids, c) for it in items for c in it.completions]
    stored = np.concatenate([it.ref_logps for it in items])
    mesh = make_mesh(straight.mesh.data)
    graphdef, _ = tr.abstract_model(straight)
    initial = nnx.merge(graphdef, tr.init_params(straight, mesh))
    np.testing.assert_allclose(stored, sequence_logps(initial, pairs, 16), rtol=1e-5, atol=1e-4)
    trained_params = tr.restore_params(straight, straight.checkpoint_dir, mesh, 6)[1]
    trained = sequence_logps(nnx.merge(graphdef, trained_params), pairs, 16)
    assert np.max(np.abs(trained - stored)) > 0.05  # the policy moved; the reference did not


def test_reward_failures_are_counted_and_never_buffered(setup, straight):
    from copg_jax.models import load_tokenizer

    rows = read_jsonl(Path(straight.train.output_dir) / "metrics.jsonl")
    rollouts = [r for r in rows if "rollout/reward_mean" in r]
    assert sum(r["rollout/failures"] for r in rollouts) > 0
    for r in rollouts:
        total = r["rollout/failures"] + r["rollout/completions_added"] + r["rollout/completions_dropped"]
        assert total == NUM_PROMPTS * K
    tokenizer = load_tokenizer(straight.tokenizer_path)
    buffer = _buffer(Path(straight.train.output_dir), 6)
    assert len(buffer) == rollouts[-1]["rollout/buffer_size"]
    lines = read_jsonl(setup["root"] / "train.jsonl")
    for item in buffer.items:
        assert len(item.completions) >= 2 and np.all(np.isfinite(item.rewards))
        # each reward was computed with its own prompt's row field: the row its prompt ids come from
        row = int(item.rewards[0] // 10)
        prompt = tokenizer.decode(item.prompt_ids.tolist(), skip_special_tokens=True)
        assert prompt and lines[row]["prompt"].endswith(prompt)  # prompts are cut from the left
        for c, reward in zip(item.completions, item.rewards, strict=True):
            ids = c[:-1] if c[-1] == tokenizer.eos_token_id else c
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            assert not _fails(text)
            assert reward == pytest.approx(10 * row + _even_fraction(text), abs=1e-4)


def test_interrupt_and_resume_equals_straight_through(setup, straight, caplog):
    """Stopped at step 5 (checkpoints 2, 4 and 5), step 5's buffer file edited (a valid .npz, one reward
    changed): its checksum sends the resume back to step 4, and the run still ends where the uninterrupted
    one does. The rollout logged at step 4 after checkpoint 4 was saved runs again after resuming, and
    metrics.jsonl holds it once (it held it twice), as every other row of the straight run."""
    cfg = setup["cfg"]("resumed", "checkpoint.every_steps=2")
    first = tr.train(cfg, stop_after=5)
    assert first.interrupted and first.step == 5
    arrays = _state(Path(cfg.train.output_dir), 5)
    arrays["buffer/rewards"] = arrays["buffer/rewards"] + 1.0
    np.savez(OnlineRollouts.state_path(cfg.checkpoint_dir, 5), **arrays)
    with caplog.at_level("WARNING"):
        second = tr.train(cfg)
    assert any("step 5" in r.message and "checksum" in r.message for r in caplog.records)
    # step 5's row and its rollout's
    assert "dropped 2 rows logged at or past step 4, the checkpoint this run starts from" in caplog.text
    assert second.step == 6 and not second.interrupted

    def logged(c: Config) -> list[tuple]:
        rows = read_jsonl(Path(c.train.output_dir) / "metrics.jsonl")
        return [(r["step"], sorted(r), r.get("rollout/reward_mean"), r.get("loss")) for r in rows]

    ours, theirs = logged(cfg), logged(straight)
    assert [row[:2] for row in ours] == [row[:2] for row in theirs]
    np.testing.assert_allclose(
        np.array([r[2:] for r in ours], float), np.array([r[2:] for r in theirs], float)
    )
    jax.tree.map(np.testing.assert_array_equal, _params(cfg, 6), _params(straight, 6))
    ours, theirs = _state(Path(cfg.train.output_dir), 6), _state(Path(straight.train.output_dir), 6)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_fresh_fraction_zero_is_the_offline_run(setup):
    steps = ("train.steps=3", "checkpoint.every_steps=1")
    online = setup["cfg"]("zero", *steps, "rollout.fresh_fraction=0.0", "rollout.every_n_steps=1")
    offline = setup["cfg"]("offline", *steps, "rollout.every_n_steps=0")
    tr.train(online)
    tr.train(offline)
    rows = read_jsonl(Path(online.train.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows if "rollout/buffer_size" in r] == [0, 1, 2]  # rollouts did run
    jax.tree.map(np.testing.assert_array_equal, _params(online, 3), _params(offline, 3))
    # a rollout file per checkpoint kept: none of the one the last save dropped (it outlived the run)
    folder = Path(online.checkpoint_dir)
    kept = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    assert kept == [2, 3]  # keep_last 2
    assert sorted(int(p.stem) for p in (folder / "rollout").glob("*.npz")) == kept


def test_online_mode_trains_lora_adapters_on_fresh_prompts(setup):
    """LoRA in online mode: rollouts sample from base + adapters, the reference is the base in the step."""
    cfg = setup["cfg"]("lora", "lora.rank=4", "train.steps=3", "checkpoint.every_steps=3")
    assert tr.train(cfg).step == 3
    rows = read_jsonl(Path(cfg.train.output_dir) / "metrics.jsonl")
    rollouts = [r for r in rows if "rollout/buffer_size" in r]
    assert [r["step"] for r in rollouts] == [0, 2] and rollouts[-1]["rollout/fresh_prompts_trained"] > 0
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    params = nnx.to_flat_state(
        tr.split_trainable(tr.restore_params(cfg, cfg.checkpoint_dir, make_mesh(-1))[1])[0]
    )
    assert params and all(isinstance(v, nnx.LoRAParam) for _, v in params)


def test_replay_buffer_is_fifo_and_round_trips():
    def item(i):
        return FreshPrompt(
            np.arange(i + 1, dtype=np.int32),
            (np.full(2, i, np.int32), np.full(i + 1, i, np.int32)),
            np.asarray([i, -i], np.float32),
            np.asarray([-1.5 * i, 0.25], np.float32),
            rollout=i,
        )

    buffer = ReplayBuffer(3)
    buffer.add([item(0), item(1)])
    buffer.add([item(2), item(3)])
    assert [it.rollout for it in buffer.items] == [1, 2, 3]
    back = ReplayBuffer.from_arrays(3, buffer.to_arrays())
    for a, b in zip(back.items, buffer.items, strict=True):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        assert [c.tolist() for c in a.completions] == [c.tolist() for c in b.completions]
        np.testing.assert_array_equal(a.rewards, b.rewards)
        np.testing.assert_array_equal(a.ref_logps, b.ref_logps)
    (picks,) = buffer.sample(np.random.default_rng(0), 5)
    assert len(picks) == 3 and len({p.rollout for p in picks}) == 3
    # the microbatches of one update: disjoint while the buffer holds them all, else each distinct within
    big = ReplayBuffer(12, [item(i) for i in range(12)])
    for seed in range(20):
        groups = big.sample(np.random.default_rng(seed), 4, 3)
        drawn = [p.rollout for group in groups for p in group]
        assert len(groups) == 3 and sorted(drawn) == list(range(12))
    groups = big.sample(np.random.default_rng(0), 5, 3)
    assert [len({p.rollout for p in group}) for group in groups] == [5, 5, 5]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "rollout.evry_n_steps=2",
            ["unknown config key 'rollout.evry_n_steps'", "did you mean 'every_n_steps'"],
        ),
        ("rollout.reward.fnn=a:b", ["unknown config key 'rollout.reward.fnn'", "did you mean 'fn'"]),
        ("rollout.fresh_fraction=1.5", ["rollout.fresh_fraction", "[0, 1]"]),
        ("rollout.num_completions=1", ["rollout.num_completions", ">= 2"]),
        ("rollout.policy_lag=-1", ["rollout.policy_lag"]),
        ("rollout.every_n_steps=2", ["rollout.reward", "needs a reward"]),
    ],
)
def test_bad_rollout_config_keys_are_named(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny_cpu.yaml", [override])
    for text in expected:
        assert text in str(e.value), (text, str(e.value))


def test_rollouts_that_do_not_fit_the_data_layout_are_refused(setup):
    from copg_jax.models import load_tokenizer

    cfg = setup["cfg"]("refused", "rollout.num_completions=5")
    mesh = make_mesh(cfg.mesh.data)
    batches = tr.load_data(cfg, load_tokenizer(cfg.tokenizer_path), mesh)
    graphdef, _ = tr.abstract_model(cfg)
    with pytest.raises(ValueError, match="rollout.num_completions=5 exceeds the data's 4"):
        OnlineRollouts(cfg, None, mesh, graphdef, None, batches)


def test_prompts_without_a_field_the_reward_takes_stop_the_run_before_the_reference_cache(setup, tmp_path):
    """The prompts and the reward are read before the data and its reference caches: on a real model a
    forward pass over the whole dataset came before a refusal that needs none."""
    rows = [{"prompt": f"w{i} w2", "bonus": 1.0} for i in range(NUM_PROMPTS)]
    write_jsonl(tmp_path / "prompts.jsonl", [*rows, {"prompt": "w3"}])
    cache = tmp_path / "ref.parquet"
    cfg = setup["cfg"](
        "early", f"rollout.prompts_path={tmp_path / 'prompts.jsonl'}", f"data.ref_cache={cache}"
    )
    with pytest.raises(
        ValueError, match=rf"takes 'bonus': the row of prompt \"w3\" \(prompt row {NUM_PROMPTS}\) has none"
    ):
        tr.train(cfg)
    assert not cache.exists()


def test_a_fresh_fraction_that_rounds_to_the_whole_batch_is_warned_of(setup, caplog):
    from copg_jax.models import load_tokenizer

    cfg = setup["cfg"](
        "all_fresh", "rollout.fresh_fraction=0.95", "optim.grad_accum_steps=2", "rollout.num_prompts=9"
    )  # of 8: all 8
    mesh, tokenizer = make_mesh(cfg.mesh.data), load_tokenizer(cfg.tokenizer_path)
    graphdef, _ = tr.abstract_model(cfg)
    batches = tr.load_data(cfg, tokenizer, mesh)
    with caplog.at_level("WARNING", logger="copg_jax.rollout"):
        OnlineRollouts(cfg, tokenizer, mesh, graphdef, tr.init_params(cfg, mesh), batches)
    assert "rollout.fresh_fraction=0.95 of data.batch_size=8 rounds to all 8 prompts fresh" in caplog.text
    assert "0.875 keeps one logged prompt" in caplog.text
    # 2 microbatches of 8 from a buffer of 6: prompts repeat within an update
    assert "rollout.buffer_size=6 is less than the 16 prompts an update draws from it" in caplog.text
    # a rollout of 9 prompts into a buffer of 6: 3 prompts' samples leave it before any batch draws them
    assert (
        "rollout.buffer_size=6 holds fewer prompts than one rollout samples (rollout.num_prompts=9): the "
        in (caplog.text)
    )


# ------------------------------------------------------------------ online training from prompts alone

ONE_PER_PROMPT = '''
SEEN = set()


def first_only(prompts, completions):
    """Scores the first completion of each prompt it is shown and no other (None: does not apply)."""
    out = []
    for p in prompts:
        out.append(None if p in SEEN else 1.0)
        SEEN.add(p)
    return out
'''


@pytest.fixture(scope="module")
def prompts_only(setup):
    """Runs without data.path: prompts (with the reward's `bonus` field) and the reward alone, 4 prompts a
    rollout for batches of 8; the straight run of 4 updates."""
    root = setup["root"]
    lines = read_jsonl(REPO / "examples/tiny/train.jsonl")[:16]
    write_jsonl(
        root / "prompts.jsonl", [{"prompt": r["prompt"], "bonus": float(i)} for i, r in enumerate(lines)]
    )

    def cfg(name: str, *overrides) -> Config:
        return setup["cfg"](
            name,
            "data.path=",
            "data.ref_cache=",
            f"rollout.prompts_path={root / 'prompts.jsonl'}",
            "rollout.fresh_fraction=1",
            "rollout.buffer_size=8",
            "train.steps=4",
            "checkpoint.every_steps=2",
            *overrides,
        )

    straight = cfg("prompts_straight")
    assert tr.train(straight).step == 4
    return cfg, straight


def test_training_from_prompts_alone_takes_every_prompt_from_the_buffer(prompts_only):
    """No logged row is read: each update trains on min(batch, buffer) fresh prompts, padding the rest (a
    logged row would count in loss/count), and no reference cache is made (the buffer holds the reference
    log-probs)."""
    _, cfg = prompts_only
    rows = read_jsonl(Path(cfg.train.output_dir) / "metrics.jsonl")
    sizes = {r["step"]: int(r["rollout/buffer_size"]) for r in rows if "rollout/buffer_size" in r}
    assert sorted(sizes) == [0, 2] and 0 < sizes[0] <= NUM_PROMPTS and sizes[0] <= sizes[2] <= 8
    updates = [r for r in rows if "loss" in r]
    expected = [min(8, sizes[0])] * 2 + [min(8, sizes[2])] * 2
    assert [int(r["loss/count"]) for r in updates] == expected
    assert all(np.isfinite(r["loss"]) for r in updates)
    assert not (Path(cfg.train.output_dir) / "ref_cache").exists()


def test_training_from_prompts_alone_resumes_exactly(prompts_only, caplog):
    """Stopped after update 3, resumed: the weights of the straight run. The updates padded while the buffer
    held less than a batch (4 prompts a rollout, batches of 8) are warned of."""
    make, straight = prompts_only
    cfg = make("prompts_resumed")
    with caplog.at_level("WARNING", logger="copg_jax.rollout"):
        assert tr.train(cfg, stop_after=3).interrupted
    assert (
        "update 1: the replay buffer holds" in caplog.text and "fewer than data.batch_size=8" in caplog.text
    )
    assert tr.train(cfg).step == 4
    jax.tree.map(np.testing.assert_array_equal, _params(cfg, 4), _params(straight, 4))


def test_a_checkpoint_resumes_only_with_the_data_it_was_trained_on(setup):
    """The position of a run without logged data is refused by a run with it, and the other way round."""
    from copg_jax.models import load_tokenizer
    from copg_jax.rollout import FreshOnly

    cfg = setup["cfg"]("positions")
    logged = tr.load_data(cfg, load_tokenizer(cfg.tokenizer_path), make_mesh(cfg.mesh.data))
    fresh = FreshOnly(cfg.data, 4, split_length=None)
    with pytest.raises(ValueError, match="trained on logged data .*num_rows 64 -> 0.*data.path is now empty"):
        fresh.set_state(logged.get_state())
    with pytest.raises(
        ValueError, match=r"trained from prompts alone \(no data.path\): resume it with data.path"
    ):
        logged.set_state(fresh.get_state())
    fresh.set_state(fresh.get_state())


def test_a_run_with_logged_data_resumes_only_with_its_rollout_prompts(setup, tmp_path, caplog):
    """Mixed mode (logged data and rollout.prompts_path): the prompts edited in place, their path the same (no
    setting changed), are refused when the rollout state is restored, as changed logged rows are;
    checkpoint.allow_changes=[rollout.prompts_path] takes the new prompts, warned."""
    from copg_jax.models import load_tokenizer

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"w{i} w2", "bonus": 1.0} for i in range(NUM_PROMPTS + 1)]
    write_jsonl(prompts, rows)
    cfg = setup["cfg"]("mixed_prompts", f"rollout.prompts_path={prompts}")
    mesh, tokenizer = make_mesh(cfg.mesh.data), load_tokenizer(cfg.tokenizer_path)
    graphdef, _ = tr.abstract_model(cfg)
    batches, params = tr.load_data(cfg, tokenizer, mesh), tr.init_params(cfg, mesh)

    def rollouts(cfg: Config) -> OnlineRollouts:
        return OnlineRollouts(cfg, tokenizer, mesh, graphdef, params, batches)

    rollouts(cfg).save(tmp_path / "ckpt", 2)
    rollouts(cfg).restore(tmp_path / "ckpt", 2)  # the same prompts
    write_jsonl(prompts, [*rows[:-1], {"prompt": "w9 w2", "bonus": 1.0}])
    with pytest.raises(ValueError, match=r"trained from other prompts: the rollout prompts \(another file"):
        rollouts(cfg).restore(tmp_path / "ckpt", 2)
    allowed = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, allow_changes=["rollout.prompts_path"])
    )
    with caplog.at_level("WARNING", logger="copg_jax.rollout"):
        rollouts(allowed).restore(tmp_path / "ckpt", 2)
    assert "resuming with other rollout prompts (checkpoint.allow_changes)" in caplog.text


def test_a_prompts_only_run_resumes_only_with_its_prompts(prompts_only, caplog):
    """The prompt file edited in place (its path the same: no setting changed) is refused at the resume, as
    changed logged rows are; checkpoint.allow_changes=[rollout.prompts_path] takes the new prompts, warned."""
    make, _ = prompts_only
    root = Path(make("x").train.output_dir).parent
    lines = (root / "prompts.jsonl").read_text().splitlines(keepends=True)
    (root / "own_prompts.jsonl").write_text("".join(lines))
    own = (f"rollout.prompts_path={root / 'own_prompts.jsonl'}", "optim.schedule=constant")  # steps: free
    cfg = make("prompts_edited", *own, "train.steps=2")
    assert tr.train(cfg).step == 2
    (root / "own_prompts.jsonl").write_text("".join(lines[:-1]))
    more = make("prompts_edited", *own, "train.steps=3")
    with pytest.raises(ValueError, match=r"trained from other prompts: the rollout prompts \(another file"):
        tr.train(more)
    allowed = make("prompts_edited", *own, "train.steps=3", "checkpoint.allow_changes=[rollout.prompts_path]")
    with caplog.at_level("WARNING", logger="copg_jax.rollout"):
        assert tr.train(allowed).step == 3
    assert "resuming with other rollout prompts (checkpoint.allow_changes)" in caplog.text


def test_an_empty_buffer_without_logged_data_stops_the_run(prompts_only, setup):
    """Every prompt of the first rollout keeps one scored completion (a prompt needs two): with no logged
    rows to train on, the run stops naming why rather than training on padding."""
    (setup["root"] / "one_per_prompt.py").write_text(ONE_PER_PROMPT)
    make, _ = prompts_only
    cfg = make("prompts_empty", "rollout.reward.fn=one_per_prompt:first_only", "rollout.policy_lag=0")
    with pytest.raises(ValueError, match="update 1: the replay buffer is empty .*no logged data"):
        tr.train(cfg)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rollout.prompts_path=", "rollout.prompts_path: online training without data.path"),
        ("rollout.fresh_fraction=0.5", "rollout.fresh_fraction: 0.5, but without data.path"),
        ("rollout.buffer_size=4", "rollout.buffer_size: 4, less than data.batch_size=8: without data.path"),
        ("rollout.every_n_steps=0", "rollout.every_n_steps: data.path is empty and rollout.prompts_path set"),
    ],
)
def test_online_training_without_data_path_needs_prompts_and_only_fresh_prompts(override, expected):
    overrides = ["data.path=", "rollout.every_n_steps=2", "rollout.reward.fn=m:f", "rollout.prompts_path=p"]
    overrides += ["rollout.fresh_fraction=1", override]
    with pytest.raises(ConfigError, match=expected):
        load_config(REPO / "configs" / "tiny_cpu.yaml", overrides)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
def test_batches_without_logged_data_lay_out_fresh_prompts_and_padding(straight, layout):
    """Six buffer items in a batch of 8 with no logged data: two padding prompts carry no target, the six
    are laid out as the data layer lays out rows (`verify_layout`), and two hosts of an interleaved mesh
    hold exactly their shares of the one global batch."""
    from copg_jax.rollout import FreshOnly

    data_cfg = dataclasses.replace(straight.data, layout=layout)
    fresh = list(_buffer(Path(straight.train.output_dir), 6).items)
    assert len(fresh) == 6
    padding = np.full(2, -1, np.int64)
    one = FreshOnly(data_cfg, K, mesh=make_mesh(straight.mesh.data), split_length=None)
    batch = mixed_batch(one, padding, fresh)
    assert not batch.completion_mask[:2].any() and np.all(batch.ref_logps[:2] == 0)
    for b, item in enumerate(fresh, start=2):
        n = len(item.completions)
        np.testing.assert_array_equal(batch.rewards[b, :n], item.rewards)
        np.testing.assert_array_equal(batch.ref_logps[b, :n], item.ref_logps)
    verify_layout(batch.tokens, [None, None] + [(f.prompt_ids, list(f.completions)) for f in fresh], K)
    d = jax.devices()
    interleaved = make_mesh(8, 1, 1, devices=[d[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
    hosts = [
        FreshOnly(data_cfg, K, mesh=interleaved, process_index=p, process_count=2, split_length=None)
        for p in range(2)
    ]
    parts = [mixed_batch(h, padding, fresh) for h in hosts]
    assert len({p.tokens.input_ids.shape for p in parts}) == 1
    for part, where in zip(parts, ([0, 2, 4, 6], [1, 3, 5, 7]), strict=True):
        for f in ("rewards", "ref_logps", "completion_mask", "completion_lengths"):
            np.testing.assert_array_equal(getattr(part, f), getattr(batch, f)[where], err_msg=f)
    assert slot_targets(parts) == slot_targets([batch])


def test_no_data_path_without_online_mode_is_refused_and_fresh_rows_must_fit_the_row_length(setup):
    """An empty data.path off line is the one-line error it was (it built batches of no rows); a row length
    that fits no fresh prompt group is refused at the start (it failed at the first update)."""
    from copg_jax.rollout import FreshOnly

    with pytest.raises(ValueError, match="data.path is empty: set the training data"):
        tr.train(setup["cfg"]("no_data", "data.path=", "rollout.every_n_steps=0"))
    cfg = setup["cfg"]("row_length", "data.layout=packed", "data.row_length=12")
    graphdef, _ = tr.abstract_model(cfg)
    with pytest.raises(
        ValueError, match=r"needs 14 tokens in a row of the packed layout, more than data.row_l"
    ):
        OnlineRollouts(
            cfg, None, make_mesh(cfg.mesh.data), graphdef, None, FreshOnly(cfg.data, K, split_length=None)
        )
