#!/usr/bin/env bash
# Shared by the tpu/ scripts: flag parsing helpers, a gcloud wrapper that prints
# every command (and only prints it under DRY_RUN=1), and one-line errors.
set -euo pipefail

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# gc ARGS...: runs `gcloud ARGS`, printing it first; DRY_RUN=1 prints without running.
gc() {
  printf '+ gcloud' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    return 0
  fi
  gcloud "$@"
}

need_gcloud() {
  if [[ "${DRY_RUN:-0}" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}

# need_value FLAG VALUE: a flag that takes a value got one.
need_value() {
  [[ -n "${2:-}" && "${2:0:2}" != "--" ]] || die "$1 needs a value"
}

# require_name_zone NAME ZONE: the two arguments every script needs, then gcloud itself.
require_name_zone() {
  [[ -n "$1" ]] || die "missing NAME (see --help)"
  [[ -n "$2" ]] || die "missing --zone (e.g. us-west4-a)"
  need_gcloud
}

# tpu_state NAME ZONE: the VM's state (READY, CREATING, PREEMPTED, ...), or NOT_FOUND.
tpu_state() {
  gcloud compute tpus tpu-vm describe "$1" --zone "$2" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}

# The detached job on each worker (tpu/run.sh): its log, pid and exit status live at these paths under
# ~/jaxmodels, so any later SSH session (run.sh following again, logs.sh, a retry) can find it.
# shellcheck disable=SC2034  # used by the scripts that source this file
JOB_LOG=run.log
JOB_PID=run.pid
JOB_EXIT=run.exit
# The Python the scripts install on the VM (the TPU images ship 3.10, below jaxmodels' requires-python).
TPU_PYTHON="${TPU_PYTHON:-3.11}"

# job_status NAME ZONE: the detached job over all workers: running (on any worker), succeeded (exit 0 on
# every worker), died (a worker's job is gone without an exit status: killed, or the VM rebooted),
# exit:N (a worker's job exited with N), none (no job started), or unknown (SSH failed). A job counts as
# running while its process exists and is not a zombie (an unreaped, killed job is gone).
job_status() {
  local out
  # shellcheck disable=SC2016  # expanded by the worker's shell
  local probe='cd ~/jaxmodels 2>/dev/null || { echo "jaxmodels-job: none"; exit 0; }
if [ -f '"$JOB_EXIT"' ]; then echo "jaxmodels-job: exit:$(cat '"$JOB_EXIT"')"
elif [ -f '"$JOB_PID"' ] && ps -o stat= -p "$(cat '"$JOB_PID"')" | grep -qv "^Z"; then echo "jaxmodels-job: running"
elif [ -f '"$JOB_PID"' ]; then echo "jaxmodels-job: died"
else echo "jaxmodels-job: none"; fi'
  if ! out="$(gcloud compute tpus tpu-vm ssh "$1" --worker=all --zone "$2" --command "$probe" 2>/dev/null)"; then
    echo unknown
    return
  fi
  out="$(grep -o 'jaxmodels-job: [a-z0-9:]*' <<<"$out" | cut -d' ' -f2 || true)"
  if [[ -z "$out" ]]; then echo unknown
  elif grep -qx running <<<"$out"; then echo running
  elif ! grep -vqx 'exit:0' <<<"$out"; then echo succeeded
  elif grep -qx died <<<"$out"; then echo died
  else grep -v -m1 -x 'exit:0' <<<"$out"
  fi
}
