"""The run Config: every shipped config loads strictly; dump/load round trip; section checks."""

import re
from pathlib import Path

import pytest

from copg_jax.config import ConfigError
from copg_jax.run_config import Config, dump_config, load_config

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
        ([], "missing 1 required positional argument: 'model'"),
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
        (["model.path=/m", "optim.eps=-1"], "optim.eps: must be >= 0"),
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
