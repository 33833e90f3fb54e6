#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): the ds4 binary is built on the dev
# machine and carried in devbin/. Writes logs under $OUT (or ./gpu-out).
#   usage: scripts/gpu/device_run.sh [selftest] [bench-q2] [bench-q4] [ncu]
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
# devbin/ds4 (the real CLI) when it was built, else the crate's example driver.
if [ -x devbin/ds4 ]; then
  sel() { devbin/ds4 selftest --cuda; }
  ben() { devbin/ds4 bench --synthetic "$1" --layers "$2" --ctx 2048,32768 --csv "$3"; }
else
  sel() { devbin/cuda_tool selftest; }
  ben() { devbin/cuda_tool bench "$1" "$2" 2048,32768 50 "$3"; }
fi
export DS4_CUBIN_CACHE="$out/cubin-cache"
# NVRTC / cuBLAS from the toolkit, or from the pip wheels of the image's python.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia,os;[print(os.path.join(p,"cu13","lib")) for p in nvidia.__path__]' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/nvidia-smi.txt"
steps="${*:-selftest bench-q2}"
rc=0
for s in $steps; do
  case "$s" in
    selftest) sel 2>&1 | tee "$out/selftest.log"; rc=$((rc | ${PIPESTATUS[0]})) ;;
    bench-q2) ben q2 "${LAYERS_Q2:-24}" "$out/bench-q2.csv" 2>&1 | tee "$out/bench-q2.log"; rc=$((rc | ${PIPESTATUS[0]})) ;;
    bench-q4) ben q4 "${LAYERS_Q4:-12}" "$out/bench-q4.csv" 2>&1 | tee "$out/bench-q4.log"; rc=$((rc | ${PIPESTATUS[0]})) ;;
    *) echo "unknown step $s"; rc=1 ;;
  esac
done
rm -rf "$out/cubin-cache"
exit $rc
