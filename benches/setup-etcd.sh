#!/usr/bin/env bash
# Installs etcd from Debian's packages if etcd is missing (needs root or
# sudo). Used by `cargo bench --bench cluster_throughput`; never run by tests.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
# Debian's package may start a system service; the benchmark runs its own.
$SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
command -v etcd
