#!/usr/bin/env bash
# Make sure Fashion-MNIST is on disk: Debian's dataset-fashion-mnist package, installed with apt
# when it is missing and apt is usable; otherwise say how to get it. Never fails the caller when
# the data is already there.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "Fashion-MNIST is missing: installing Debian's dataset-fashion-mnist package" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
else
  cat >&2 <<MSG
Fashion-MNIST is missing from $DIR and apt is not usable here.
Either install it:   sudo apt-get install dataset-fashion-mnist
or download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist
into a folder and pass it with --data-dir (collage train/eval --dataset idx --data-dir DIR).
MSG
  exit 1
fi
