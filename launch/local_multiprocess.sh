#!/usr/bin/env bash
# Runs N processes of one copg_jax job on this machine (CPU), joined through a coordinator on 127.0.0.1.
#
#   launch/local_multiprocess.sh [--dry-run] N COMMAND [ARGS...]
#   e.g. launch/local_multiprocess.sh 2 copg train --config configs/tiny_cpu.yaml
#
# Each process gets COPG_COORDINATOR_ADDRESS / COPG_NUM_PROCESSES / COPG_PROCESS_ID (read by
# copg_jax.distributed.maybe_initialize_distributed) and JAX_PLATFORMS=cpu. Settings (environment):
#   COPG_PORT            coordinator port (default: a free port picked now)
#   COPG_LOCAL_DEVICES   CPU devices per process (default 1; sets --xla_force_host_platform_device_count)
#   COPG_TIMEOUT_S       kill everything after this many seconds (default 0 = no limit)
#   COPG_KILL_GRACE_S    seconds between the SIGTERM that stops the processes and the SIGKILL that ends those
#                        still running (default 10). A multi-process JAX process takes SIGTERM as a preemption
#                        notice: a healthy run saves at its next step; a hung one never ends without SIGKILL.
#   COPG_LOG_DIR         write process i's output to $COPG_LOG_DIR/process_i.log (default: prefixed to stdout)
# Every process gets COPG_RUN_TAG=local-PID-RANDOM too, a fresh tag per launch printed at the start: they, and
# whatever they start, are stopped by it and by their process groups (launch/stop_tagged.sh, which also stops
# the run from another shell by its tag). If any process fails, the others are killed and the script exits with the first failure's status.
# --dry-run prints each process's settings and command line (`process I on HOST: VAR=VALUE ... -- COMMAND`,
# shell-quoted) and the command that would start it (`run: ...`), and runs nothing.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
num=$1
shift
port=${COPG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${COPG_LOCAL_DEVICES:-1}
timeout_s=${COPG_TIMEOUT_S:-0}
grace_s=${COPG_KILL_GRACE_S:-10}

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")  # launch/, also when this script is a link
# Every process of this run carries the tag in its environment and leads a process group of its own (setsid):
# stop_tagged.sh finds them all by both (the commands and whatever they started, in a session of its own or
# with an environment of its own), SIGTERM then SIGKILL after grace_s, as tpu_pod.sh stops a pod's workers.
tag=local-$$-$RANDOM$RANDOM
pids=()
cleanup() {
  ((${#pids[@]})) || return 0
  "$here/stop_tagged.sh" "$tag" "$grace_s" "${pids[@]}"  # each process leads a group of its own (setsid)
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  env_args=(
    COPG_COORDINATOR_ADDRESS="127.0.0.1:$port"
    COPG_NUM_PROCESSES="$num"
    COPG_PROCESS_ID="$i"
    COPG_RUN_TAG="$tag"
    JAX_PLATFORMS=cpu
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
  )
  if ((dry_run)); then
    printf 'process %d on 127.0.0.1:' "$i"
    printf ' %q' "${env_args[@]}" -- "$@"
    printf '\nrun: setsid env'
    printf ' %q' "${env_args[@]}" "$@"
    printf '\n'
    continue
  fi
  if [[ -n "${COPG_LOG_DIR:-}" ]]; then
    mkdir -p "$COPG_LOG_DIR"
    setsid env "${env_args[@]}" "$@" >"$COPG_LOG_DIR/process_$i.log" 2>&1 &
  else
    setsid env "${env_args[@]}" bash -c '"$@" 2>&1 | sed -u "s/^/[process '"$i"'] /"; exit "${PIPESTATUS[0]}"' _ "$@" &
  fi
  pids+=($!)
done
if ((dry_run)); then
  exit 0
fi
echo "local_multiprocess: $num processes, run tag $tag (launch/stop_tagged.sh $tag stops them)" >&2

start=$SECONDS
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      wait "$pid" && continue || status=$?
      echo "local_multiprocess: a process failed with status $status; stopping the others" >&2
      exit "$status"
    fi
  done
  running=("${still[@]}")
  if [[ "$timeout_s" != 0 ]] && ((SECONDS - start > timeout_s)); then
    echo "local_multiprocess: timeout after ${timeout_s}s; stopping all" >&2
    exit 124
  fi
  sleep 0.2
done
exit 0
