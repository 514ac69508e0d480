#!/bin/busybox sh
# strata initramfs: load the virtio drivers, mount the root disk, hand over
# to the strata agent as PID 1. Kept tiny: every line runs at every cold boot.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules/order); do
  /bin/busybox insmod /modules/$m.ko
done
case " $(/bin/busybox cat /proc/cmdline) " in
  *" strata.probe "*)
    echo STRATA-PROBE-OK
    /bin/busybox poweroff -f ;;
esac
n=0
while [ ! -b /dev/vda ] && [ $n -lt 1000 ]; do /bin/busybox usleep 5000; n=$((n+1)); done
# No background work of ext4's own: a launch image is saved moments after
# boot, and its restored guests would otherwise each prefetch block bitmaps
# and zero inode tables (~3,500 translated blocks, ~50 ms of CPU under TCG).
/bin/busybox mount -t ext4 -o rw,noatime,no_prefetch_block_bitmaps,noinit_itable /dev/vda /newroot || {
  echo "strata-init: cannot mount the root disk"; /bin/busybox poweroff -f; }
/bin/busybox mkdir -p /newroot/run
/bin/busybox mount -t tmpfs -o mode=755 tmpfs /newroot/run
/bin/busybox mkdir -p /newroot/run/strata
/bin/busybox cp /strata-agent /newroot/run/strata/agent
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox mount --move /proc /newroot/proc
/bin/busybox mount --move /sys /newroot/sys
exec /bin/busybox switch_root /newroot /run/strata/agent
