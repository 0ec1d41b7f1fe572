#!/usr/bin/env bash
# Install libvirt 11.3 from Debian 12's bookworm-backports suite into a private prefix, beside
# Debian's libvirt 9.0 (which stays the system one and keeps driving QEMU 7.2): libvirt 9.0
# cannot drive QEMU 10.0, libvirt 11.3 can. Its .debs are fetched with apt-get download
# through a private sources list and lists directory, and unpacked with dpkg -x, as
# .ci/qemu10.sh does for QEMU. Debian 12's libraries satisfy it (checked with ldd).
# tests/support/libvirtd.py starts PREFIX/usr/sbin/libvirtd with LD_LIBRARY_PATH and
# LIBVIRT_DRIVER_DIR pointing into the prefix and PREFIX/usr/share/libvirt bind-mounted
# over /usr/share/libvirt in its private mount namespace (docs/libvirt.md). Prints the
# prefix (for PYVHOST_LIBVIRT).
#   .ci/libvirt11.sh [PREFIX]      default: ~/.cache/pyvhost/libvirt-11.3 (kept between runs)
set -euo pipefail
prefix="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost/libvirt-11.3}"
libdir="$prefix/usr/lib/x86_64-linux-gnu"
daemon="$prefix/usr/sbin/libvirtd"
if [[ -x "$daemon" ]] && LD_LIBRARY_PATH="$libdir" "$daemon" --version 2>/dev/null \
        | grep -q " 11\.3\."; then
    echo "$prefix"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The machine's own Debian mirror (deb822 or one-line sources), with the backports suite.
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
if [[ -z "$mirror" ]]; then
    mirror="$(awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
[[ -n "$mirror" ]] || { echo "no Debian mirror in /etc/apt sources" >&2; exit 1; }
echo "deb $mirror bookworm-backports main" > "$work/sources.list"
mkdir -p "$work/lists/partial" "$work/debs"
apt=(-q -o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=-
     -o Dir::State::Lists="$work/lists" -o APT::Get::List-Cleanup=0
     -o APT::Sandbox::User=root)
apt-get "${apt[@]}" update >&2
# The library, the monolithic daemon (11.3's Debian packages ship libvirtd, no virtqemud),
# the QEMU driver module, cpu_map and schemas (libvirt-common), and virsh for debugging.
# Their other dependencies (libjson-c5, libnuma1, ...) are Debian 12's own.
(cd "$work/debs" && apt-get "${apt[@]}" download \
    libvirt0 libvirt-common libvirt-daemon libvirt-daemon-common \
    libvirt-daemon-driver-qemu libvirt-clients >&2)
rm -rf "$prefix"
mkdir -p "$prefix"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$prefix"
done
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
