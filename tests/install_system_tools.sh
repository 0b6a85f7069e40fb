#!/usr/bin/env bash
# The system tools a few tests drive for real, installed when missing: Prometheus (a test scrapes a
# live server's /metrics with it) and promtool (checks and unit-tests the alert rules). Debian's
# `prometheus` package carries both. README's test command runs this first, and so does CI.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_tools: no apt-get here; install Prometheus (prometheus and promtool on PATH)" \
       "with your package manager, or the tests that need it will fail" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install_system_tools: not root and no sudo; run 'apt-get install -y prometheus' as root" >&2
    exit 0
  fi
fi
echo "install_system_tools: installing Debian's prometheus package (prometheus, promtool)" >&2
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
