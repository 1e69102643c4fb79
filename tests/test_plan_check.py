"""benchmarks/plan_check.py on a tiny Llama: its per-device figures are the hand-computed shard sizes, XLA's
memory analysis is per device, a mesh that divides no weight dim is reported as replicating them, and a row
too short for a worst-case item is refused before compiling."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # as when run as a script: its sibling modules import
_spec = importlib.util.spec_from_file_location("plan_check", REPO / "benchmarks" / "plan_check.py")
plan_check = sys.modules["plan_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_check)

L, D, F, H, KV, DH, V = 2, 32, 64, 4, 2, 8, 256  # layers, width, mlp, heads, kv heads, head dim, vocab
PROMPT, COMPLETION, K, B = 8, 8, 4, 8


def _config(tmp_path: Path, mesh: tuple[int, int, int], hidden: int = D, heads: int = H, **data) -> Path:
    model = {
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": hidden,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": heads,
        "num_key_value_heads": KV,
        "max_position_embeddings": 64,
    }
    cfg = {
        "model": {"config": model, "tokenizer": "unused", "dtype": "float32", "remat": "full"},
        "data": {
            "max_prompt_length": PROMPT,
            "max_completion_length": COMPLETION,
            "max_completions": K,
            "batch_size": B,
            "pad_multiple": 16,
            **data,
        },
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)),
        "train": {"steps": 10},
        "loss": {"length_average": True},  # every batch input is used (jit drops unused ones from XLA's args)
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_script_reports_hand_computed_shards(tmp_path):
    """The script end to end (its subprocess, 8 fake devices) on a (data 2, fsdp 2, tensor 2) mesh over 8
    processes of 1 device, as with one process per GPU: each tensor pair spans two processes, which feed
    their batch shard the same prompts, so the global batch is what one process per pair would build."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "plan_check.py"), str(_config(tmp_path, (2, 2, 2)))]
    cmd += ["--processes", "8"]
    run = subprocess.run(
        [*cmd, "--hbm-gib", "1", "--json", str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (report,) = json.loads(out.read_text())
    per = report["per_device"]
    # every weight matrix has one dim on fsdp (embed) and one on tensor (vocab / heads / kv heads / mlp), both
    # divisible by 2; the 2L + 1 norm scales are replicated. float32: 4 bytes.
    matrices = L * (D * H * DH + 2 * D * KV * DH + H * DH * D + 3 * D * F) + 2 * V * D
    norms = (2 * L + 1) * D
    assert per["params"] == 4 * (matrices // 4 + norms)
    assert per["optimizer"] == 2 * per["params"] + 2 * 4  # Adam's mu and nu like the params; 2 int32 counts
    # worst case, padded layout: B*K rows of P+C = 16 tokens, split over data x fsdp = 4 -> 8 rows per device
    assert report["batch"] == {
        "microbatches": 1,
        "prompts": B,
        "completions": K,
        "layout": "padded",
        "rows": B * K,
        "row_length": 16,
        "rows_per_device": 8,
    }
    tokens = 6 * 8 * 16 * 4  # six int32 [rows, T] arrays
    per_prompt = (B // 4) * K * (4 + 1 + 4 + 4)  # rewards f32, mask bool, ref_logps f32, lengths i32
    assert per["batch"] == tokens + per_prompt
    # XLA's memory analysis is per device: its arguments are exactly this device's shards (state + batch,
    # plus the int32 step and skipped-update counters), and the donated state aliases its output
    state = per["params"] + per["optimizer"] + 4 + 4
    assert per["xla_argument"] == state + per["batch"]
    assert per["xla_alias"] == state
    assert per["total"] == per["xla_argument"] + per["xla_output"] - per["xla_alias"] + per["xla_temp"]
    assert report["replicated"] == {"fraction": pytest.approx(norms / (matrices + norms)), "dropped": []}
    assert report["fits"] and report["advice"] == []
    assert "=> fits" in run.stdout
    assert f"replicated on every device: {norms / (matrices + norms):.4%}" in run.stdout


def test_mesh_dividing_no_weight_dim_is_reported_replicated(tmp_path):
    """fsdp=8 does not divide a width of 36: every matrix is whole on every device, and the report says so."""
    cfg = plan_check.plan_config(str(_config(tmp_path, (1, 8, 1), hidden=36, heads=2)))  # head dim 18
    report = plan_check.check(cfg, plan_check.Chip("test", 2**30, 1), num_processes=1)
    matrices = L * (36 * 2 * 18 + 2 * 36 * KV * 18 + 2 * 18 * 36 + 3 * 36 * F) + 2 * V * 36
    assert report["per_device"]["params"] == 4 * (matrices + (2 * L + 1) * 36)
    assert report["replicated"]["fraction"] == 1.0
    assert sorted(report["replicated"]["dropped"]) == sorted(
        ["embed", "lm_head.kernel"]
        + [f"layers.{i}.{m}.kernel" for i in range(L) for m in ("attn.q", "attn.k", "attn.v", "attn.o")]
        + [f"layers.{i}.mlp.{m}.kernel" for i in range(L) for m in ("gate", "up", "down")]
    )
    assert any("100.0% of the parameters are replicated" in line for line in report["advice"])


def test_lora_state_is_the_adapters_and_the_base_is_frozen_beside_it(tmp_path):
    """lora.rank=2 on q_proj, v_proj, data=8 (everything whole on each device): the state is the adapters and
    their moments, the base a separate argument, and XLA's arguments are exactly those plus the batch but its
    reference log-probs."""
    overrides = ["lora.rank=2", "lora.target_modules=[q_proj,v_proj]"]
    cfg = plan_check.plan_config(str(_config(tmp_path, (8, 1, 1))), overrides=overrides)
    per = plan_check.check(cfg, plan_check.Chip("test", 2**30, 1), num_processes=1)["per_device"]
    r = 2
    assert per["params"] == 4 * L * (D * r + r * H * DH + D * r + r * KV * DH)
    matrices = L * (D * H * DH + 2 * D * KV * DH + H * DH * D + 3 * D * F) + 2 * V * D
    assert per["frozen"] == 4 * (matrices + (2 * L + 1) * D)
    assert per["optimizer"] == 2 * per["params"] + 2 * 4
    state = per["params"] + per["optimizer"] + 4 + 4
    ref_logps = (B // 8) * K * 4  # f32 per prompt: unread (the reference is the base in the step), so dropped
    assert per["xla_argument"] == state + per["frozen"] + per["batch"] - ref_logps
    assert per["xla_alias"] == state  # the base is not donated


def test_worst_case_item_longer_than_the_row_is_refused(tmp_path):
    # shared prefix: one prompt + its K completions in a row: 8 - 1 + 4 * (1 + 8) = 43 tokens > 32
    cfg = plan_check.plan_config(str(_config(tmp_path, (1, 8, 1), layout="shared_prefix", row_length=32)))
    with pytest.raises(ValueError, match=r"data.row_length=32 .* 43 tokens.* >= 43 \(48"):
        plan_check.check(cfg, plan_check.Chip("test", 2**30, 1), num_processes=1)


def test_cpu_verdict_decides_only_the_clear_cases():
    per = {"params": 1, "optimizer": 2, "total": 10}  # state alone (params, grads, optimizer): 4
    assert plan_check.verdict(per, hbm=12, on_cpu=True) is True  # even XLA:CPU's total fits
    assert plan_check.verdict(per, hbm=6, on_cpu=True) is None  # XLA:CPU's temporaries cannot decide
    assert plan_check.verdict(per, hbm=3, on_cpu=True) is False  # the exact state shards do not fit
    assert plan_check.verdict(per, hbm=6, on_cpu=False) is False  # an accelerator compiler's total decides


@pytest.mark.parametrize("chip, backend", [("h100", "gpu"), ("tpu-v5e", "tpu")])
def test_an_undecided_verdict_names_the_compiler_of_the_target(chip, backend, capsys):
    """XLA:CPU cannot decide a near fit: the report says which accelerator compiler can (--backend gpu for a
    GPU target, tpu for a TPU)."""
    gib = plan_check.GIB
    report = {
        "per_device": {"params": gib, "optimizer": 2 * gib, "total": 60 * gib},
        "batch": {"microbatches": 1, "prompts": 8, "completions": 4, "rows": 32, "layout": "padded",
                  "row_length": 1024, "rows_per_device": 4},
        "hbm_bytes": plan_check.CHIPS[chip].hbm_bytes, "chip": plan_check.CHIPS[chip].name,
        "mesh": {"data": 8}, "model": "m", "compiled_for": "cpu", "processes": 8, "fits": None,
        "replicated": {"fraction": 0.0, "dropped": []}, "advice": [], "compile_s": 1.0, "peak_rss_bytes": gib,
    }  # fmt: skip
    plan_check.print_report("config.yaml", report)
    assert f"UNDECIDED on XLA:CPU (run --backend {backend})" in capsys.readouterr().out
