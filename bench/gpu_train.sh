#!/usr/bin/env bash
# Issue 5's GPU training in one device command (run tool: carry [".whl"], timeout_s 600): scenario 1 on the curvy
# layout and scenario 2, trained side by side from configs/experiments/h100.yaml (7 env processes each on the 16
# cores, one GPU shared), each run's best actor exported to $OUT, the TensorBoard runs packed into $OUT/runs.tar.gz;
# whatever time is left under the 10 minutes goes to the learner benchmark of issue 6 (bench/gpu_suite.sh).
#   here, once:  bash bench/gpu_wheels.sh
#   device:      bash bench/gpu_train.sh
#   dry run:     OUT=/tmp/train bash bench/gpu_train.sh --device cpu    (tiny sizes: checks every step on a CPU)
set -u
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE=$2
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

# name, then the overrides of h100.yaml that make the run
PIDS=()
RUNS=("h100_scenario1_curvy" ""
      "h100_scenario2" "--data.env.scenario 2 --data.env.layout straight")
for ((i = 0; i < ${#RUNS[@]}; i += 2)); do
  name=${RUNS[i]}
  # One thread per process: the 14 env processes and the 2 learners share the 16 cores.
  OMP_NUM_THREADS=1 timeout "$TRAIN_LIMIT_S" python3 cli.py fit --config configs/experiments/h100.yaml \
    --trainer.logger.init_args.name "$name" ${RUNS[i + 1]} "${SIZE[@]}" >"$OUT/$name.log" 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"   # the runs alone: a bare `wait` would also wait for the tee above, which never ends
echo "== training done at $SECONDS s"

for ((i = 0; i < ${#RUNS[@]}; i += 2)); do
  name=${RUNS[i]}
  grep -E "Error|error:|Traceback|stopped|Time limit" "$OUT/$name.log" | grep -v Warning | tail -5
  best=$(ls -t runs/"$name"/version_*/checkpoints/best-*.ckpt 2>/dev/null | head -1)
  echo "$name: best checkpoint ${best:-none}"
  [ -n "$best" ] && python3 -m lightning_td3.export "$best" "$OUT/td3_$name.ckpt"
done
tar -czf "$OUT/runs.tar.gz" --exclude='*.ckpt' --exclude=replay runs/h100_*
ls -la "$OUT"

BUDGET_S=$((END_S - SECONDS)) bash bench/gpu_suite.sh --device "$DEVICE"
