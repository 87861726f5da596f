#!/usr/bin/env bash
# Issue 5's GPU training in one device command (run tool: carry [".whl"], timeout_s 600). Each run's best actor and
# its last one are exported to $OUT and the TensorBoard runs are packed into $OUT/runs.tar.gz; whatever time is left
# under the 10 minutes goes to issue 6's benchmarks (bench/gpu_suite.sh).
#   here, once:  bash bench/gpu_wheels.sh
#   device:      bash bench/gpu_train.sh [MODE] [cli.py fit options for every run ...]
#   dry run:     OUT=/tmp/train bash bench/gpu_train.sh [MODE] --device cpu
#                (tiny sizes, on a CPU)
# e.g. bash bench/gpu_train.sh whole_box --data.env.reward.headway 1.0   (the options go last: they win)
# On a GPU, tests/test_gpu.py runs first; if one test fails, every run trains eagerly with batches from the host
# instead (said so in the log).
# whole_box (the default): the scenario-1 recipe (configs/experiments/scenario1_curvy_asymmetric.yaml) on the whole
#   machine: 14 env processes, one learner, the graphed update and sampling on the GPU, 6 minutes (eager: evaluating
#   every 10000 updates instead of 20000).
# side_by_side: scenario 2 (configs/experiments/scenario2_straight_capped.yaml, 7 env processes) and the scenario-1
#   recipe on the GPU with 7 env processes, at once.
# generalist: the generalist recipe (configs/experiments/generalist.yaml) on the whole machine, 14 env processes and
#   the learner's own choice for the GPU: 5 minutes of training after the warm-up (max_time does not count the
#   warm-up: 96 s with 7 env processes), a checkpoint every 8000 updates and no evaluation during training (20
#   episodes in the learner's process took 160 s of a 6-minute run). Its last actor and those of its three newest
#   epochs come back (packed in $OUT/<run>_actors.tar), to be chosen among on the validation grid (docs/results.md)
#   on any machine.
# generalist_closing: the generalist recipe beside the same with the closing charge (--data.env.reward.closing 1.0),
#   at once, 7 env processes each, a checkpoint every 4000 updates; their actors come back as generalist's do.
set -u
MODE=whole_box
DEVICE=cuda
EXTRA=()
while (($#)); do
  case $1 in
    whole_box | side_by_side | generalist | generalist_closing) MODE=$1 ;;
    --device) DEVICE=$2; shift ;;
    --*) EXTRA+=("$1" "$2"); shift ;;
    *) echo "usage: bash bench/gpu_train.sh [whole_box | side_by_side | generalist | generalist_closing]" \
            "[--device cpu|cuda] [--opt v ...]"
       exit 2 ;;
  esac
  shift
done
OUT=${OUT:-/tmp/gpu_train}
END_S=${END_S:-535}   # the whole script ends by then
mkdir -p "$OUT"
exec > >(tee "$OUT/train.txt") 2>&1
source bench/gpu_env.sh

if [ "$DEVICE" = cuda ]; then
  SIZE=(); TRAIN_LIMIT_S=460
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
else
  SIZE=(--trainer.accelerator cpu --trainer.max_time 00:00:00:40 --trainer.limit_train_batches 20 --data.num_envs 2
        --data.eval_episodes 1 --data.buffer_capacity 4000)
  TRAIN_LIMIT_S=400
fi

# Each run: its name (its TensorBoard run under runs/), then its config files and overrides.
ON_GPU=(--trainer.accelerator gpu)  # the recipes are written for a CPU
EAGER=(--model.init_args.cuda_graph false --data.sample_on_device false)
FAST=()
if [ "$DEVICE" = cuda ]; then
  echo "== GPU tests: the graphed update against the eager one, sampling on the GPU, the GPU's defaults ($SECONDS s)"
  if ! timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py; then
    FAST=("${EAGER[@]}")
    echo "== a GPU test failed: training eagerly, batches from the host"
  fi
fi
echo "== training with ${FAST[*]:-the learner choosing for its device} ${EXTRA[*]} ($SECONDS s)"
GENERALIST="--config configs/experiments/generalist.yaml ${ON_GPU[*]} --trainer.max_time 00:00:05:00
            --trainer.limit_val_batches 0 ${FAST[*]}"
