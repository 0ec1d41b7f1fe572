#!/bin/sh
# /bin/pyvhost-guest: the test guest's helpers, run by the host over the command channel
# (pyvhost.lab.guest.GuestConsole has one method for each). busybox sh only.
set -u

blocks() {
    # "block_size_bytes HEX", then one line per memory block: "INDEX STATE ONLINE ZONES".
    echo "block_size_bytes $(cat /sys/devices/system/memory/block_size_bytes)"
    for b in /sys/devices/system/memory/memory*; do
        zones=$(cat "$b/valid_zones" 2>/dev/null | tr ' ' ',')
        echo "${b##*memory} $(cat "$b/state") $(cat "$b/online") ${zones:-none}"
    done
}

online() {
    # online INDEX [online|online_kernel|online_movable]
    echo "${2:-online_movable}" >"/sys/devices/system/memory/memory$1/state"
}

offline() {
    echo offline >"/sys/devices/system/memory/memory$1/state"
}

hog() {
    # hog MIB: keep MIB more MiB of RAM busy in a tmpfs (no swap: the pages stay resident).
    # The tmpfs is (re)sized to MemTotal, which grows with hot-added memory.
    total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    if grep -q ' /hog ' /proc/mounts; then
        mount -o "remount,size=${total_kb}k" /hog
    else
        mount -t tmpfs -o "size=${total_kb}k,mode=0700" hog /hog
    fi
    n=$(ls /hog | wc -l)
    if ! dd if=/dev/zero of="/hog/fill.$n" bs=1048576 count="$1" 2>/tmp/hog.err; then
        cat /tmp/hog.err
        exit 1
    fi
    tail -n 1 /tmp/hog.err
    du -sk /hog
}

unhog() {
    rm -f /hog/fill.*
    du -sk /hog 2>/dev/null || true
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    blocks) blocks ;;
    online) online "$@" ;;
    offline) offline "$@" ;;
    hog) hog "$@" ;;
    unhog) unhog ;;
    *) echo "usage: pyvhost-guest blocks|online INDEX [STATE]|offline INDEX|hog MIB|unhog" >&2; exit 2 ;;
esac
