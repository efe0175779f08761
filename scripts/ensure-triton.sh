#!/usr/bin/env bash
# Build .venv-triton: the real V2 servers the front end is tested in front of, in their own
# environment (nvidia-pytriton needs numpy < 2, the project numpy 2): Triton Inference Server as
# nvidia-pytriton bundles it, and KServe's Python model server. Where they cannot be installed
# (no network, another platform) their tests are skipped with the reason. Never fails.
set -uo pipefail
VENV=.venv-triton
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import pytriton, kserve, onnxruntime" 2>/dev/null; then
  exit 0
fi
echo "building $VENV (Triton through nvidia-pytriton, KServe) for the tests in front of real servers" >&2
if ! { "$PYTHON" -m venv "$VENV" \
    && "$VENV/bin/pip" install --quiet "numpy<2" "onnxruntime>=1.18" "nvidia-pytriton==0.7.0" "kserve==0.21.0"; }; then
  echo "could not build $VENV; the tests in front of Triton and KServe will be skipped" >&2
  rm -rf "$VENV"
fi
exit 0
