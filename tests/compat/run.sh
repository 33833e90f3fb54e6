#!/usr/bin/env bash
# Runs the official openai / anthropic Python SDKs against a live `ds4 serve --scripted`.
# Creates the venv if needed (COMPAT_VENV, default /opt/compat-venv), builds ds4, starts
# the server on a free port, runs pytest, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${COMPAT_VENV:-/opt/compat-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r tests/compat/requirements.txt
cargo build -q -p ds4 --bin ds4
BIN="${CARGO_TARGET_DIR:-target}/debug/ds4"
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG=$(mktemp)
"$BIN" serve --scripted tests/compat/script.json --host 127.0.0.1 --port "$PORT" --api-key compat-key >"$LOG" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 100); do
  if "$VENV/bin/python" -c "import httpx,sys; sys.exit(0 if httpx.get('http://127.0.0.1:$PORT/health').status_code==200 else 1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$PID" 2>/dev/null; then cat "$LOG"; echo "ds4 serve exited"; exit 1; fi
  sleep 0.2
done
DS4_BASE="http://127.0.0.1:$PORT" DS4_KEY=compat-key "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/compat
