#!/usr/bin/env bash
# Copies the working tree to every worker and installs jaxmodels[tpu] on a supported Python, idempotently.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/setup.sh NAME --zone ZONE

Packs this checkout (without .git, .venv, runs/, tpu/logs/ and caches), copies
it to every worker of NAME as ~/jaxmodels, and installs `jaxmodels[tpu]` there
into ~/jaxmodels/.venv, a virtual environment on Python TPU_PYTHON (default
3.11: the TPU VM images ship Python 3.10, below jaxmodels' requires-python).
The Python comes from uv (`uv python install`, installed with pip on first
use), so no apt repository is needed. Running it again updates the code and
reinstalls nothing that is current. Every gcloud command is printed first;
DRY_RUN=1 prints them without running anything or writing any file.
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
# On each worker: uv (from PyPI with the image's pip, once), a venv on a supported Python, the package.
install="mkdir -p ~/jaxmodels && tar -xzf ~/jaxmodels.tgz -C ~/jaxmodels && cd ~/jaxmodels \
&& export PATH=\"\$HOME/.local/bin:\$PATH\" \
&& { command -v uv >/dev/null || python3 -m pip install -q --user uv; } \
&& uv venv -q --allow-existing --python $TPU_PYTHON .venv \
&& uv pip install -q -e '.[tpu]' --python .venv/bin/python3"
if [[ "${DRY_RUN:-0}" == 1 ]]; then  # prints the commands; packs nothing
  archive="\$(mktemp -d)/jaxmodels.tgz"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  archive="$tmp/jaxmodels.tgz"
  tar -C "$root" --exclude=.git --exclude=.venv --exclude=runs --exclude=./tpu/logs --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.egg-info' -czf "$archive" .
fi
gc compute tpus tpu-vm scp "$archive" "$name:~/jaxmodels.tgz" --worker=all --zone "$zone"
gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command "$install"
