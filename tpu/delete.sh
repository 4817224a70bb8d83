#!/usr/bin/env bash
# Deletes a TPU VM (and its queued resource, if it came from one).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/delete.sh NAME --zone ZONE

Deletes the TPU VM NAME and, if it was created as a queued resource (--spot or
--reserved), the queued resource too. Billing stops once this returns.
DRY_RUN=1 prints the gcloud commands without running them.
USAGE
}

name="" zone=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --zone) need_value "$1" "${2:-}"; zone="$2"; shift 2 ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *) [[ -z "$name" ]] || die "unexpected argument $1"; name="$1"; shift ;;
  esac
done
require_name_zone "$name" "$zone"

gc compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
if [[ "${DRY_RUN:-0}" == 1 ]] || gcloud compute tpus queued-resources describe "$name" --zone "$zone" \
    >/dev/null 2>&1; then
  gc compute tpus queued-resources delete "$name" --zone "$zone" --quiet
fi
