"""The run Config: every shipped config loads strictly; dump/load round trip; section checks."""

import json
import re
from pathlib import Path

import pytest

from copg_jax.config import ConfigError
from copg_jax.run_config import Config, dump_config, load_config, resume_changes, settings_of

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "llama3_8b_tpu_v5e_256.yaml", "qwen2_5_7b_8xh100.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_realistic_configs_describe_their_hardware():
    tpu = load_config(CONFIGS[[p.name for p in CONFIGS].index("llama3_8b_tpu_v5e_256.yaml")])
    assert tpu.mesh.data * tpu.mesh.fsdp * tpu.mesh.tensor == 256
    assert (tpu.model.dtype, tpu.model.param_dtype, tpu.model.remat) == ("bfloat16", "float32", "full")
    gpu = load_config(CONFIGS[[p.name for p in CONFIGS].index("qwen2_5_7b_8xh100.yaml")])
    assert gpu.mesh.data * gpu.mesh.fsdp * gpu.mesh.tensor == 8


def test_overrides_and_defaults():
    cfg = load_config(
        None, ["model.path=/m", "optim.lr=3e-6", "train.output_dir=runs/x", "data.buckets=[2048, 1024]"]
    )
    assert cfg.optim.lr == 3e-6 and cfg.data.buckets == (1024, 2048)
    assert str(cfg.checkpoint_dir) == "runs/x/checkpoints" and cfg.tokenizer_path == "/m"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "config: the required key 'model' is missing (no config file: --config X.yaml)"),
        (["model.path=/m", "model.config={model_type: llama}"], "exactly one of model.path"),
        (["model.config={vocab_size: 3}", "model.tokenizer=t"], "needs a 'model_type'"),
        (["model.config={model_type: llama}"], "needs a tokenizer"),
        (["model.path=/m", "model.dtype=float8"], "model.dtype"),
        (["model.path=/m", "model.attention=flash"], "model.attention"),
        (["model.path=/m", "model.remat=attn"], "model.remat"),
        (["model.path=/m", "loss.beta=0"], "loss.beta"),
        (["model.path=/m", "optim.end_lr_ratio=2"], "optim.end_lr_ratio"),
        (["model.path=/m", "checkpoint.best_mode=median"], "checkpoint.best_mode"),
        (["model.path=/m", "mesh.fsdp=0"], "mesh"),
        (["model.path=/m", "mesh.expert=0"], "mesh"),
        (["model.path=/m", "data.batch_size=0"], "data.batch_size"),
        (["model.path=/m", "distributed.enabled=maybe"], "distributed.enabled"),
        (["model.path=/m", "loss.beta=.nan"], "loss.beta: expected a finite number, got nan"),
        (["model.path=/m", "optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),
        (["model.path=/m", "rollout.temperature=.nan"], "rollout.temperature: expected a finite number"),
        (["model.path=/m", "optim.grad_accum_steps=0"], "optim.grad_accum_steps: must be >= 1, got 0"),
        (["model.path=/m", "optim.b1=1.5"], "optim.b1: must be in [0, 1), got 1.5"),
        (["model.path=/m", "optim.b2=-0.1"], "optim.b2: must be in [0, 1)"),
        (["model.path=/m", "optim.eps=0"], "optim.eps: must be > 0"),
        (["model.path=/m", "train.peak_flops=-1"], "train.peak_flops: must be >= 0"),
        (["model.path=/m", "data.buckets=[-5,0,16]"], "data.buckets=(-5, 0, 16): row lengths must be >= 1"),
        (["model.path=/m", "distributed.num_processes=-3"], "distributed.num_processes must be >= 0"),
        (["model.path=/m", "distributed.cpu_collectives=foo"], "distributed.cpu_collectives must be gloo or"),
        (["model.path=/m", "train.steps=010"], "'010' (line 1): YAML 1.1 reads this number as octal"),
        (["model.path=/m", "optim.lr=1:30"], "'1:30' (line 1): YAML 1.1 reads this number in base 60"),
        (
            ["model.path=/m", "optim.lr=1e-5", "optim=null"],
            "override optim=null would reset optim to its defaults",
        ),
        (["model.path=/m", "optim.weight_decay=-1"], "optim.weight_decay: must be >= 0"),
        (["model.path=/m", "train.log_every=0"], "train.log_every: must be >= 1, got 0"),
        (["model.path=/m", "checkpoint.keep_last=0"], "checkpoint.keep_last: must be >= 1, got 0"),
        (
            ["model.path=/m", "eval_generation.reward.sandbox=docker"],
            "eval_generation.reward.sandbox='docker'",
        ),
        (["model.path=/m", "rollout.reward.timeout_s=-1"], "rollout.reward.timeout_s=-1.0 must be > 0"),
        (["model.path=/m", "train=5", "train.steps=3"], "override train.steps: train is 5, not a section"),
    ],
)
def test_bad_values_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_an_error_names_where_its_value_came_from(tmp_path):
    """A bad key or value is blamed on the config file only where the file holds it; one given as a
    key=value override is the command line's (each used to end "(in X.yaml)")."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model: {path: /m}\n")
    bad.write_text("model: {path: /m}\noptim: {lrr: 1}\n")
    with pytest.raises(
        ConfigError, match=re.escape("did you mean 'lr'?") + r".* \(in the key=value overrides\)$"
    ):
        load_config(good, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"loss.beta.* \(in the key=value overrides\)$"):
        load_config(good, ["loss.beta=-1"])
    with pytest.raises(ConfigError, match=re.escape(f"(in {bad})") + "$"):
        load_config(bad, ["loss.beta=0.2"])
    # a file that alone fails otherwise (it lacks the model an override gives): either may be at fault
    partial = tmp_path / "partial.yaml"
    partial.write_text("optim: {lr: 1.0e-5}\n")
    with pytest.raises(ConfigError, match=re.escape(f"(in {partial} or the key=value overrides)") + "$"):
        load_config(partial, ["model.path=/m", "optim.b1=2"])


def _settings(*overrides):
    return settings_of(load_config(None, ["model.path=/m", *overrides]))


def test_a_resume_names_what_it_changes_of_what_the_run_learns():
    """resume_changes: keys of what the run learns that differ from a checkpoint's settings; where the run
    works (folders, mesh, logging, kernels) and what the resume checks by content (data) may change."""
    cfg = lambda *o: load_config(None, ["model.path=/m", *o])  # noqa: E731
    saved = _settings("data.buckets=[1024, 2048]")
    assert json.loads(json.dumps(saved)) == saved and saved["data.buckets"] == [1024, 2048]
    assert resume_changes(saved, cfg("data.buckets=[1024, 2048]")) == []
    free = ["train.log_every=3", "model.remat=full", "mesh.fsdp=2", "checkpoint.every_steps=5",
            "data.path=/elsewhere", "model.path=/moved", "train.on_nonfinite=skip", "eval_generation.top_k=4",
            "checkpoint.allow_changes=[loss]", "lora.reference=cache"]  # fmt: skip
    assert resume_changes(saved, cfg(*free)) == []
    learns = ("loss.beta=0.5", "optim.lr=1e-5", "model.dtype=float32", "optim.grad_accum_steps=2")
    assert resume_changes(saved, cfg(*learns)) == [
        "loss.beta", "model.dtype", "optim.grad_accum_steps", "optim.lr"
    ]  # fmt: skip
    # train.steps is a decaying schedule's length; under a constant one it only says when to stop
    assert resume_changes(saved, cfg("train.steps=2000")) == ["train.steps"]
    constant = _settings("optim.schedule=constant")
    assert resume_changes(constant, cfg("optim.schedule=constant", "train.steps=2000")) == []
    # an inline model config's keys: changed, added or dropped
    tiny = ["model.path=", "model.tokenizer=/t"]
    arch = _settings(*tiny[:1], "model.tokenizer=/t", "model.config={model_type: llama, rope_theta: 1.0}")
    assert resume_changes(arch, cfg(*tiny, "model.config={model_type: llama, rope_theta: 2.0}")) == [
        "model.config.rope_theta"
    ]
    assert resume_changes(arch, cfg(*tiny, "model.config={model_type: llama}")) == ["model.config.rope_theta"]
    assert resume_changes(arch, cfg(*tiny, "model.config={model_type: llama, rope_theta: 1.0, x: 1}")) == [
        "model.config.x"
    ]
    # settings another version of copg_jax has or lacks are not compared
    older = {k: v for k, v in saved.items() if k != "loss.beta"} | {"loss.gone": 1}
    assert resume_changes(older, cfg("loss.beta=0.5")) == []
    # rollouts of an offline run, LoRA settings and train.seed of a full fine-tune do nothing: not compared
    # (a random init's seed is the reference fingerprint's to check)
    unused = ("rollout.num_prompts=3", "rollout.reward.processes=2", "lora.alpha=4", "train.seed=3")
    assert resume_changes(saved, cfg(*unused)) == []
    online = ["data.path=d.jsonl", "rollout.every_n_steps=2", "rollout.reward.fn=m:f"]
    lora = ["lora.rank=4"]
    assert resume_changes(_settings(*online), cfg(*online, "rollout.reward.processes=2")) == [
        "rollout.reward.processes"
    ]
    assert resume_changes(_settings(*online), cfg(*online, "rollout.reward.workers=4")) == []
    assert resume_changes(saved, cfg(*online)) == ["rollout.every_n_steps", "rollout.reward.fn"]
    assert resume_changes(_settings(*lora), cfg(*lora, "lora.alpha=4", "train.seed=3")) == [
        "lora.alpha", "train.seed"
    ]  # fmt: skip


def test_allow_changes_entries_must_name_a_setting():
    assert load_config(None, ["model.path=/m", "checkpoint.allow_changes=[optim, loss.beta]"])
    # a key of an inline model config that a resume drops is not among this config's, and may be allowed
    assert load_config(None, ["model.path=/m", "checkpoint.allow_changes=[model.config.rope_theta]"])
    with pytest.raises(ConfigError, match=r"checkpoint.allow_changes: 'loss.bta' names no setting"):
        load_config(None, ["model.path=/m", "checkpoint.allow_changes=[loss.bta]"])


def test_a_fresh_fraction_that_rounds_to_no_prompt_is_refused():
    online = ["model.path=/m", "data.path=d.jsonl", "rollout.every_n_steps=2", "rollout.reward.fn=m:f",
              "data.batch_size=8"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"0.0625 of data.batch_size=8 rounds to no fresh prompt.*0.125"):
        load_config(None, [*online, "rollout.fresh_fraction=0.0625"])
    assert load_config(None, [*online, "rollout.fresh_fraction=0.125"]).rollout.fresh_fraction == 0.125
    assert load_config(None, [*online, "rollout.fresh_fraction=0"]).rollout.fresh_fraction == 0
    assert load_config(None, ["model.path=/m", "rollout.fresh_fraction=0.01"])  # offline: unused


def test_greedy_rollouts_and_an_unranked_keep_best_are_named(caplog):
    """Greedy rollouts sample K identical completions (nothing trains): refused. keep_best ranking by a metric
    the run never logs kept nothing as best, unsaid: warned of."""
    from copg_jax.train import warn_unranked

    online = ["model.path=/m", "data.path=d.jsonl", "rollout.every_n_steps=1", "rollout.reward.fn=m:f"]
    with pytest.raises(
        ConfigError, match=r"rollout.temperature: 0 \(greedy\) samples 4 identical completions"
    ):
        load_config(None, [*online, "rollout.temperature=0"])
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    with caplog.at_level("WARNING", logger="copg_jax.train"):
        warn_unranked(load_config(tiny))  # evaluated: eval/loss is logged
        assert not caplog.text
        warn_unranked(load_config(tiny, ["data.eval_path="]))
    assert (
        "checkpoint.keep_best=1 ranks by eval/loss, which this run never logs (no data.eval_path)"
        in caplog.text
    )


def test_numbers_yaml_reads_in_another_base_are_refused_and_values_take_their_types(tmp_path):
    """YAML 1.1 read `every_steps: 0100` as 64 (octal) and `lr: 1:30` as 90 (base 60), silently; both are
    refused naming the line, a quoted one stays text. `enabled: on` (YAML's true) is distributed.enabled's
    "on", as the README writes it. A mapping's values take their declared type (`1e-3`, which YAML 1.1
    reads as text, is a weight)."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: /m}\ncheckpoint:\n  every_steps: 0100\n")
    with pytest.raises(ConfigError, match=r"'0100' \(line 3\): YAML 1.1 reads this number as octal"):
        load_config(path)
    path.write_text("model: {path: /m}\ndata: {prompt_col: '010'}\ndistributed: {enabled: on}\n")
    cfg = load_config(path, ["data.reward_weights={helpfulness: 1e-3, correctness: 2}"])
    assert cfg.data.prompt_col == "010" and cfg.distributed.enabled == "on"
    assert cfg.data.reward_weights == {"helpfulness": 1e-3, "correctness": 2.0}
    assert load_config(path, ["distributed.enabled=off", "train.steps=0x10"]).distributed.enabled == "off"
    assert load_config(path, ["train.steps=0x10"]).train.steps == 16
    assert load_config(path, ["optim.lr=00.5"]).optim.lr == 0.5  # YAML 1.1's decimal float
    with pytest.raises(ConfigError, match=r"merge keys are not allowed"):
        path.write_text("model: {path: /m}\ntrain: {<<: {steps: 3}}\n")
        load_config(path)


