"""`copg <subcommand> [args]`: a table of subcommands, each a lazily imported `module:function(argv) -> int`.

Add a subcommand by adding a row to COMMANDS. Config-driven subcommands share `parse_config_args`:
`--config FILE.yaml` plus any number of `key.sub=value` overrides. The top floor: nothing imports this
module; the subcommands' modules are imported only when that subcommand runs (start-up time, not cycles).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence

from copg_jax.config import ConfigError
from copg_jax.run_config import load_config

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("copg_jax.cli:train_command", "train (or resume) a policy from a YAML config"),
    "train-rm": ("copg_jax.cli:train_rm_command", "train (or resume) a Bradley-Terry reward model"),
    "eval": ("copg_jax.cli:eval_command", "evaluation metrics of a checkpoint or exported model"),
    "export": ("copg_jax.cli:export_command", "write a run's policy as a Hugging Face folder"),
    "precompute-ref": ("copg_jax.cli:precompute_ref_command", "cache reference log-probs of the data"),
    "score": ("copg_jax.rewards.score:main", "score completions with a reward function / model / tests"),
    "generate": ("copg_jax.generate:main", "sample K completions per prompt from a policy"),
    "demo": ("copg_jax.experiments.demo:main", "CPU demo: CoPG vs IPO/DPO on a tiny sorting task"),
    "paper": ("copg_jax.experiments.paper:main", "the paper's Sec. 6 protocol at CPU scale (beta sweeps)"),
}


def parse_config_args(
    argv: Sequence[str], prog: str, description: str, extra=None, forced: Sequence[str] = ()
):
    """(args, Config) from `--config FILE key=value ...` (then the `forced` overrides, which a subcommand
    implies); ConfigError names any bad key or value."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied in order")
    parser.add_argument(
        "--on-bad-row",
        choices=("error", "skip"),
        help="data.on_bad_row: stop at the first invalid data row (naming it), or skip and count them",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_intermixed_args(list(argv))  # overrides after an option too
    for item in args.overrides:
        if item.split("=", 1)[0].strip() == "config":
            parser.error(f"{item!r}: give the config file as --config FILE")
    bad_rows = [f"data.on_bad_row={args.on_bad_row}"] if args.on_bad_row else []
    overrides = [*args.overrides, *bad_rows, *forced]
    return args, load_config(args.config, overrides)


def train_command(argv: Sequence[str], forced: Sequence[str] = (), prog="copg train", doc=None) -> int:
    """`copg train --config X.yaml [key=value ...]`: trains, resuming from `train.output_dir` if possible."""
    from copg_jax.train import train

    def extra(p):
        p.add_argument(
            "--stop-after",
            type=int,
            help="stop (with a checkpoint) at this update of the run (resumed ones count)",
        )

    args, cfg = parse_config_args(argv, prog, doc or train_command.__doc__, extra, forced)
    result = train(cfg, stop_after=args.stop_after)
    state = "interrupted" if result.interrupted else "finished"
    print(f"{state} at step {result.step}; run folder {result.run_dir}, checkpoints {result.checkpoint_dir}")
    if result.signal is None:  # finished, or stopped at --stop-after
        return 0
    # stopped by a signal, unfinished: not a success to a scheduler (a Kubernetes Job completed, never
    # resumed), but the status of the signal, as a shell reports one that ended a command
    return 128 + (signal.SIGINT if result.signal == "SIGINT" else signal.SIGTERM)


def train_rm_command(argv: Sequence[str]) -> int:
    """`copg train-rm --config X.yaml [key=value ...]`: `copg train` with train.objective=reward_model and
    train.export_on_finish=true: a Bradley-Terry reward model on the data's pairs (preference rows),
    written to `<train.output_dir>/export` as an HF *ForSequenceClassification folder (for `copg score
    --reward-model`)."""
    forced = ("train.objective=reward_model", "train.export_on_finish=true")
    return train_command(argv, forced, "copg train-rm", train_rm_command.__doc__)


def precompute_ref_command(argv: Sequence[str]) -> int:
    """`copg precompute-ref --config X.yaml [key=value ...]`: (re)computes the reference caches of the data
    (`copg train` also computes missing or stale ones itself)."""
    from copg_jax.train import precompute_reference

    _, cfg = parse_config_args(argv, "copg precompute-ref", precompute_ref_command.__doc__)
    for path in precompute_reference(cfg):
        print(path)
    return 0


def eval_command(argv: Sequence[str]) -> int:
    """`copg eval --config X.yaml [--checkpoint RUN_DIR|CKPT_DIR|HF_DIR] [--step N]`: eval metrics as JSON."""
    from copg_jax.train import evaluate_checkpoint

    def extra(p):
        p.add_argument("--checkpoint", default="", help="run folder, checkpoint folder or exported HF folder")
        p.add_argument("--step", type=int, help="checkpoint step (default: the latest good one)")

    args, cfg = parse_config_args(argv, "copg eval", eval_command.__doc__, extra)
    metrics = evaluate_checkpoint(cfg, args.checkpoint, args.step)
    print(metrics_json(metrics))
    return 0


def metrics_json(metrics: dict) -> str:
    """`metrics` as JSON, a non-finite value (a metric of no value: a reward that failed on every sample) as
    null: JSON has no NaN, and Python's NaN token is refused by other readers."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    return json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)


def export_command(argv: Sequence[str]) -> int:
    """`copg export --run RUN_DIR --out DIR [--step N]`: the run's policy as an HF folder (+ tokenizer)."""
    from copg_jax.train import export_run

    parser = argparse.ArgumentParser(prog="copg export", description=export_command.__doc__)
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest good one)")
    args = parser.parse_args(list(argv))
    out, step = export_run(args.run, args.out, args.step)
    print(f"exported step {step} to {out}")
    return 0


