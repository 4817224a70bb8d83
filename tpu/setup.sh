#!/usr/bin/env bash
# Copies the working tree to every worker and installs jaxmodels with the tpu extra, idempotently.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/setup.sh NAME --zone ZONE

Packs this checkout (without .git, .venv, runs/ and caches), copies it to every
worker of NAME as ~/jaxmodels, and runs `pip install -e '.[tpu]'` there.
Running it again updates the code and reinstalls nothing that is current.
Every gcloud command is printed first; DRY_RUN=1 prints them without running.
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

root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/jaxmodels.tgz"
tar -C "$root" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
  --exclude=.pytest_cache --exclude='*.egg-info' -czf "$archive" .
gc compute tpus tpu-vm scp "$archive" "$name:~/jaxmodels.tgz" --worker=all --zone "$zone"
gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command \
  "mkdir -p ~/jaxmodels && tar -xzf ~/jaxmodels.tgz -C ~/jaxmodels && cd ~/jaxmodels && python3 -m pip install -q -e '.[tpu]'"
