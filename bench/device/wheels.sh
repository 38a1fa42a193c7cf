#!/usr/bin/env bash
# Gathers into .whl/ (ignored by git) what `optserve bench gpu` needs on a bare device machine
# that cannot reach a package registry: optserve itself, and the packages its image lacks
# or holds in an older version, at the versions CI tests. bench/README.md says how to use it.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip wheel -q --no-deps -w .whl .                 # optserve, from this checkout
"$PY" -m pip wheel -q --no-deps -w .whl adamp==0.3.0      # an sdist: built here (pure Python)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
  lion-pytorch==0.2.5
ls -l .whl
du -sh .whl
