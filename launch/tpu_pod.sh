#!/usr/bin/env bash
# Runs one copg_jax command on every worker of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE [PROJECT] -- COMMAND [ARGS...]
#   e.g. launch/tpu_pod.sh my-v5e-256 us-west4-a -- copg train --config configs/llama3_8b_tpu_v5e_256.yaml
#
# The workers' internal IPs come from `gcloud compute tpus tpu-vm describe` (in worker order: gcloud's
# --worker=I is the I-th). Worker I runs the command with COPG_COORDINATOR_ADDRESS=<worker 0's IP>:PORT,
# COPG_NUM_PROCESSES=<workers> and COPG_PROCESS_ID=I, read by copg_jax.distributed.maybe_initialize_distributed
# (with all three set, JAX's own TPU detection is skipped: these are the settings). One slice (no multislice).
# Settings (environment):
#   COPG_PORT       coordinator port on worker 0 (default 8476, JAX's Cloud TPU default)
#   COPG_REPO_DIR   folder holding the repository on every worker (default ~/copg_jax); the command runs there
#   COPG_VENV       virtualenv to activate on every worker (default $COPG_REPO_DIR/.venv, skipped if missing)
#   COPG_SYNC=1     first copy this checkout to every worker (gcloud compute tpus tpu-vm scp --worker=all)
# One `gcloud ... ssh --worker=I` runs per worker, its output prefixed with [worker I]; when one fails (or on
# Ctrl-C), the others are stopped and the script exits with its status. Stopping a local ssh leaves its remote
# command running, so every worker's processes carry COPG_RUN_TAG=<a tag of this launch> in their environment
# and one `ssh --worker=all` runs launch/stop_tagged.sh there: SIGTERM, then SIGKILL after COPG_KILL_GRACE_S
# seconds (default 10) for those still running (a hung process would otherwise hold the TPU).
# --dry-run asks gcloud only for the worker list, then prints each worker's settings and command line
# (`process I on IP: VAR=VALUE ... -- COMMAND`, shell-quoted) and the gcloud commands (`run: ...`), and runs
# nothing.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE [PROJECT] -- COMMAND [ARGS...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
project_args=()
if [[ "$1" != "--" ]]; then
  project_args=(--project "$1")
  shift
fi
if [[ "$1" != "--" ]]; then
  echo "expected -- before the command" >&2
  exit 2
fi
shift

repo=${COPG_REPO_DIR:-'~/copg_jax'}
venv=${COPG_VENV:-"$repo/.venv"}
port=${COPG_PORT:-8476}
grace_s=${COPG_KILL_GRACE_S:-10}
tag="copg-$(date +%Y%m%d%H%M%S)-$$-$RANDOM"
gcloud_tpu=(gcloud compute tpus tpu-vm "${project_args[@]}")

mapfile -t ips < <("${gcloud_tpu[@]}" describe "$tpu" --zone "$zone" \
  --flatten="networkEndpoints[]" --format="value(networkEndpoints.ipAddress)")
if ((${#ips[@]} == 0)); then
  echo "tpu_pod: gcloud lists no workers for TPU $tpu in zone $zone" >&2
  exit 1
fi
num=${#ips[@]}

show() {  # prints a command line, shell-quoted
  printf 'run:'
  printf ' %q' "$@"
  printf '\n'
}

if [[ "${COPG_SYNC:-0}" == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  sync=("${gcloud_tpu[@]}" scp --zone "$zone" --worker=all --recurse "$here" "$tpu:$repo")
  if ((dry_run)); then show "${sync[@]}"; else "${sync[@]}"; fi
fi

pids=()
finished=0
stop=("${gcloud_tpu[@]}" ssh "$tpu" --zone "$zone" --worker=all
  --command "bash $repo/launch/stop_tagged.sh $tag $grace_s")
cleanup() {
  ((${#pids[@]})) || return 0
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  if ((!finished)); then
    echo "tpu_pod: stopping run $tag on every worker" >&2
    "${stop[@]}" || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf -v quoted '%q ' "$@"
for ((i = 0; i < num; i++)); do
  settings=(COPG_COORDINATOR_ADDRESS="${ips[0]}:$port" COPG_NUM_PROCESSES="$num" COPG_PROCESS_ID="$i"
    COPG_RUN_TAG="$tag")
  remote="cd $repo && if [ -f $venv/bin/activate ]; then . $venv/bin/activate; fi && env ${settings[*]} $quoted"
  ssh_cmd=("${gcloud_tpu[@]}" ssh "$tpu" --zone "$zone" --worker="$i" --command "$remote")
  if ((dry_run)); then
    printf 'process %d on %s:' "$i" "${ips[i]}"
    printf ' %q' "${settings[@]}" -- "$@"
    printf '\n'
    show "${ssh_cmd[@]}"
    ((i == num - 1)) && printf 'stop (on failure or Ctrl-C): ' && show "${stop[@]}"
    continue
  fi
  "${ssh_cmd[@]}" > >(sed -u "s/^/[worker $i] /") 2>&1 &
  pids+=($!)
done

for ((n = 0; n < ${#pids[@]}; n++)); do
  wait -n || {
    status=$?
    echo "tpu_pod: a worker failed with status $status; stopping the others" >&2
    exit "$status"
  }
done
finished=1
