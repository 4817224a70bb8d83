#!/usr/bin/env bash
# Runs an experiment on every worker at once; with --retries, survives preemption.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/run.sh NAME --zone ZONE [--retries N --type TYPE [--spot | --reserved] [--version V]]
                  -- experiments/X.py --workdir gs://BUCKET/run [--config.K=V ...]

Runs the experiment on all workers of NAME at once, one process per host,
with JAXMODELS_DISTRIBUTED=auto (jax.distributed joins the hosts, detecting the
slice itself) and the persistent compilation cache on. Output
streams here with each worker's prefix and is kept in tpu/logs/NAME-<time>.log
(and in ~/jaxmodels/run.log on each worker, for tpu/logs.sh).

--retries N: when the run fails and the VM reports PREEMPTED (or is gone), the
VM is deleted, recreated (--type, --spot/--reserved and --version say how),
set up again, and the same command reruns: it resumes from the newest
checkpoint in --workdir, so use a gs:// workdir. Every gcloud command is
printed first; DRY_RUN=1 prints them without running.
USAGE
}

name="" zone="" retries=0 type="" capacity="" version=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" "${2:-}"; zone="$2"; shift 2 ;;
    --retries) need_value "$1" "${2:-}"; retries="$2"; shift 2 ;;
    --type) need_value "$1" "${2:-}"; type="$2"; shift 2 ;;
    --version) need_value "$1" "${2:-}"; version="$2"; shift 2 ;;
    --spot) capacity="--spot"; shift ;;
    --reserved) capacity="--reserved"; shift ;;
    --) shift; break ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *) [[ -z "$name" ]] || die "unexpected argument $1"; name="$1"; shift ;;
  esac
done
require_name_zone "$name" "$zone"
[[ $# -gt 0 ]] || die "missing the experiment after -- (e.g. -- experiments/text_transformer.py --workdir gs://b/r)"
[[ "$retries" =~ ^[0-9]+$ ]] || die "--retries must be a number, got $retries"
if ((retries > 0)); then
  [[ -n "$type" ]] || die "--retries needs --type to recreate the VM after a preemption"
fi

here="$(cd "$(dirname "$0")" && pwd)"
printf -v experiment ' %q' "$@"
env="JAXMODELS_DISTRIBUTED=auto JAXMODELS_CACHE_DIR=~/.cache/jaxmodels/xla PYTHONUNBUFFERED=1"
remote="cd ~/jaxmodels && $env python3${experiment} 2>&1 | tee ~/jaxmodels/run.log"
mkdir -p "$here/logs"
log="$here/logs/$name-$(date +%Y%m%d-%H%M%S).log"

attempt=0
while true; do
  if gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command "set -o pipefail; $remote" \
      2>&1 | tee -a "$log"; then
    echo "run finished; log: $log" >&2
    exit 0
  fi
  [[ "${DRY_RUN:-0}" == 1 ]] && exit 0
  state="$(tpu_state "$name" "$zone")"
  if ((attempt >= retries)) || [[ "$state" != PREEMPTED && "$state" != NOT_FOUND ]]; then
    die "run failed (VM state: $state); log: $log"
  fi
  attempt=$((attempt + 1))
  echo "$name is $state: recreating it and rerunning (retry $attempt of $retries)" >&2
  if [[ "$state" != NOT_FOUND ]]; then
    "$here/delete.sh" "$name" --zone "$zone"
  fi
  create=("$name" --type "$type" --zone "$zone")
  [[ -z "$capacity" ]] || create+=("$capacity")
  [[ -z "$version" ]] || create+=(--version "$version")
  "$here/create.sh" "${create[@]}"
  "$here/setup.sh" "$name" --zone "$zone"
done
