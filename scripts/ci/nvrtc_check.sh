#!/usr/bin/env bash
# CI: NVRTC-compile every kernel in crates/cuda/kernels for sm_90a, using the
# nvidia-cuda-nvrtc / nvidia-cuda-runtime 13.0 PyPI wheels in a private venv
# (no CUDA toolkit, no GPU). Skips with a message when the wheels can't be had.
set -uo pipefail
cd "$(dirname "$0")/../.."
venv="${DS4_NVRTC_VENV:-${TMPDIR:-/tmp}/ds4-nvrtc-venv}"
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    echo "nvrtc_check: SKIP: python3 -m venv not available"; exit 0
  fi
fi
if ! "$venv/bin/python" -c 'import nvidia' >/dev/null 2>&1 || \
   ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.* >/dev/null 2>&1; then
  if ! "$venv/bin/python" -m pip install -q 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*'; then
    echo "nvrtc_check: SKIP: could not install the nvidia-cuda-nvrtc wheel"; exit 0
  fi
fi
"$venv/bin/python" scripts/ci/nvrtc_check.py
rc=$?
if [ $rc -eq 2 ]; then echo "nvrtc_check: SKIP (NVRTC not found)"; exit 0; fi
exit $rc
