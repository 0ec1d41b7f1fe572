#!/usr/bin/env bash
# Install libvirt 11.3 from Debian 12's bookworm-backports suite into a private prefix, beside
# Debian's libvirt 9.0 (which stays the system one and keeps driving QEMU 7.2): libvirt 9.0
# cannot drive QEMU 10.0, libvirt 11.3 can. Its .debs are fetched and unpacked as
# .ci/qemu10.sh does for QEMU (.ci/backports.sh). Debian 12's libraries satisfy it
# (checked with ldd).
# tests/support/libvirtd.py starts PREFIX/usr/sbin/libvirtd with LD_LIBRARY_PATH and
# LIBVIRT_DRIVER_DIR pointing into the prefix and PREFIX/usr/share/libvirt bind-mounted
# over /usr/share/libvirt in its private mount namespace (docs/libvirt.md). Prints the
# prefix (for PYVHOST_LIBVIRT).
#   .ci/libvirt11.sh [PREFIX]      default: ~/.cache/pyvhost/libvirt-11.3 (kept between runs)
set -euo pipefail
# shellcheck source=.ci/backports.sh
source "$(dirname "$0")/backports.sh"
prefix="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost/libvirt-11.3}"
libdir="$prefix/usr/lib/x86_64-linux-gnu"
daemon="$prefix/usr/sbin/libvirtd"
if [[ -x "$daemon" ]] && LD_LIBRARY_PATH="$libdir" "$daemon" --version 2>/dev/null \
        | grep -q " 11\.3\."; then
    echo "$prefix"
    exit 0
fi
# The library, the monolithic daemon (11.3's Debian packages ship libvirtd, no virtqemud),
# the QEMU driver module, cpu_map and schemas (libvirt-common), and virsh for debugging.
# Their other dependencies (libjson-c5, libnuma1, ...) are Debian 12's own.
backports_unpack "$prefix" libvirt0 libvirt-common libvirt-daemon libvirt-daemon-common \
    libvirt-daemon-driver-qemu libvirt-clients
missing="$(LD_LIBRARY_PATH="$libdir" ldd "$daemon" "$prefix/usr/bin/virsh" \
    "$libdir/libvirt/connection-driver/libvirt_driver_qemu.so" | grep "not found" || true)"
if [[ -n "$missing" ]]; then
    echo "libvirt 11.3 needs libraries Debian 12 does not have:" >&2
    echo "$missing" >&2
    rm -rf "$prefix"
    exit 1
fi
LD_LIBRARY_PATH="$libdir" "$daemon" --version >&2
echo "$prefix"
