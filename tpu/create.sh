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
runtime (default: tpu-ubuntu2204-base). A queued resource that ends FAILED or
SUSPENDED is reported with its reason and deleted (exit 2), not waited on. Every
gcloud command that changes something is printed first; DRY_RUN=1 prints them
without running. Waits up to TPU_CREATE_TIMEOUT_S (default 1800) seconds,
polling every TPU_POLL_S (default 15).
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
if [[ -n "$capacity" ]]; then  # a queued resource: it may wait for capacity, then fail or be suspended
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$name" --zone "$zone" --format='value(state.state)' \
      2>/dev/null || echo NOT_FOUND)"
    echo "$name (queued resource): $state" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED | SUSPENDING | NOT_FOUND)
        reason="$(gcloud compute tpus queued-resources describe "$name" --zone "$zone" \
          --format='value(state.failedData.error.message)' 2>/dev/null || true)"
        [[ "$state" == NOT_FOUND ]] || gc compute tpus queued-resources delete "$name" --zone "$zone" --quiet --force
        die "queued resource $name is $state${reason:+ ($reason)}; deleted it, nothing is billed" ;;
    esac
    ((SECONDS < deadline)) || die "queued resource $name not ACTIVE after ${TPU_CREATE_TIMEOUT_S:-1800} s \
(last state: $state); it stays queued: tpu/delete.sh $name --zone $zone to withdraw it"
    sleep "${TPU_POLL_S:-15}"
  done
fi
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