def _usage() -> str:
    rows = "\n".join(f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: copg <subcommand> [args]\n\nsubcommands:\n{rows}"


# seconds a failed command waits for its own background threads (an orbax save stuck after a failed write)
THREAD_GRACE_S = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `copg` script (`argv` None: this process is the command's, `sys.argv` its
    arguments)."""
    owns_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"copg: unknown subcommand {name!r}; valid subcommands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("copg_jax").setLevel(logging.INFO)  # ours at INFO; absl/orbax chatter stays at WARNING
    module, function = COMMANDS[name][0].split(":")
    try:
        return int(getattr(importlib.import_module(module), function)(rest) or 0)
    except ConfigError as e:
        print(f"copg {name}: config error: {e}", file=sys.stderr)
        return _leave_run(2, owns_process)
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad input (a data row, a file, a cache, a checkpoint, a run folder in use: CheckpointError,
        # RunFolderLocked and SandboxUnavailable are ValueErrors) or a non-finite stop (NonFiniteError, a
        # FloatingPointError): its message names it, the traceback would only bury that. COPG_TRACEBACK=1
        # shows it for debugging. A peer lost inside a collective may come as a ValueError too (gloo's, from
        # multihost_utils in orbax's barriers): said as one.
        if os.environ.get("COPG_TRACEBACK"):
            traceback.print_exc()
        elif _distributed() and any(sign in str(e) for sign in PEER_LOST):
            print(_collective_failed(name, e), file=sys.stderr)
        else:
            print(f"copg {name}: error: {e}", file=sys.stderr)
        return _leave_run(1, owns_process)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops with a checkpoint itself)
        if os.environ.get("COPG_TRACEBACK"):
            traceback.print_exc()
        else:
            print(f"copg {name}: interrupted (Ctrl-C)", file=sys.stderr)
        if _distributed():
            return _leave_run(130, owns_process)
        if owns_process:  # die of SIGINT, as a shell loop around the command expects to see it
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise
    except BaseException as e:
        if not _distributed():
            raise
        sharding, quiet = sys.modules.get("copg_jax.sharding"), not os.environ.get("COPG_TRACEBACK")
        if quiet and sharding is not None and isinstance(e, sharding.MainProcessError):
            print(f"copg {name}: error: {e}", file=sys.stderr)  # process 0's log has the traceback
        elif quiet and isinstance(e, sys.modules["jax"].errors.JaxRuntimeError):
            print(_collective_failed(name, e), file=sys.stderr)
        else:
            traceback.print_exc()
        return _leave_run(1, owns_process)


# what a collective's error says when a peer process has gone (gloo's words)
PEER_LOST = ("Gloo", "Connection reset by peer", "Connection closed by peer")


def _collective_failed(name: str, e: BaseException) -> str:
    """The one line of a failed collective: most likely another process stopped, and its log says why."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (
        f"copg {name}: error: a collective failed, most likely because another process of the run stopped "
        f"(its log says why): {first}"
    )


def _distributed() -> bool:
    """Whether this process has joined a multi-process run (jax.distributed); False when jax was never
    imported (a command that failed before it, or one that needs no jax)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def _leave_run(status: int, owns_process: bool) -> int:
    """`status`, returned; a failed command exits with it at once instead when Python's own exit would hang:
    - in a multi-process run, always: Python's exit would first wait in JAX's shutdown barrier for every
      other process, while they wait for this one in their next collective (a bad row only one host's copy
      of the data has, a file only one host cannot read): the whole job hung, never exiting, so that
      neither the launcher nor `srun --kill-on-bad-exit` could stop it. Exiting at once, the others' next
      collective fails (or the coordination service, missing this process's heartbeat, stops them) and
      each leaves the same way;
    - in a process of its own (`owns_process`), when background threads outlive the error by
      THREAD_GRACE_S (a save's threads stuck after a failed write kept the process from ever exiting).
    """
    if not status:
        return status
    stuck = [] if _distributed() or not owns_process else _threads_left(THREAD_GRACE_S)
    if stuck:
        print(
            f"copg: {len(stuck)} background thread(s) ({', '.join(t.name for t in stuck[:3])}) still running "
            f"{THREAD_GRACE_S:g}s after the error; exiting without them",
            file=sys.stderr,
        )
    if stuck or _distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


def _threads_left(grace_s: float) -> list[threading.Thread]:
    """The threads Python's exit would wait for (not daemons) still running after waiting up to `grace_s`
    seconds for them."""
    deadline = time.monotonic() + grace_s
    waiting = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in waiting:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in waiting if t.is_alive()]


if __name__ == "__main__":
    sys.exit(main())
