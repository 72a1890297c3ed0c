#!/usr/bin/env bash
# The GPU session of issue 18, on the lent GPU machine, from the repository root:
#
#   here:   bash bench/gpu_wheels.sh         (once: the wheels its image lacks, into .whl/)
#   device: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Installs the carried wheels into /tmp/site (opacus, nibabel, Flower and what Flower imports),
# then runs bench/gpu_session.py: every number lands in $OUT/gpu_session.json (rewritten after
# each section), the log in $OUT/gpu_session.log. Extra arguments go to gpu_session.py
# (e.g. --budget-s 400, --only dp_step). Budgeted to finish in under 8 minutes on an H200.
# PYTHON (default python3, the image's) and WHEELS (default .whl) can be set, e.g. to check
# this script on a CPU: PYTHON=.venv/bin/python WHEELS=none bash bench/gpu_session.sh --device
# cpu --tiny.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./gpu-out}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || echo "warning: the carried wheels did not all install"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PYTHON" bench/gpu_session.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_session.log"