def test_settings_a_run_ignores_or_that_train_otherwise_are_named(caplog):
    """Settings moved off their defaults that the run never reads (LoRA options of a full fine-tune, rollout
    options offline, evaluation without its data, a constant schedule's end ratio, a misspelt model.config
    key) and settings that train otherwise than they read (a warmup
    past the run's end, lr 0): each named in one warning. The shipped configs name none."""
    from copg_jax.models.hub import misspelt_config_keys
    from copg_jax.train import warn_unread

    for path in CONFIGS:
        assert load_config(path).unread_settings() == [], path
    cfg = load_config(None, [
        "model.path=/m", "lora.alpha=32", "rollout.buffer_size=4",
        "train.eval_every=5", "optim.schedule=constant", "optim.end_lr_ratio=0.5", "optim.warmup_steps=10",
        "train.steps=3", "optim.lr=0", "eval_generation.num_prompts=7", "optim.bf16_compensation=false",
    ])  # fmt: skip
    assert cfg.unread_settings() == [
        "lora.alpha (not read: lora.rank=0, a full fine-tune)",
        "rollout.buffer_size (not read: rollout.every_n_steps=0, offline)",
        "eval_generation.num_prompts (not read: no eval_generation.reward)",
        "train.eval_every (not read: no data.eval_path)",
        "optim.end_lr_ratio (not read: optim.schedule=constant)",
        "optim.warmup_steps=10 (>= train.steps=3: the learning rate never reaches optim.lr)",
        "optim.lr=0 (nothing trains)",
        "optim.bf16_compensation (not read: no bfloat16 weights are trained)",
    ]
    config = {"model_type": "llama", "num_hidden_layer": 4, "tie_word_embedding": True, "rope_theta": 1.0}
    assert misspelt_config_keys(config) == [
        "num_hidden_layer (did you mean num_hidden_layers?)",
        "tie_word_embedding (did you mean tie_word_embeddings?)",
    ]
    assert misspelt_config_keys({"model_type": "gpt2", "n_layers": 2, "n_layer": 2, "n_embd": 8}) == []
    assert misspelt_config_keys({"model_type": "gpt2", "n_layers": 2}) == ["n_layers (did you mean n_layer?)"]
    inline = load_config(
        None, ["model.tokenizer=/t", "model.config={model_type: llama, num_hidden_layer: 4}"]
    )
    with caplog.at_level("WARNING", logger="copg_jax.train"):
        warn_unread(inline)
    assert "model.config.num_hidden_layer (did you mean num_hidden_layers?)" in caplog.text


