#!/usr/bin/env bash
# Starts an experiment detached on every worker and follows it; with --retries, survives preemption.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu/run.sh NAME --zone ZONE [--retries N --type TYPE [--spot | --reserved] [--version V]]
                  -- experiments/X.py --workdir gs://BUCKET/run [--config.K=V ...]

Starts the experiment detached on all workers of NAME, one process per host,
with JAXMODELS_DISTRIBUTED=auto (jax.distributed joins the hosts, detecting the
slice itself) and the persistent compilation cache on, then follows its output.
The job runs in its own session on each worker (nohup setsid), so it keeps
running when this SSH connection drops or the laptop sleeps: run.sh then
reattaches, and tpu/logs.sh --follow shows it from anywhere. On each worker the
job writes ~/jaxmodels/run.log, its pid to ~/jaxmodels/run.pid and its exit
status to ~/jaxmodels/run.exit. The streamed output is also kept in
tpu/logs/NAME-<time>.log (TPU_LOG_DIR overrides the folder).

--retries N: when the job dies (killed, or exit 75 after a preemption signal)
while the VM stays READY, the same command starts again on it; when the VM is
PREEMPTED or gone, it is deleted, recreated (--type, --spot/--reserved and
--version say how), set up again, and the command reruns. Either way the run
resumes from the newest checkpoint in --workdir, so use a gs:// workdir. A job
that exits with another status (a bad config: 2, a diverged loss: 3, a crash: 1)
is not retried. Every gcloud command that changes something is printed first;
DRY_RUN=1 prints them without running anything or writing any file.
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
printf -v job %q "$env .venv/bin/python3${experiment}; echo \$? > $JOB_EXIT"
# Detached: its own session (setsid), no terminal (nohup, stdin from /dev/null), output to the log file.
start="cd ~/jaxmodels || exit 1
if [ -f $JOB_PID ] && ps -o stat= -p \"\$(cat $JOB_PID)\" | grep -qv '^Z'; then
  echo \"\$(hostname): a job is already running (pid \$(cat $JOB_PID)); stop it first\" >&2; exit 3
fi
rm -f $JOB_EXIT
nohup setsid bash -c $job > $JOB_LOG 2>&1 < /dev/null &
echo \$! > $JOB_PID"
# follow LINES: streams each worker's log until its job ends (tail --pid), from line LINES (+1: all of it).
follow() {
  gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command \
    "cd ~/jaxmodels && tail -n $1 -F --pid=\"\$(cat $JOB_PID)\" $JOB_LOG" 2>&1 | record || true
}

log=""
record() { if [[ -n "$log" ]]; then tee -a "$log"; else cat; fi; }
if [[ "${DRY_RUN:-0}" == 1 ]]; then  # prints the commands; writes nothing (no tpu/logs)
  gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command "$start"
  follow +1
  exit 0
fi
logs="${TPU_LOG_DIR:-$here/logs}"
mkdir -p "$logs"
log="$logs/$name-$(date +%Y%m%d-%H%M%S).log"

attempt=0
while true; do
  started=0
  gc compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --command "$start" 2>&1 | record || started=$?
  if ((started == 255)); then  # SSH itself failed: the VM may be gone
    status=unknown state="$(tpu_state "$name" "$zone")"
  elif ((started != 0)); then
    die "could not start the job on $name (exit status $started); log: $log"
  else
    lines=+1
    while true; do  # follow until the job has ended on every worker, reattaching after a dropped connection
      follow "$lines"
      lines=20 state=""
      status="$(job_status "$name" "$zone")"
      case "$status" in
        running) echo "$name: the connection dropped; the job is still running: reattaching" >&2 ;;
        unknown) state="$(tpu_state "$name" "$zone")"
                 [[ "$state" == READY ]] || break
                 echo "$name: cannot reach the workers; trying again" >&2 ;;
        *) break ;;
      esac
      sleep "${TPU_POLL_S:-15}"
    done
    [[ "$status" == succeeded ]] && { echo "run finished; log: $log" >&2; exit 0; }
    [[ -n "$state" ]] || state="$(tpu_state "$name" "$zone")"
  fi
  # Retried: killed (died, or exit 128+signal), the preemption exit (75), or the VM or the job gone.
  code="${status#exit:}"
  if [[ "$status" == exit:* ]] && ((code != 75 && code <= 128)); then
    die "the job failed (exit status $code on some worker; not retried); log: $log"
  fi
  if ((attempt >= retries)); then
    die "run failed (job: $status, VM state: $state); log: $log"
  fi
  attempt=$((attempt + 1))
  if [[ "$state" == READY ]]; then
    echo "$name is READY but its job is $status: starting it again (retry $attempt of $retries)" >&2
    [[ "$status" != none ]] || "$here/setup.sh" "$name" --zone "$zone"
    continue
  fi
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
