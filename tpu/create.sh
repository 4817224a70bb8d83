#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice and waits until it is READY.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/create.sh NAME --type TYPE --zone ZONE [--spot | --reserved] [--version RUNTIME]

Creates the TPU VM (or pod slice) NAME of accelerator TYPE (e.g. v5litepod-8,
v4-32) in ZONE and waits until it is READY. With --spot or --reserved the VM is
requested as a queued resource (spot capacity is the cheap default for
experiments; reserved uses your reservation). --version is the TPU software
runtime (default: tpu-ubuntu2204-base). Every gcloud command is printed first;
DRY_RUN=1 prints them without running. Waits up to TPU_CREATE_TIMEOUT_S
(default 1800) seconds, polling every TPU_POLL_S (default 15).
USAGE
}

name="" type="" zone="" capacity="" version="tpu-ubuntu2204-base"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --type) need_value "$1" "${2:-}"; type="$2"; shift 2 ;;
    --zone) need_value "$1" "${2:-}"; zone="$2"; shift 2 ;;
    --version) need_value "$1" "${2:-}"; version="$2"; shift 2 ;;
    --spot) capacity="--spot"; shift ;;
    --reserved) capacity="--reserved"; shift ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *) [[ -z "$name" ]] || die "unexpected argument $1"; name="$1"; shift ;;
  esac
done
require_name_zone "$name" "$zone"
[[ -n "$type" ]] || die "missing --type (e.g. v5litepod-8)"

if [[ -n "$capacity" ]]; then
  gc compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
    --accelerator-type "$type" --runtime-version "$version" "$capacity"
else
  gc compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version "$version"
fi
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0

deadline=$((SECONDS + ${TPU_CREATE_TIMEOUT_S:-1800}))
while true; do
  state="$(tpu_state "$name" "$zone")"
  echo "$name: $state" >&2
  case "$state" in
    READY) exit 0 ;;
    PREEMPTED | TERMINATED | FAILED) die "$name is $state" ;;
  esac
  ((SECONDS < deadline)) || die "$name not READY after ${TPU_CREATE_TIMEOUT_S:-1800} s (last state: $state)"
  sleep "${TPU_POLL_S:-15}"
done
