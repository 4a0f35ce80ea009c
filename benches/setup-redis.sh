#!/usr/bin/env bash
# Installs Redis from Debian's packages if redis-server is missing (needs root
# or sudo). Used by `cargo bench --bench write_throughput`; never run by tests.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
# Debian's package may start a system service; the benchmark runs its own.
$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
command -v redis-server
