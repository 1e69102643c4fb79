#!/usr/bin/env bash
# Stops this machine's processes of one launched run: those whose environment holds COPG_RUN_TAG=TAG (set by
# launch/tpu_pod.sh on every worker and by launch/local_multiprocess.sh), and every process of the process
# groups PGID... (a launcher's own children: also those started with an environment of their own). SIGTERM
# first (a multi-process JAX run takes it as a preemption notice and saves at its next step), then SIGKILL
# for those still running GRACE_S seconds later (a hung process), found again then (also what was started
# in between).
#
#   launch/stop_tagged.sh TAG [GRACE_S [PGID...]]     (GRACE_S default 10)
set -uo pipefail
if [[ $# -lt 1 || -z "$1" ]]; then
  echo "usage: $0 TAG [GRACE_S [PGID...]]" >&2
  exit 2
fi
tag=$1
grace_s=${2:-10}
groups=("${@:3}")

tagged() {
  local file pid
  for file in /proc/[0-9]*/environ; do
    pid=${file#/proc/}
    pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    grep -qzxF -- "COPG_RUN_TAG=$tag" "$file" 2>/dev/null && echo "$pid"
  done
}

signal() {  # signal $1 to the tagged processes and the groups; prints how many there were
  local pids group count
  mapfile -t pids < <(tagged)
  count=${#pids[@]}
  ((count)) && kill "-$1" "${pids[@]}" 2>/dev/null
  for group in "${groups[@]}"; do
    kill "-$1" -- "-$group" 2>/dev/null && count=$((count + 1))
  done
  echo "$count"
}

running() {
  local group
  [[ -n "$(tagged)" ]] && return 0
  for group in "${groups[@]}"; do kill -0 -- "-$group" 2>/dev/null && return 0; done
  return 1
}

(($(signal TERM))) || exit 0
deadline=$((SECONDS + grace_s))
while running; do
  if ((SECONDS >= deadline)); then
    echo "stop_tagged: $(signal KILL) process(es) of run $tag still running ${grace_s}s after SIGTERM; killing them" >&2
    sleep 0.2
    signal KILL >/dev/null  # and what they started meanwhile
    break
  fi
  sleep 0.2
done
exit 0
