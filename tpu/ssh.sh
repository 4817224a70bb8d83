#!/usr/bin/env bash
# Opens a shell on one worker, or runs a command on one or all workers.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/ssh.sh NAME --zone ZONE [--worker W|all] [-- COMMAND ...]

Without COMMAND, an interactive shell on worker W (default 0). With COMMAND,
runs it on worker W, or on every worker with --worker all. DRY_RUN=1 prints
the gcloud command without running it.
USAGE
}

name="" zone="" worker=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" "${2:-}"; zone="$2"; shift 2 ;;
    --worker) need_value "$1" "${2:-}"; worker="$2"; shift 2 ;;
    --) shift; break ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *) [[ -z "$name" ]] || die "unexpected argument $1"; name="$1"; shift ;;
  esac
done
require_name_zone "$name" "$zone"

if [[ $# -gt 0 ]]; then
  gc compute tpus tpu-vm ssh "$name" --worker="$worker" --zone "$zone" --command "$*"
else
  gc compute tpus tpu-vm ssh "$name" --worker="$worker" --zone "$zone"
fi
