"""Markdown tables of one `benchmarks/gpu_run.sh` call: `python benchmarks/device_report.py OUT_DIR`.

Reads attention.json, grid.json and trl.jsonl (whichever exist) and prints the
tables benchmarks/RESULTS.md quotes: attention checks and timings, train/forward throughput and MFU per row
length and layout, and CoPG beside TRL's DPOTrainer (tokens/s at equal pairs, prompts/s for K = 4
completions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hlo_checks import describe


def load(path: Path):
    if not path.exists():
        return None
    if path.suffix == ".jsonl":
        rows = {}
        for line in path.read_text().splitlines():
            name, _, payload = line.partition(" ")
            rows[name] = json.loads(payload)
        return rows
    return json.loads(path.read_text())


def attention_tables(result: dict) -> list[str]:
    lines = ["### Attention backends (checked against xla, then timed alone)", ""]
    if result["checks"]:
        lines += [
            "| backend | layout | T | soft cap | ok | out | dq | dk | dv |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result["checks"]:
            errors = " | ".join(f"{c[k]:.1e}" if k in c else "-" for k in ("out", "dq", "dk", "dv"))
            note = "" if "error" not in c else f" ({c['error'][:80]})"
            ok = "yes" if c["ok"] else "NO" + note
            cap = "-" if c.get("softcap") is None else f"{c['softcap']:g}"
            lines.append(f"| {c['backend']} | {c['layout']} | {c['length']} | {cap} | {ok} | {errors} |")
        lines.append("")
    lines += [
        "| backend | layout | T | forward ms | fwd+bwd ms | TFLOP/s (fwd+bwd) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['backend']} | {r['layout']} | {r['length']} | failed: {r['error'][:80]} | | |"
            )
        else:
            lines.append(
                f"| {r['backend']} | {r['layout']} | {r['length']} | {r['forward_s'] * 1e3:.2f} | "
                f"{r['train_s'] * 1e3:.2f} | {r['tflops_per_s']:.1f} |"
            )
    return lines + [""]


def step_table(title: str, result: dict) -> list[str]:
    lines = [
        f"### {title}",
        "",
        f"Device {result['device']}; MFU against {result['peak_flops'] / 1e12:.4g} TFLOP/s (datasheet) and "
        f"{result['measured'] / 1e12:.4g} TFLOP/s (measured matmul).",
        "",
        "| mode | layout | P x K x T | rows | remat | attention | step s | tokens/s | prompts/s | MFU "
        "| MFU (measured) | memory GiB | [T, T] buffers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mode = f"{r['mode']} ({r['name']})" if r.get("name") else r["mode"]
        head = f"| {mode} | {r['layout']} | {r.get('shape', '')} | {r.get('rows', '')} "
        head += f"| {r.get('remat', '')} | {r.get('attention', '')} "
        if "error" in r:
            lines.append(head + f"| {r['error'][:100]} | | | | | | |")
        else:
            square = describe(r["square"], most=2) if "square" in r else "-"
            lines.append(
                head
                + f"| {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['prompts_per_s']:.2f} "
                + f"| {r['mfu']:.1%} "
                f"| {r['mfu_measured']:.1%} | {r['memory_gib']:.1f} | {square} |"
            )
    return lines + [""]


def trl_table(copg: dict, trl: dict) -> list[str]:
    """CoPG's named grid cases (pairs_512, pairs_2048, k4) beside TRL's runs of the same names."""
    lines = [
        "### CoPG beside TRL 1.16 DPOTrainer (same GPU, same call, same model shape)",
        "",
        "| comparison | CoPG | TRL DPO | ratio |",
        "|---|---|---|---|",
    ]
    for name in ("pairs_512", "pairs_2048"):
        ours, theirs = copg.get(name, {}), trl.get(name, {})
        a, b = ours.get("tokens_per_s"), theirs.get("tokens_per_s")
        ratio = f"{a / b:.2f}x" if a and b else "-"
        fmt = lambda x, r: f"{x:.0f} tokens/s" if x else r.get("error", "missing")  # noqa: E731
        length = theirs.get("seq_len") or ours.get("shape", "?").split("x")[-1]
        pairs_label = f"{theirs.get('pairs', '?')} pairs, T = {length}"
        lines.append(f"| {pairs_label} | {fmt(a, ours)} | {fmt(b, theirs)} | {ratio} |")
    ours, theirs = copg.get("k4", {}), trl.get("k4", {})
    a = ours.get("prompts_per_s")
    b = (
        theirs.get("pairs_per_s") and theirs["pairs_per_s"] / 6
    )  # DPO learns 6 pairs of 4 completions per prompt
    ratio = f"{a / b:.2f}x" if a and b else "-"
    lines.append(
        f"| K = 4 completions per prompt (CoPG: shared prefix, 4 sequences; DPO: 6 pairs = 12 sequences) | "
        f"{f'{a:.2f} prompts/s' if a else ours.get('error', 'missing')} | "
        f"{f'{b:.2f} prompts/s' if b else theirs.get('error', 'missing')} | {ratio} |"
    )
    return lines + [""]


def main() -> None:
    out = Path(sys.argv[1])
    lines = ["## Device run", ""]
    if (attention := load(out / "attention.json")) is not None:
        lines += attention_tables(attention)
    grid = load(out / "grid.json")
    if grid is not None:
        lines += step_table("Train step and reference forward (named cases: CoPG on TRL's shapes)", grid)
    if (trl := load(out / "trl.jsonl")) is not None:
        lines += trl_table({r["name"]: r for r in (grid or {}).get("rows", []) if r.get("name")}, trl)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
