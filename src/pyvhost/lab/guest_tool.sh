#!/bin/sh
# /bin/pyvhost-guest: the test guest's helpers, run by the host over the command channel
# (pyvhost.lab.guest.GuestConsole has one method for each). busybox sh only.
set -u
# Seconds between RUNNING lines while a command runs (pyvhost.lab.channel.HEARTBEAT).
HEARTBEAT=2

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

serve() {
    # serve [STATE_DIR]: the guest side of the command channel (pyvhost.lab.channel has
    # the format), on stdin and stdout; /init runs it for good. For each line
    # "ID/ATTEMPT LIMIT BASE64 MD5": if MD5 is not the md5sum of "ID/ATTEMPT LIMIT BASE64"
    # the line lost or changed bytes on the way in and is not run ("PYVHOST-GARBLED");
    # else "PYVHOST-BEGIN ID/ATTEMPT" at once, then the command (sh -c, killed after LIMIT
    # seconds) with "PYVHOST-RUNNING ID/ATTEMPT" every HEARTBEAT seconds meanwhile, then
    # its output (carriage returns removed) and "\nPYVHOST-END ID/ATTEMPT CODE LENGTH MD5"
    # (the output's bytes and md5sum, for the host to check). A command is run once:
    # another attempt of the ID run last gets that run's output and code again, so the
    # host may send a command again whenever a line or an answer was lost or damaged.
    state=${1:-/tmp}
    last=""
    while :; do
        if ! read -r id limit enc sum; then
            # A virtio-serial port reads end-of-file while no host is connected.
            sleep 0.2
            continue
        fi
        case "$id" in "" | PYVHOST-*) continue ;; esac
        got=$(printf '%s %s %s' "$id" "$limit" "$enc" | md5sum)
        if [ "${got%% *}" != "$sum" ]; then
            printf 'PYVHOST-GARBLED %.40s\n' "$id"
            continue
        fi
        case "$limit" in "" | *[!0-9]*) limit=60 ;; esac
        echo "PYVHOST-BEGIN $id"
        if [ "${id%/*}" != "$last" ]; then
            last=${id%/*}
            # A new file each time: what a killed command's children still write goes to
            # the old one, not into the next answer.
            rm -f "$state/.pyvhost-raw" "$state/.pyvhost-out"
            # The heartbeat: the host tells a lost END line from a slow command by it.
            (while sleep "$HEARTBEAT"; do echo "PYVHOST-RUNNING $id"; done) &
            beat=$!
            timeout -s KILL "$limit" sh -c "$(echo "$enc" | base64 -d 2>/dev/null)" \
                </dev/null >"$state/.pyvhost-raw" 2>&1
            code=$?
            # Stopped (and reaped) before the output is printed: no RUNNING line inside it.
            kill "$beat" 2>/dev/null
            wait "$beat" 2>/dev/null
            # The host's transcript drops "\r" (a tty may add it): the output it is checked
            # against has none either.
            tr -d '\r' <"$state/.pyvhost-raw" >"$state/.pyvhost-out"
            digest=$(md5sum <"$state/.pyvhost-out")
            echo "$code $(($(wc -c <"$state/.pyvhost-out"))) ${digest%% *}" \
                >"$state/.pyvhost-rc"
        fi
        cat "$state/.pyvhost-out" 2>/dev/null
        read -r code size digest <"$state/.pyvhost-rc"
        printf '\nPYVHOST-END %s %s %s %s\n' "$id" "$code" "$size" "$digest"
    done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    blocks) blocks ;;
    online) online "$@" ;;
    offline) offline "$@" ;;
    hog) hog "$@" ;;
    unhog) unhog ;;
    serve) serve "$@" ;;
    *) echo "usage: pyvhost-guest blocks|online INDEX [STATE]|offline INDEX|hog MIB|unhog|serve [DIR]" >&2; exit 2 ;;
esac
