#!/usr/bin/env bash
# Runs one copg_jax command on every worker of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- COMMAND [ARGS...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a -- copg train --config configs/llama3_8b_tpu_v5e_256.yaml
#
# On Cloud TPU VMs JAX finds the coordinator, process count and rank by itself (TPU metadata), so the command
# needs no COPG_* variables: copg_jax.distributed.maybe_initialize_distributed sees TPU_WORKER_HOSTNAMES and
# calls jax.distributed.initialize(). Settings (environment):
#   COPG_REPO_DIR   folder holding the repository on every worker (default ~/copg_jax); the command runs there
#   COPG_VENV       virtualenv to activate on every worker (default $COPG_REPO_DIR/.venv, skipped if missing)
#   COPG_SYNC=1     first copy this checkout to every worker (gcloud compute tpus tpu-vm scp --worker=all)
# Output of every worker is streamed back, prefixed by gcloud with the worker index.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND [ARGS...]" >&2
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
gcloud_tpu=(gcloud compute tpus tpu-vm "${project_args[@]}")

if [[ "${COPG_SYNC:-0}" == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  "${gcloud_tpu[@]}" scp --zone "$zone" --worker=all --recurse "$here" "$tpu:$repo"
fi

printf -v quoted '%q ' "$@"
remote="cd $repo && if [ -f $venv/bin/activate ]; then . $venv/bin/activate; fi && $quoted"
exec "${gcloud_tpu[@]}" ssh "$tpu" --zone "$zone" --worker=all --command "$remote"
