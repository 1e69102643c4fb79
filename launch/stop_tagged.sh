#!/usr/bin/env bash
# Stops this machine's processes of one launched run: those whose environment holds COPG_RUN_TAG=TAG (set by
# launch/tpu_pod.sh on every worker). SIGTERM first (a multi-process JAX run takes it as a preemption notice
# and saves at its next step), then SIGKILL for those still running GRACE_S seconds later (a hung process).
#
#   launch/stop_tagged.sh TAG [GRACE_S]     (GRACE_S default 10)
set -uo pipefail
if [[ $# -lt 1 || -z "$1" ]]; then
  echo "usage: $0 TAG [GRACE_S]" >&2
  exit 2
fi
tag=$1
grace_s=${2:-10}

tagged() {
  local file pid
  for file in /proc/[0-9]*/environ; do
    pid=${file#/proc/}
    pid=${pid%/environ}
    [[ $pid == "$$" ]] && continue
    grep -qzxF -- "COPG_RUN_TAG=$tag" "$file" 2>/dev/null && echo "$pid"
  done
}

mapfile -t pids < <(tagged)
((${#pids[@]})) || exit 0
kill -TERM "${pids[@]}" 2>/dev/null
deadline=$((SECONDS + grace_s))
while true; do
  left=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
  ((${#left[@]})) || exit 0
  ((SECONDS < deadline)) || break
  sleep 0.2
done
echo "stop_tagged: ${#left[@]} process(es) of run $tag still running ${grace_s}s after SIGTERM; killing them" >&2
kill -KILL "${left[@]}" 2>/dev/null
exit 0
