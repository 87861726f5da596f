#!/usr/bin/env bash
# Every GPU measurement of the learner against Stable-Baselines3 in one command, at most 8 minutes
# (BUDGET_S) on one H100 with 16 cores; everything it prints also lands in $OUT/suite.txt.
#   here, once:  bash bench/gpu_wheels.sh                      (the device image lacks gymnasium, highway-env, SB3 ...)
#   device:      bash bench/gpu_suite.sh                       (run tool: carry [".whl"], timeout_s 600)
#   dry run:     OUT=/tmp/suite bash bench/gpu_suite.sh --device cpu   (tiny sizes: checks every step on a CPU)
# Each step has its own time limit, and a step that would end past BUDGET_S is skipped (said so in the log).
set -u
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE=$2
OUT=${OUT:-/tmp/gpu_suite}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
exec > >(tee "$OUT/suite.txt") 2>&1

source bench/gpu_env.sh

if [ "$DEVICE" = cuda ]; then
  LEARNER="--device cuda"                       # 3 rounds x 500 timed updates at batch 256, each side
  LEARNER_CPU="--device cpu --rounds 2 --updates 10"
  COLLECT="--max-procs $(nproc) --seconds 8"
  E2E="--device cuda --num-envs 8 --learning-starts 1000 --updates 3000"
else
  LEARNER="--device cpu --rounds 1 --updates 2 --warmup 1 --batch-size 32 --transitions 300"
  LEARNER_CPU="$LEARNER"
  COLLECT="--max-procs 2 --seconds 2"
  E2E="--device cpu --learning-starts 20 --updates 4 --batch-size 32"
fi

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if ((SECONDS + limit > BUDGET_S)); then
    echo "== $name: SKIPPED ($SECONDS s used, it may take $limit s, budget $BUDGET_S s)"
    return
  fi
  echo "== $name ($SECONDS s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^ *warn\(|^$"
  echo "-- $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step info 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  python3 -c 'import torch, pytorch_lightning, stable_baselines3; print(\"torch\", torch.__version__,
  \"lightning\", pytorch_lightning.__version__, \"sb3\", stable_baselines3.__version__, \"cuda\", torch.cuda.is_available())'"
# Most important first: a step that no longer fits the budget is skipped, not cut.
if [ "$DEVICE" = cuda ]; then  # model.cuda_graph and data.sample_on_device are refused on a CPU: GPU steps only
  # Correctness of the graphed update against the eager one and of sampling on the GPU against the host's, then the
  # learner's own choice for one GPU (graphs, bf16 CNNs in channels-last, sampling on the GPU) against SB3, end to
  # end, and its parts in float32 (--no-speedups): the graphs with sampling on the GPU, the graphed update alone
  # against the eager one (one fixed batch), and the former default (eager, batches copied from the host).
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  step learner 120 python3 bench/learner.py $LEARNER
  # Where the graphed update's milliseconds go: the kernels' time per update against the wall time per update.
  step learner_profile 90 python3 bench/learner.py $LEARNER --skip-sb3 --rounds 1 --profile
  step e2e 180 python3 bench/e2e.py $E2E
  step learner_float32_graph_device_sampling 120 python3 bench/learner.py $LEARNER --no-speedups --cuda-graph \
    --sample-on-device
  step learner_float32_cuda_graph 80 python3 bench/learner.py $LEARNER --skip-sb3 --no-speedups --fixed-batch \
    --cuda-graph
  step learner_float32_eager 80 python3 bench/learner.py $LEARNER --skip-sb3 --no-speedups --fixed-batch
  step learner_float32_eager_host_sampling 120 python3 bench/learner.py $LEARNER --no-speedups --host-sampling
  step overlap 150 python3 bench/overlap.py --device cuda --num-envs 14 --learning-starts 1000 --updates 3000 \
    --batch-size 256 --rounds 1
  step collect 120 python3 bench/collect.py $COLLECT
  step learner_compile 150 python3 bench/learner.py $LEARNER --no-speedups --channels-last --bf16-cnn --compile
else
  step learner 100 python3 bench/learner.py $LEARNER
  step collect 120 python3 bench/collect.py $COLLECT
  step e2e 180 python3 bench/e2e.py $E2E
  step learner_fixed_batch 80 python3 bench/learner.py $LEARNER --skip-sb3 --fixed-batch
  step learner_float32 100 python3 bench/learner.py $LEARNER --no-speedups
  step learner_compile 150 python3 bench/learner.py $LEARNER --no-speedups --channels-last --bf16-cnn --compile
fi
step learner_cpu 90 python3 bench/learner.py $LEARNER_CPU
echo "== done in $SECONDS s"
