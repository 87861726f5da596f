# Sourced by the device scripts: makes the device image (Python 3.12, torch, Lightning, tensorboard) able to run the
# project, from the wheels that bench/gpu_wheels.sh put into .whl/ here (the run tool carries them: carry [".whl"]).
if ! python3 -c "import stable_baselines3, highway_env, jsonargparse, carla" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD SDL_VIDEODRIVER=dummy PYTHONUNBUFFERED=1
