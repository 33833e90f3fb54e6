#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): the ds4 binary is built on the dev
# machine and carried in devbin/ (as ds4, or ds4.xz: the tree that travels is capped).
# Writes logs, CSVs and plots under $OUT (or ./gpu-out); at most 8 files come back.
#   usage: scripts/gpu/device_run.sh [selftest] [bench-q2] [bench-q4] [stream-q2] [serve] [plan]
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
ds4=devbin/ds4
# The carried binary may be xz-compressed (the working tree that travels is capped).
if [ -f devbin/ds4.xz ]; then xz -dc devbin/ds4.xz > devbin/ds4 && chmod +x devbin/ds4; fi
export DS4_CUBIN_CACHE="$out/cubin-cache"
# NVRTC / cuBLAS from the toolkit, or from the pip wheels of the image's python.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia,os;[print(os.path.join(p,"cu13","lib")) for p in nvidia.__path__]' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
ctxs="${CTX:-2048,32768}"
bench() { # quant
  # BENCH_FLAGS: extra bench flags, e.g. --decode-before
  $ds4 bench --synthetic "$1" --ctx "$ctxs" --gen "${GEN:-64}" ${BENCH_FLAGS:-} \
    --csv "$out/bench-$1.csv" --plot "$out/bench-$1.svg" 2>&1 | grep -v " INFO " | tee "$out/bench-$1.log"
  return "${PIPESTATUS[0]}"
}
serve() { # the real server on the GPU with the committed tiny model
  $ds4 serve -m fixtures/models/tiny-b-q8_0.gguf --backend cuda --port 8123 > "$out/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 60); do curl -s localhost:8123/v1/models > /dev/null && break; sleep 0.5; done
  curl -s localhost:8123/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0}' \
    | tee "$out/serve-reply.json"; echo
  kill $pid; wait $pid 2>/dev/null
  grep -E "model loaded|need " "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g'
}
steps="${*:-selftest bench-q2}"
rc=0
for s in $steps; do
  case "$s" in
    selftest) $ds4 selftest --cuda 2>&1 | grep -v " INFO " > "$out/selftest.log"; rc=$((rc | ${PIPESTATUS[0]})); grep -E "FAIL|^selftest|^model parity" "$out/selftest.log" ;;
    bench-q2) bench q2; rc=$((rc | $?)) ;;
    bench-q4) bench q4; rc=$((rc | $?)) ;;
    stream-q2) $ds4 bench --synthetic q2 --streaming --layers 24 --ctx "$ctxs" --csv "$out/stream-q2.csv" 2>&1 | tee "$out/stream-q2.log"; rc=$((rc | ${PIPESTATUS[0]})) ;;
    serve) serve ;;
    plan) for c in 32768 1048576; do $ds4 plan --synthetic q2 --ctx $c 2>&1 | tail -3; done | tee "$out/plan.log" ;;
    *) echo "unknown step $s"; rc=1 ;;
  esac
done
rm -rf "$out/cubin-cache"
exit $rc
