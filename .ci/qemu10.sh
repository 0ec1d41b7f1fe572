#!/usr/bin/env bash
# Install QEMU 10.0 from Debian 12's bookworm-backports suite into a private prefix, beside
# Debian's QEMU 7.2 (which stays the system one): its .debs are fetched with apt-get
# download through a private sources list and lists directory, and unpacked with dpkg -x.
# Debian 12's libraries satisfy it. Prints the binary's path (for PYVHOST_QEMU).
#   .ci/qemu10.sh [PREFIX]      default: ~/.cache/pyvhost/qemu-10.0 (kept between runs)
set -euo pipefail
prefix="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost/qemu-10.0}"
binary="$prefix/usr/bin/qemu-system-x86_64"
if [[ -x "$binary" ]] && "$binary" --version | grep -q "version 10\.0\."; then
    echo "$binary"
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
(cd "$work/debs" && apt-get "${apt[@]}" download \
    qemu-system-x86 qemu-system-common qemu-system-data >&2)
rm -rf "$prefix"
mkdir -p "$prefix"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$prefix"
done
"$binary" --version >&2
echo "$binary"
