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
