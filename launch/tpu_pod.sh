#!/usr/bin/env bash
# Train, analyse or ablate on a Cloud TPU VM slice: create it (or reuse it), install this checkout on every worker,
# start the same `python -m induction_jax.COMMAND` on every worker with one log per worker, and start again after
# a preemption. Resuming is automatic: train restores the latest resume checkpoint in --run-dir; analyze and ablate
# skip every result already in the run's store.
#
#   launch/tpu_pod.sh [--dry-run] [--command C] --name NAME --zone ZONE --type ACCELERATOR_TYPE [options] -- ARGS...
#
#   --command         train (default), analyze or ablate; ARGS go to `python -m induction_jax.C --no-progress`
#   --type            v5litepod-256, v5p-2048, ... (see docs/scale.md for the slice each config needs)
#   --version         TPU VM image (default: v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base otherwise)
#   --project         gcloud project (default: gcloud's configured one)
#   --spot            request a spot (preemptible) slice
#   --max-restarts N  start again at most N times after a preemption or a lost worker (default 20)
#   --logs DIR        where the per-worker logs go on this machine (default: launch_logs/NAME)
#   --dry-run         print the commands instead of running them (queries gcloud for nothing)
#
# ARGS go to the command unchanged. What they name must be storage that every worker sees at the same path (a
# Filestore/NFS mount or a gcsfuse-mounted bucket): train's --run-dir, since every worker writes its shards of
# each checkpoint there; analyze's and ablate's RUN_DIRs and --out, as absolute paths, since every worker reads
# the snapshots. The loop stops when worker 0's log of the last attempt shows the command finished: train's
# "finished at step N"; analyze's and ablate's last line "report: PATH" ("part I of N: ..." with --part); with
# analyze --no-report, worker 0's exit status 0. Examples:
#   launch/tpu_pod.sh --name ij-6l --zone us-west4-a --type v5litepod-256 --spot -- \
#       --config configs/full_6l.yaml --run-dir /mnt/runs/full_6l
#   launch/tpu_pod.sh --command analyze --name ij-40l --zone us-west4-a --type v5litepod-128 -- \
#       /mnt/runs/full_40l analysis.placement=sharded
set -euo pipefail

DRY_RUN=0 COMMAND=train NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" SPOT=0 MAX_RESTARTS=20 LOGS=""
die() { echo "error: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --command) COMMAND="${2:?--command needs a value}"; shift ;;
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --type) TYPE="${2:?--type needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift ;;
    --logs) LOGS="${2:?--logs needs a value}"; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command's arguments go after --)" ;;
  esac
  shift
