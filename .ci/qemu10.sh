#!/usr/bin/env bash
# Install QEMU 10.0 from Debian 12's bookworm-backports suite into a private prefix, beside
# Debian's QEMU 7.2 (which stays the system one): its .debs are fetched and unpacked by
# .ci/backports.sh. Debian 12's libraries satisfy it. Prints the binary's path (for PYVHOST_QEMU).
#   .ci/qemu10.sh [PREFIX]      default: ~/.cache/pyvhost/qemu-10.0 (kept between runs)
set -euo pipefail
# shellcheck source=.ci/backports.sh
source "$(dirname "$0")/backports.sh"
prefix="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost/qemu-10.0}"
binary="$prefix/usr/bin/qemu-system-x86_64"
if [[ -x "$binary" ]] && "$binary" --version | grep -q "version 10\.0\."; then
    echo "$binary"
    exit 0
fi
backports_unpack "$prefix" qemu-system-x86 qemu-system-common qemu-system-data
"$binary" --version >&2
echo "$binary"
