# Sourced by .ci/qemu10.sh and .ci/libvirt11.sh: unpack packages of Debian 12's
# bookworm-backports suite into a private prefix, beside the system's own versions.
# The .debs are fetched with apt-get download through a private sources list and lists
# directory (the machine's apt configuration is not touched) and unpacked with dpkg -x;
# nothing is installed, and their dependencies are Debian 12's own.
#   backports_unpack PREFIX PACKAGE...    PREFIX is emptied first
# It runs in a subshell (its own EXIT trap removes its work directory) and stops at the
# first command that fails.
backports_unpack() (
    set -euo pipefail
    prefix="$1"
    shift
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
    (cd "$work/debs" && apt-get "${apt[@]}" download "$@" >&2)
    rm -rf "$prefix"
    mkdir -p "$prefix"
    for deb in "$work"/debs/*.deb; do
        dpkg -x "$deb" "$prefix"
    done
)
