#!/usr/bin/env bash
# Make sure the outside tools the tests run against are installed: Debian's prometheus package
# (the Prometheus server and promtool) and chromium (the headless browser the dashboard test
# drives). Installed with apt when missing and apt is usable; otherwise the tests that need them
# are skipped, and this says how to get them. Never fails.
set -uo pipefail
missing=()
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "missing: ${missing[*]}; installing Debian's packages" >&2
  $SUDO apt-get update -qq || true
  for package in "${missing[@]}"; do
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$package" \
      || echo "could not install $package; the tests that need it will be skipped" >&2
  done
else
  echo "${missing[*]} not installed and apt is not usable here: the tests that need them will be" \
       "skipped (sudo apt-get install ${missing[*]})" >&2
fi
exit 0
