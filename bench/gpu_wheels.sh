#!/usr/bin/env bash
# Download, HERE (where PyPI is reachable), the wheels the GPU machine's image lacks, for its
# Python 3.12 (x86-64), into .whl/ (git-ignored). Then carry `.whl`
# in the device call that runs bench/gpu_session.sh, which installs them into /tmp/site.
#
# The image has torch, numpy, scipy, matplotlib, pillow, requests, httpx, anyio, pyyaml,
# pathspec, click... but not opacus, nibabel or Flower and Flower's import-time needs (read off
# `import flwr.simulation` here). Ray (flwr[simulation]) is 74 MB for cp312, over the 64 MiB a
# call may carry: the study runs Flower's engine in-process instead (--simulation in-process).
# Versions are this project's venv's; protobuf and grpcio are carried because Flower 1.42's
# generated code needs protobuf >= 5.29 and grpcio >= 1.70.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/main/.venv/bin/python}
WHEELS=(
  opacus==1.6.0 nibabel==5.4.2 flwr==1.42.0
  protobuf==6.33.6 grpcio==1.85.3 grpcio-health-checking==1.81.1
  cryptography==50.0.2 cffi==2.1.1 pycryptodome==3.24.1 iterators==0.0.2
  sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3
  fastapi==0.138.2 starlette==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  tomli==2.5.0 tomli-w==1.2.0 typer==0.20.1 rich==14.3.4
)
PLATFORMS=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
du -sh .whl
