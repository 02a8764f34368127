#!/usr/bin/env bash
# Analyse or ablate runs on a SLURM GPU cluster: run this on the login node; it submits the jobs with sbatch
# (each runs launch/slurm_analysis_task.sbatch: one process per node, one log per task in $LOGS, default logs).
#
#   launch/slurm_analysis.sh [--dry-run] (--array N | --nodes N) [options] -- analyze|ablate ARGS...
#
#   --nodes N            one job on N nodes whose processes share each snapshot: for snapshots too big for one GPU
#   --array N            N single-node tasks (sbatch --array=0-(N-1)), each analysing its part of the (run, snapshot)
#                        pairs, then one job that waits for all of them (--dependency=afterok) and runs the same
#                        command without parts: it merges the parts, computes anything still missing and writes
#                        the report. If a task fails, SLURM cancels that job; submitting again skips what is stored.
#   --gpus-per-node G    GPUs per node (default: 8 with --nodes, 1 with --array)
#   --cpus-per-task C    CPU cores per node's process (default: 4 per GPU)
#   --time T             time limit of each job (default: the partition's)
#   --partition P        partition (default: the cluster's)
#   --dry-run            print the sbatch commands and what each job runs, and submit nothing
#
# ARGS go to `python -m induction_jax.analyze` or `ablate` unchanged; the RUN_DIRs must be on storage every node
# sees. Other sbatch options come from sbatch's environment variables (SBATCH_ACCOUNT, SBATCH_QOS, ...), and PYTHON
# selects the interpreter, as for launch/slurm_gpu.sbatch. Examples:
#   launch/slurm_analysis.sh --nodes 2 -- analyze /shared/runs/full_24l mesh.fsdp=16 analysis.placement=sharded
#   launch/slurm_analysis.sh --array 16 -- analyze runs/a runs/b runs/c --ablations
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
q() { local out; printf -v out '%q ' "$@"; echo "${out% }"; }  # the arguments as one shell-readable line
DRY_RUN=0 ARRAY="" NODES="" GPUS="" CPUS="" TIME="" PARTITION=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --array) ARRAY="${2:?--array needs a value}"; shift ;;
    --nodes) NODES="${2:?--nodes needs a value}"; shift ;;
    --gpus-per-node) GPUS="${2:?--gpus-per-node needs a value}"; shift ;;
    --cpus-per-task) CPUS="${2:?--cpus-per-task needs a value}"; shift ;;
    --time) TIME="${2:?--time needs a value}"; shift ;;
    --partition) PARTITION="${2:?--partition needs a value}"; shift ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command and its arguments go after --)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no command after --: expected analyze or ablate and its arguments"
COMMAND="$1"; shift
ARGS=("$@")
[[ "$COMMAND" == analyze || "$COMMAND" == ablate ]] || die "$COMMAND: expected analyze or ablate after --"
[[ -n "$ARRAY" || -n "$NODES" ]] || die "give --array N (many tasks of one node) or --nodes N (one job)"
[[ -z "$ARRAY" || -z "$NODES" ]] || die "give either --array or --nodes, not both"
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 $2: expected a positive whole number"; }
[[ -z "$ARRAY" ]] || positive --array "$ARRAY"
[[ -z "$NODES" ]] || positive --nodes "$NODES"
if [[ -n "$ARRAY" ]]; then GPUS="${GPUS:-1}"; else GPUS="${GPUS:-8}"; fi
positive --gpus-per-node "$GPUS"
CPUS="${CPUS:-$(( 4 * GPUS ))}"
positive --cpus-per-task "$CPUS"
source "$(dirname "$0")/analysis_args.sh"
split_analysis_args "${ARGS[@]}"
[[ ${#RUN_DIRS[@]} -gt 0 ]] || die "no RUN_DIR after $COMMAND (a run directory every node sees)"
if [[ -n "$ARRAY" && ( " ${ARGS[*]} " == *" --part "* || " ${ARGS[*]} " == *" --part="* ) ]]; then
  die "--part: with --array each task's part comes from SLURM (task i of N); leave --part out"
fi

TASK="$(dirname "$0")/slurm_analysis_task.sbatch"
LOGS="${LOGS:-logs}"
export LOGS
COMMON=(--ntasks-per-node=1 --gpus-per-node="$GPUS" --cpus-per-task="$CPUS")
[[ -z "$TIME" ]] || COMMON+=(--time="$TIME")
[[ -z "$PARTITION" ]] || COMMON+=(--partition="$PARTITION")

submit() {  # prints the sbatch command; submits it unless this is a dry run and sets JOB_ID to the job's id
  echo "+ $(q sbatch "$@")"
  if [[ $DRY_RUN -eq 1 ]]; then JOB_ID=""; return; fi
  local out
  out="$(sbatch "$@")" || die "sbatch failed (its message is above)"
  JOB_ID="${out%%;*}"  # --parsable prints ID or ID;CLUSTER
  [[ "$JOB_ID" =~ ^[0-9]+$ ]] || die "sbatch printed '$out' instead of a job id"
}

if [[ $DRY_RUN -eq 0 ]]; then
  command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
  mkdir -p "$LOGS"  # sbatch opens --output there as the job starts
else
  echo "+ mkdir -p $(q "$LOGS")"
fi
if [[ -n "$NODES" ]]; then
  submit --parsable --job-name="ij-$COMMAND" --nodes="$NODES" "${COMMON[@]}" --output="$LOGS/%x-%j.out" \
    "$TASK" "$COMMAND" "${ARGS[@]}"
  [[ $DRY_RUN -eq 1 ]] || echo "submitted job $JOB_ID ($NODES nodes); logs: $LOGS/$COMMAND-$JOB_ID-task<i>.log"
else
  submit --parsable --job-name="ij-$COMMAND" --array="0-$(( ARRAY - 1 ))" --nodes=1 "${COMMON[@]}" \
    --output="$LOGS/%x-%A_%a.out" "$TASK" "$COMMAND" "${ARGS[@]}"
  array_job="${JOB_ID:-ARRAY_JOB_ID}"
  [[ $DRY_RUN -eq 1 ]] && echo "# ARRAY_JOB_ID: the job id the sbatch above prints"
  # afterok: the merge runs once every task has succeeded; --kill-on-invalid-dep cancels it when one has not,
  # instead of leaving it pending forever.
  submit --parsable --job-name="ij-$COMMAND-merge" --dependency="afterok:$array_job" --kill-on-invalid-dep=yes \
    --nodes=1 "${COMMON[@]}" --output="$LOGS/%x-%j.out" "$TASK" "$COMMAND" "${ARGS[@]}"
  if [[ $DRY_RUN -eq 0 ]]; then
    echo "submitted array job $array_job ($ARRAY tasks; logs: $LOGS/$COMMAND-${array_job}_<i>-task0.log)"
    echo "submitted merge job $JOB_ID (after every task succeeded; log: $LOGS/$COMMAND-$JOB_ID-task0.log)"
  fi
fi
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# every job runs $TASK, which starts (JOB: the job id; ARRAYJOB_TASK in an array task):"
  env -u SLURM_JOB_ID -u SLURM_ARRAY_JOB_ID bash "$TASK" --dry-run "$COMMAND" "${ARGS[@]}" | grep -v '^+ mkdir'
  if [[ -n "$ARRAY" ]]; then
    echo "# each array task finds its part (task i of $ARRAY) from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"
    echo "# and writes it to the results' parts/; the merge job, outside the array, merges them and writes the report"
  fi
fi
