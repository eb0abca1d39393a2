#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): engine = naive on CUDA for AlexNet and ResNet-50 in
# float32 and reduced precision, the engine's speed, the alexnet_conv1 preset end to end on a
# generated 1000-class JPEG tree, and every script with device=cuda. One table; at most about
# 8 minutes on one GPU. Run from the repo root after scripts/setup_venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 .venv/bin/python benchmarks/gpu_check.py --device "${1:-cuda}" "${@:2}"