done
ARGS=("$@")
REPO="$(cd "$(dirname "$0")/.." && pwd)"
[[ -n "$NAME" && -n "$ZONE" && -n "$TYPE" ]] || die "--name, --zone and --type are required (see --help)"
# FINISHED: the line worker 0 prints last when the command is done (grep -E); empty: its exit status 0 says so.
case "$COMMAND" in
  train)
    [[ ${#ARGS[@]} -gt 0 ]] || die "no train arguments after -- (at least --config and --run-dir)"
    [[ " ${ARGS[*]} " == *" --run-dir "* ]] || die "give --run-dir on storage every worker shares"
    FINISHED="finished at step" ;;
  analyze|ablate)
    source "$REPO/launch/analysis_args.sh"
    split_analysis_args "${ARGS[@]}"
    [[ ${#RUN_DIRS[@]} -gt 0 ]] || die "no RUN_DIR after -- for $COMMAND (a run directory every worker shares)"
    for d in "${RUN_DIRS[@]}" "${OUT_DIRS[@]}"; do
      # A relative path would name a directory inside each worker's copy of the code, which the install deletes.
      [[ "$d" == /* ]] || die "$d: give an absolute path on storage every worker shares"
    done
    if [[ " ${ARGS[*]} " == *" --part "* || " ${ARGS[*]} " == *" --part="* ]]; then FINISHED="^part [0-9]+ of [0-9]+"
    elif [[ "$COMMAND" == analyze && " ${ARGS[*]} " == *" --no-report "* ]]; then FINISHED=""
    else FINISHED="^report: "; fi ;;
  *) die "--command $COMMAND: expected train, analyze or ablate" ;;
esac
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number"
LOGS="${LOGS:-launch_logs/$NAME}"

# Hosts in the slice: v5e and v6e name their chips (4 per host, 8 on a single-host slice); v4 and v5p name their
# TensorCores (2 per chip, 4 chips per host).
workers_for() {
  local kind="${1%-*}" n="${1##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "--type $1: expected <chip>-<count>, e.g. v5litepod-256"
  case "$kind" in
    v5litepod|v5e|v6e) if (( n <= 8 )); then echo 1; else echo $(( n / 4 )); fi ;;
    v4|v5p) echo $(( n / 2 <= 4 ? 1 : n / 8 )) ;;
    *) die "--type $1: unknown chip $kind" ;;
  esac
}
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;; *) VERSION=tpu-ubuntu2204-base ;; esac
fi
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

quote() {  # the arguments as one shell-readable line ('...' around any with spaces or shell syntax)
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {  # prints the command; runs it unless this is a dry run
  echo "+ $(quote "$@")"
  [[ $DRY_RUN -eq 1 ]] || "$@"
}

state() {  # READY, PREEMPTED, CREATING, ... or NOT_FOUND
  if [[ $DRY_RUN -eq 1 ]]; then echo NOT_FOUND; return; fi
  "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}

ensure_slice() {  # sets FRESH=1 when the slice was (re)created and so has no code on it yet
  local s; s="$(state)"
  FRESH=0
  [[ $DRY_RUN -eq 1 ]] && echo "# dry run: assuming $NAME does not exist yet"
  if [[ "$s" == PREEMPTED || "$s" == TERMINATED ]]; then
    echo "# $NAME is $s: deleting it to create it again"
    run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    s=NOT_FOUND
  fi
  if [[ "$s" == NOT_FOUND ]]; then
    local spot=(); [[ $SPOT -eq 1 ]] && spot=(--spot)
    run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --version "$VERSION" "${spot[@]}"
    FRESH=1
  else
    echo "# reusing $NAME ($s)"
    [[ "$s" == READY ]] || die "$NAME is $s; wait for READY or delete it"
  fi
}

install_code() {
  # The committed tree (git archive), so every worker runs exactly the same code.
  local tarball="/tmp/induction_jax-$NAME.tgz"
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:induction_jax.tgz" "${WHERE[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command \
    "rm -rf ~/induction_jax && mkdir ~/induction_jax && tar -xzf ~/induction_jax.tgz -C ~/induction_jax && python3 -m venv ~/induction_jax_venv && ~/induction_jax_venv/bin/pip install -q -e \"\$HOME/induction_jax[tpu]\""
}

last_attempt() {  # worker 0's log from the latest "=== attempt" line on
  awk '/^=== attempt / { out = ""; next } { out = out $0 "\n" } END { printf "%s", out }' "$LOGS/worker-0.log"
}

run_once() {  # one attempt on every worker, each into its own log; 0 when worker 0 says the command finished
  local n="$1" attempt="$2" cmd pids=() w rc0=0
  cmd="cd ~/induction_jax && ~/induction_jax_venv/bin/python -m induction_jax.$COMMAND --no-progress $(quote "${ARGS[@]}")"
  run mkdir -p "$LOGS"
  for (( w = 0; w < n; w++ )); do
    # Each worker joins the job by itself: sharding.initialize_distributed detects the TPU VM.
    echo "+ $(quote "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$w" --command "$cmd") >> $LOGS/worker-$w.log 2>&1 &"
    if [[ $DRY_RUN -eq 0 ]]; then
      echo "=== attempt $attempt, $(date -u +%FT%TZ)" >> "$LOGS/worker-$w.log"
      "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$w" --command "$cmd" >> "$LOGS/worker-$w.log" 2>&1 &
      pids+=($!)
    fi
  done
  echo "+ wait"
  [[ $DRY_RUN -eq 1 ]] && return 0
  wait "${pids[0]}" || rc0=$?
  for pid in "${pids[@]:1}"; do wait "$pid" || true; done
  # A preempted training saves and exits 0 too; only "finished at step" means there is nothing left to do.
  if [[ "$COMMAND" == train ]]; then tail -n 5 "$LOGS/worker-0.log" | grep -q "$FINISHED"; return; fi
  if [[ -z "$FINISHED" ]]; then return "$rc0"; fi
  last_attempt | tail -n 5 | grep -qE "$FINISHED"
}

[[ $DRY_RUN -eq 1 ]] || command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"
N_WORKERS="$(workers_for "$TYPE")"
if [[ "$COMMAND" == train ]]; then RESUMES="training resumes from the latest checkpoint"
else RESUMES="$COMMAND resumes, skipping every result already stored"; fi
echo "# $TYPE: $N_WORKERS worker(s); logs in $LOGS/worker-<i>.log"
for (( attempt = 0; attempt <= MAX_RESTARTS; attempt++ )); do
  ensure_slice
  # The first attempt installs even on a reused slice, so it never runs an older copy of the code.
  if [[ $attempt -eq 0 || $FRESH -eq 1 ]]; then install_code; fi
  if run_once "$N_WORKERS" "$attempt"; then
    if [[ $DRY_RUN -eq 1 ]]; then
      echo "# dry run: after a preemption or a lost worker this loop runs again (at most $MAX_RESTARTS times); $RESUMES"
    else
      [[ "$COMMAND" == train || -z "$FINISHED" ]] || last_attempt | grep -E "$FINISHED" || true
      echo "finished: see $LOGS/worker-0.log"
    fi
    exit 0
  fi
  echo "# attempt $attempt did not finish (preempted or a worker was lost); starting again: $RESUMES"
done
die "gave up after $MAX_RESTARTS restarts; see $LOGS"
