#!/usr/bin/env bash
# Issue 5's GPU training in one device command (run tool: carry [".whl"], timeout_s 600). Each run's best actor and
# its last one are exported to $OUT and the TensorBoard runs are packed into $OUT/runs.tar.gz; whatever time is left
# under the 10 minutes goes to issue 6's benchmarks (bench/gpu_suite.sh).
#   here, once:  bash bench/gpu_wheels.sh
#   device:      bash bench/gpu_train.sh [whole_box | side_by_side | generalist] [cli.py fit options for every run ...]
#   dry run:     OUT=/tmp/train bash bench/gpu_train.sh [whole_box | side_by_side | generalist] --device cpu
#                (tiny sizes, on a CPU)
# e.g. bash bench/gpu_train.sh whole_box --data.env.reward.headway 1.0   (the options go last: they win)
# whole_box (the default): the scenario-1 recipe (configs/experiments/scenario1_curvy_asymmetric.yaml) on the whole
#   machine: 14 env processes, one learner, the graphed update and sampling on the GPU, 6 minutes. Their GPU tests run
#   first; if one fails, the run trains eagerly instead, evaluating every 10000 updates instead of 20000 (said so in
#   the log).
# side_by_side: scenario 2 (configs/experiments/scenario2_straight_capped.yaml, 7 env processes) and the scenario-1
#   recipe on the GPU with 7 env processes, at once.
# generalist: the generalist recipe (configs/experiments/generalist.yaml) on the whole machine for 6 minutes, 14 env
#   processes and the learner's own choice for the GPU; an evaluation every 8000 updates. Its last actor and those of
#   its three newest epochs come back, to be chosen among on the validation grid (docs/results.md) on any machine.
set -u
MODE=whole_box
DEVICE=cuda
EXTRA=()
while (($#)); do
  case $1 in
    whole_box | side_by_side | generalist) MODE=$1 ;;
    --device) DEVICE=$2; shift ;;
    --*) EXTRA+=("$1" "$2"); shift ;;
    *) echo "usage: bash bench/gpu_train.sh [whole_box | side_by_side | generalist] [--device cpu|cuda] [--opt v ...]"
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
  SIZE=(); TRAIN_LIMIT_S=480
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
else
  SIZE=(--trainer.accelerator cpu --trainer.max_time 00:00:00:40 --trainer.limit_train_batches 20 --data.num_envs 2
        --data.eval_episodes 1 --data.buffer_capacity 4000)
  TRAIN_LIMIT_S=400
fi

# Each run: its name (its TensorBoard run under runs/), then its config files and overrides.
ON_GPU=(--trainer.accelerator gpu)  # the scenario-1 recipe is written for a CPU
if [ "$MODE" = whole_box ]; then
  FAST=()
  if [ "$DEVICE" = cuda ]; then
    echo "== GPU tests of the graphed update (model.image_shift's shifts in it too) and of sampling on the GPU ($SECONDS s)"
    if ! timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
        -k "cuda_graph_update_matches or sampling_on_the_device or random_shift_recorded_in_a_cuda_graph"; then
      FAST=(--model.init_args.cuda_graph false --data.sample_on_device false --trainer.limit_train_batches 10000)
    fi
  else
    FAST=(--model.init_args.cuda_graph false --data.sample_on_device false)  # both are refused on a CPU
  fi
  echo "== training with ${FAST[*]:-the graphed update and sampling on the GPU} ${EXTRA[*]} ($SECONDS s)"
  RUNS=("gpu_whole_box_scenario1_curvy"
        "--config configs/experiments/scenario1_curvy_asymmetric.yaml ${ON_GPU[*]} --trainer.max_time 00:00:06:00
         --trainer.limit_train_batches 20000 --data.num_envs 14 --model.init_args.cuda_graph true
         --data.sample_on_device true ${FAST[*]}")
elif [ "$MODE" = generalist ]; then
  RUNS=("gpu_generalist" "--config configs/experiments/generalist.yaml ${ON_GPU[*]} --trainer.max_time 00:00:06:00
         --trainer.limit_train_batches 8000 --data.num_envs 14")
else
  RUNS=("gpu_scenario1_curvy" "--config configs/experiments/scenario1_curvy_asymmetric.yaml ${ON_GPU[*]}
         --trainer.max_time 00:00:05:30 --trainer.limit_train_batches 4000 --data.num_envs 7"
        "gpu_scenario2" "--config configs/experiments/scenario2_straight_capped.yaml")
fi

PIDS=()
for ((i = 0; i < ${#RUNS[@]}; i += 2)); do
  # One thread per process: the env processes and the learners share the 16 cores.
  OMP_NUM_THREADS=1 timeout "$TRAIN_LIMIT_S" python3 cli.py fit ${RUNS[i + 1]} --trainer.logger.init_args.name "${RUNS[i]}" \
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
  if [ "$MODE" = generalist ]; then  # its epochs' checkpoints are the candidates ($OUT takes 8 files in all)
    for epoch in $(ls -t runs/"$name"/version_*/checkpoints/epoch=*.ckpt 2>/dev/null | head -3); do
      base=$(basename "$epoch" .ckpt)
      python3 -m lightning_td3.export "$epoch" "$OUT/td3_${name}_${base//=/}.ckpt"  # '=' cannot come back
    done
  fi
done
tar -czf "$OUT/runs.tar.gz" --exclude='*.ckpt' --exclude=replay "${NAMES[@]}"
ls -la "$OUT"

BUDGET_S=$((END_S - SECONDS)) bash bench/gpu_suite.sh --device "$DEVICE"