def test_a_model_config_lacking_a_key_and_a_learned_position_table_too_short_are_named():
    """An inline config without a size its family needs ended in a KeyError traceback; data lengths past a
    learned position table (GPT-2's n_positions) trained NaN log-probs reported as non-finite reference
    log-probs."""
    from copg_jax.models import ModelConfig
    from copg_jax.train import check_positions, model_config

    with pytest.raises(ValueError, match="llama: the model config lacks 'num_attention_heads', which this"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 207, "hidden_size": 8})
    gpt2 = (
        "model.config={model_type: gpt2, vocab_size: 64, n_embd: 8, n_layer: 1, n_head: 2, n_positions: 12}"
    )
    cfg = load_config(None, ["model.tokenizer=/t", gpt2, "data.max_prompt_length=8"])
    with pytest.raises(
        ValueError, match=r"max_completion_length = 520 positions, more than the 12 the model"
    ):
        check_positions(cfg, model_config(cfg))
    fits = ["model.tokenizer=/t", gpt2, "data.max_prompt_length=4", "data.max_completion_length=8"]
    short = load_config(None, fits)
    check_positions(short, model_config(short))
    sampled = ["eval_generation.reward.fn=m:f", "data.eval_path=e.jsonl", "eval_generation.max_new_tokens=9"]
    evaluated = load_config(None, [*fits, *sampled])
    with pytest.raises(
        ValueError, match=r"max_prompt_length \+ eval_generation.max_new_tokens = 13 positions"
    ):
        check_positions(evaluated, model_config(evaluated))
