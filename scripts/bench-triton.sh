#!/usr/bin/env bash
# The front end's overhead in front of a real Triton, beside its overhead in front of its own
# worker: starts Triton (nvidia-pytriton from .venv-triton, `make setup` builds it) serving the
# shipped s-CNN ONNX file in its own tensors on loopback, runs `collage bench-serving
# --v2-server` against it with any extra flags given here, and stops Triton.
#
#   scripts/bench-triton.sh [--repeats 6 --json ...]
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_PY=.venv-triton/bin/python
MODEL=models/fashion-mnist/scnn.onnx
PORT=${TRITON_PORT:-18900}  # and PORT+1 (gRPC), PORT+2 (metrics)
if [ ! -x "$TRITON_PY" ]; then
  echo "error: $TRITON_PY is missing; run \`make setup\` (it builds .venv-triton where it can)" >&2
  exit 2
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "error: port $PORT is taken (Triton uses it and the next two); set TRITON_PORT" >&2
  exit 2
fi
LIBDIR=$("$TRITON_PY" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
LOG=$(mktemp)
# The Python backend Triton runs links libpython: it needs the interpreter's LIBDIR.
LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" setsid "$TRITON_PY" \
  examples/triton/pytriton_server.py "$PORT" "scnn=$MODEL" >"$LOG" 2>&1 &
TRITON=$!
stop() {  # the whole session: tritonserver and its Python backend stub outlive a killed parent
  kill -TERM -- "-$TRITON" 2>/dev/null
  for _ in $(seq 100); do kill -0 -- "-$TRITON" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$TRITON" 2>/dev/null
  rm -f "$LOG"
}
trap stop EXIT
for _ in $(seq 240); do
  grep -q "^ready on" "$LOG" && break
  if ! kill -0 "$TRITON" 2>/dev/null; then
    echo "error: Triton did not start:" >&2
    tail -n 30 "$LOG" >&2
    exit 2
  fi
  sleep 0.5
done
grep -q "^ready on" "$LOG" || { echo "error: Triton not ready after 120 s" >&2; exit 2; }
.venv/bin/collage bench-serving --v2-server "http://127.0.0.1:$PORT#scnn@$MODEL" "$@"