if [ "$MODE" = whole_box ]; then
  [ "$DEVICE" = cpu ] && FAST=("${EAGER[@]}")  # both are refused on a CPU
  GRAPHED=(--model.init_args.cuda_graph true --data.sample_on_device true --trainer.limit_train_batches 20000)
  [ ${#FAST[@]} -gt 0 ] && GRAPHED=("${FAST[@]}" --trainer.limit_train_batches 10000)
  RUNS=("gpu_whole_box_scenario1_curvy"
        "--config configs/experiments/scenario1_curvy_asymmetric.yaml ${ON_GPU[*]} --trainer.max_time 00:00:06:00
         --data.num_envs 14 ${GRAPHED[*]}")
elif [ "$MODE" = generalist ]; then
  RUNS=("gpu_generalist" "$GENERALIST --data.num_envs 14 --trainer.limit_train_batches 8000")
elif [ "$MODE" = generalist_closing ]; then
  RUNS=("gpu_generalist" "$GENERALIST --data.num_envs 7 --trainer.limit_train_batches 4000"
        "gpu_generalist_closing" "$GENERALIST --data.num_envs 7 --trainer.limit_train_batches 4000
         --data.env.reward.closing 1.0")
else
  RUNS=("gpu_scenario1_curvy" "--config configs/experiments/scenario1_curvy_asymmetric.yaml ${ON_GPU[*]}
         --trainer.max_time 00:00:05:30 --trainer.limit_train_batches 4000 --data.num_envs 7 ${FAST[*]}"
        "gpu_scenario2" "--config configs/experiments/scenario2_straight_capped.yaml ${FAST[*]}")
fi

PIDS=()
for ((i = 0; i < ${#RUNS[@]}; i += 2)); do
  # One thread per process: the env processes and the learners share the 16 cores. When max_time stops a fit,
  # Lightning evaluates once more (20 episodes of the generalist took 160 s in one process: runs outlived their
  # limit so); a run still there at the limit gets SIGTERM, which stops it before its next update or evaluation
  # episode with last.ckpt, then SIGKILL 30 s later.
  PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=1 timeout -k 30 "$TRAIN_LIMIT_S" python3 cli.py fit ${RUNS[i + 1]} --trainer.logger.init_args.name "${RUNS[i]}" \
    "${SIZE[@]}" "${EXTRA[@]}" >"$OUT/${RUNS[i]}.log" 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"   # the runs alone: a bare `wait` would also wait for the tee above, which never ends
echo "== training done at $SECONDS s"

NAMES=()
for ((i = 0; i < ${#RUNS[@]}; i += 2)); do
  name=${RUNS[i]}
  NAMES+=("runs/$name")
  grep -E "Error|error:|Traceback|stopped|Time limit" "$OUT/$name.log" | grep -v Warning | tail -5
  best=$(ls -t runs/"$name"/version_*/checkpoints/best-*.ckpt 2>/dev/null | head -1)
  echo "$name: best checkpoint ${best:-none}"
  [ -n "$best" ] && python3 -m lightning_td3.export "$best" "$OUT/td3_$name.ckpt"
  # The updates after the last evaluation (max_time stops mid-epoch) are in last.ckpt alone: evaluate it here.
  last=$(ls -t runs/"$name"/version_*/checkpoints/last.ckpt 2>/dev/null | head -1)
  [ -n "$last" ] && python3 -m lightning_td3.export "$last" "$OUT/td3_${name}_last.ckpt"
  if [[ $MODE == generalist* ]]; then  # its epochs' checkpoints are candidates too ($OUT takes 8 files in all)
    actors=$(mktemp -d)
    mkdir "$actors/$name"
    mv "$OUT/td3_${name}_last.ckpt" "$actors/$name/" 2>/dev/null
    for epoch in $(ls -t runs/"$name"/version_*/checkpoints/epoch=*.ckpt 2>/dev/null | head -3); do
      base=$(basename "$epoch" .ckpt)
      python3 -m lightning_td3.export "$epoch" "$actors/$name/td3_${name}_${base//=/}.ckpt"
    done
    tar -cf "$OUT/${name}_actors.tar" -C "$actors" "$name"   # 4 actors of 3.8 MB: under 16 MiB a file
  fi
done
tar -czf "$OUT/runs.tar.gz" --exclude='*.ckpt' --exclude=replay "${NAMES[@]}"
ls -la "$OUT"

BUDGET_S=$((END_S - SECONDS)) bash bench/gpu_suite.sh --device "$DEVICE"
