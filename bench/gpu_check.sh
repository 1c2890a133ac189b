#!/usr/bin/env bash
# GPU path check, run on a CUDA machine from the project root: installs polarocc, then runs the same stage
# functions on cpu and cuda (default Lite0 textures and a 1792-channel random-weight Wide-ResNet50 store) and
# compares features, weights and AUROC. Writes reports/gpu_check.md; exits non-zero when a check fails.
# Without CUDA it checks that asking for cuda is a clear error and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import polarocc" 2>/dev/null || pip install -q -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python bench/gpu_check.py --workdir "${GPU_CHECK_WORKDIR:-/tmp/polarocc_gpu_check}" --out reports/gpu_check.md "$@"
