#!/usr/bin/env bash
# throughput.py's GPU case (a, b' and c; b needs Ray, whose wheel does not fit a device call) in one device call.
#
#   bash benchmarks/device_throughput.sh prepare   # here: lightly's wheel and the benchmark's images into .device/
#   then, with the device tool: run(command="bash benchmarks/device_throughput.sh run", carry=[".device"],
#                                   timeout_s=540)
#
# prepare: lightly's wheel at this checkout's version (its transforms, losses and momentum update import nothing the
# device image lacks, so it installs without its dependencies) and ../shared/datasets/tiny32_test_unlabeled.npz
# (29 MB; ../shared does not travel with the checkout). run: installs the wheel into /tmp/site and writes the GPU's
# name and the output of throughput.py (reading the images from .device/datasets) to $OUT (gpu.txt, throughput.log).
# WINDOW_SECONDS (default 20) sets --seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
images=tiny32_test_unlabeled.npz
case "${1:-}" in
  prepare)
    version=$(python -c "import lightly; print(lightly.__version__)")
    rm -rf .device && mkdir -p .device/whl .device/datasets
    python -m pip download -q --no-deps --only-binary=:all: -d .device/whl "lightly==$version"
    cp "../shared/datasets/$images" .device/datasets/
    du -sh .device
    ;;
  run)
    : "${OUT:?run is for the device machine, where OUT names the folder that comes back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 benchmarks/throughput.py --no-ray --datasets .device/datasets --seconds "${WINDOW_SECONDS:-20}" --rounds 3 \
      --work-dir /tmp/throughput 2>&1 | tee "$OUT/throughput.log"
    ;;
  *)
    echo "usage: bash $0 prepare|run" >&2
    exit 2
    ;;
esac
