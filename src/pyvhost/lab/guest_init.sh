#!/bin/sh
# /init of pyvhost's test guest (busybox sh, PID 1). Built into the initramfs by
# pyvhost.lab.image; the host side of its command channel is pyvhost.lab.guest.
#
# Kernel command line (read from /proc/cmdline):
#   pyvhost.ip=ADDR/LEN    address for eth0 (none: eth0 is only brought up)
#   pyvhost.mac=MAC        MAC address for eth0 (default: the device's own)
#   pyvhost.channel=CHAN   where commands come from: ttyS0 (default), hvc0, any /dev name,
#                          or port:NAME for a virtio-serial port named NAME
#
# Console lines: PYVHOST-MODULES, PYVHOST-NET, PYVHOST-READY (on the console and on the
# channel). Then it serves commands on the channel for good: `pyvhost-guest serve`
# (guest_tool.sh) reads "ID/ATTEMPT LIMIT BASE64-COMMAND MD5" lines and answers
# "PYVHOST-BEGIN ID/ATTEMPT", "PYVHOST-RUNNING ID/ATTEMPT" every few seconds while the
# command runs, its output and "\nPYVHOST-END ID/ATTEMPT CODE LENGTH MD5".
/bin/busybox mkdir -p /proc /sys /dev /tmp /hog /bin
/bin/busybox --install -s /bin
export PATH=/bin HOME=/ TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
# Only emergencies on the console: kernel lines must not interleave with framed output.
dmesg -n 1

arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

failed=""
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || failed="$failed $m"
done
echo "PYVHOST-MODULES $(cat /lib/modules/order | tr '\n' ' ')failed:${failed:- none}"

ip link set lo up
# A virtio-net device (PCI 1af4:1000 or 1af4:1041) should give eth0; give its probe a moment.
has_virtio_net() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor" 2>/dev/null)" = 0x1af4 ] || continue
        case "$(cat "$d/device" 2>/dev/null)" in 0x1000 | 0x1041) return 0 ;; esac
    done
    return 1
}
if has_virtio_net; then
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fi
if [ -e /sys/class/net/eth0 ]; then
    mac=$(arg pyvhost.mac) && ip link set eth0 address "$mac"
    addr=$(arg pyvhost.ip) && ip addr add "$addr" dev eth0
    ip link set eth0 up
    echo "PYVHOST-NET eth0 $(cat /sys/class/net/eth0/address) ${addr:-none}"
else
    echo "PYVHOST-NET none"
fi

chan=$(arg pyvhost.channel) || chan=ttyS0
case "$chan" in
    port:*)
        want=${chan#port:}
        dev=""
        i=0
        while [ -z "$dev" ] && [ $i -lt 100 ]; do
            for p in /sys/class/virtio-ports/*; do
                [ "$(cat "$p/name" 2>/dev/null)" = "$want" ] && dev=/dev/${p##*/}
            done
            [ -n "$dev" ] || { sleep 0.1; i=$((i + 1)); }
        done
        ;;
    /*) dev=$chan ;;
    *) dev=/dev/$chan ;;
esac
if [ -z "$dev" ] || [ ! -c "$dev" ]; then
    echo "PYVHOST-ERROR no channel device for pyvhost.channel=$chan; using /dev/ttyS0"
    dev=/dev/ttyS0
fi
# A tty must not echo the commands back, nor turn "\n" into "\r\n" or react to control bytes.
stty -F "$dev" raw -echo 2>/dev/null

echo "PYVHOST-READY channel=$dev"
exec 3<>"$dev"
[ "$dev" = /dev/ttyS0 ] || [ "$dev" = /dev/console ] || echo "PYVHOST-READY channel=$dev" >&3

# The command loop (pyvhost-guest serve) stays PID 1's for good.
exec /bin/pyvhost-guest serve /tmp <&3 >&3
