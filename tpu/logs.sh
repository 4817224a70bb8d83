#!/usr/bin/env bash
# Shows the log of the latest tpu/run.sh run on every worker.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/logs.sh NAME --zone ZONE [--lines N] [--follow]

Prints the last N (default 50) lines of ~/jaxmodels/run.log from every worker;
--follow keeps streaming. The local copies are in tpu/logs/. DRY_RUN=1 prints
the gcloud command without running it.
USAGE
}

name="" zone="" lines=50 follow=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" "${2:-}"; zone="$2"; shift 2 ;;
    --lines) need_value "$1" "${2:-}"; lines="$2"; shift 2 ;;
    --follow) follow="-f"; shift ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *) [[ -z "$name" ]] || die "unexpected argument $1"; name="$1"; shift ;;
  esac
done
require_name_zone "$name" "$zone"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number, got $lines"

gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command "tail -n $lines $follow ~/jaxmodels/$JOB_LOG"
