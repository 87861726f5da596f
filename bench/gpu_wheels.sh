#!/usr/bin/env bash
# Wheels the device image (Python 3.12, torch, Lightning, tensorboard, pytest already there) lacks, into .whl/ (which
# .git/info/exclude ignores), for bench/gpu_suite.sh to install there. Run here, once, from the repo root.
set -eu
grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" || echo '/.whl/' >>"$(git rev-parse --git-common-dir)/info/exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  gymnasium==1.4.0 farama-notifications==0.0.6 highway-env==1.12.1 pygame-ce==2.5.8 jsonargparse==4.53.0 \
  docstring-parser==0.18.0 typeshed-client==2.15.0 stable-baselines3==2.9.2 carla==0.9.16
ls .whl
