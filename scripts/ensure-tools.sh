#!/usr/bin/env bash
# Make sure the outside tools the tests run against are installed: Debian's prometheus package
# (the Prometheus server and promtool). Installed with apt when missing and apt is usable;
# otherwise the tests that need them are skipped, and this says how to get them. Never fails.
set -uo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "Prometheus is missing: installing Debian's prometheus package (server and promtool)" >&2
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus \
    || echo "could not install prometheus; its tests will be skipped" >&2
else
  echo "Prometheus is not installed and apt is not usable here: its tests will be skipped" \
       "(sudo apt-get install prometheus)" >&2
fi
exit 0
