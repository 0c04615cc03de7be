#!/bin/bash
# The guest's init (PID 1), started by /sbin/clogd-vm-init from the read-only repository share.
# Prepares a minimal system (no systemd, no udev), runs the test named in /results/job.env,
# records its exit status in /results/exit_status and powers the guest off.
#
# The job file (written by scripts/vm/run_guest.sh) sets GUEST_TEST (a path relative to the
# repository) and GUEST_ARGS (a bash array). Everything the test prints goes to the serial
# console and to /results/test.log.
set -u
PATH=/tmp/clogd-bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { printf 'guest_init: %s\n' "$*" >/dev/console; }

power_off() {
  sync
  # There is no poweroff binary in a minbase system; sysrq 'o' powers off at once. If that
  # fails, exiting PID 1 panics the kernel, and panic=-1 with qemu's -no-reboot ends qemu.
  echo o >/proc/sysrq-trigger
  sleep 30
  exit 1
}

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
# The root is read-only: everything written goes to tmpfs (/share holds mount points for
# extra shares). /var/lib/corosync and /var/log are for the cluster tests, which reuse this image.
for dir in /run /tmp /var/tmp /var/log /var/lib/corosync /share; do
  mount -t tmpfs -o mode=0755 tmpfs "$dir" || say "cannot mount tmpfs on $dir"
done
chmod 1777 /tmp /var/tmp
ln -sf /proc/self/mounts /run/mtab 2>/dev/null

if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results; then
  say "cannot mount the results share"
  power_off
fi
: >/results/test.log

if [[ ! -f /results/job.env ]]; then
  say "no /results/job.env"
  echo 125 >/results/exit_status
  power_off
fi
GUEST_TEST=""
GUEST_DENO=""
GUEST_ARGS=()
# shellcheck source=/dev/null
. /results/job.env

hostname "${GUEST_HOSTNAME:-clogd-guest}"
ip link set lo up 2>/dev/null

# dmsetup would otherwise wait for udev to create device nodes, and there is no udev here.
export DM_DISABLE_UDEV=1
rm -rf /run/udev
modules_ok=1
for mod in dm-mod dm-mirror dm-log-userspace loop; do
  modprobe "$mod" || { say "modprobe $mod failed"; modules_ok=0; }
done

# The host shares the folder of the deno binary it chose (GUEST_DENO names it). Starting the
# 95 MB binary from 9p costs 1-1.4 s per start under emulation; from tmpfs it does not. Deno
# also needs a writable DENO_DIR for its transpile cache.
mkdir -p /tmp/clogd-bin /tmp/deno-dir /tmp/home /share/deno-bin 2>/dev/null
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 denobin /share/deno-bin &&
  [[ -n "${GUEST_DENO:-}" && -x "$GUEST_DENO" ]]; then
  copy_start=$(date +%s.%N)
  cp "$GUEST_DENO" /tmp/clogd-bin/deno
  umount /share/deno-bin
  say "copied deno to tmpfs in $(echo "$(date +%s.%N) $copy_start" | awk '{printf "%.2f", $1 - $2}') s"
else
  say "no deno binary shared at ${GUEST_DENO:-/share/deno-bin}"
fi
export DENO_DIR=/tmp/deno-dir HOME=/tmp/home DENO_NO_UPDATE_CHECK=1 NO_COLOR=1

# Every HEARTBEAT_S seconds: what runs and what is stuck, so that a guest that hangs until the
# host's hard limit still tells why (printed by run_guest.sh on failure).
HEARTBEAT_S=15
heartbeat() {
  while sleep "$HEARTBEAT_S"; do
    {
      echo "== uptime $(cut -d' ' -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg)," \
        "MemAvailable $(awk '/^MemAvailable/ { print $2 }' /proc/meminfo) kB"
      ps -eo pid,stat,time,wchan:28,args | awk 'NR == 1 || $2 ~ /^[DR]/ || / (deno|dmsetup|dd) /' |
        grep -v -e ' awk ' -e ' ps -eo'
    } >>/results/heartbeat.log 2>&1
  done
}
heartbeat &
heartbeat_pid=$!

say "uptime $(cut -d' ' -f1 /proc/uptime) s, kernel $(uname -r), running ${GUEST_TEST} ${GUEST_ARGS[*]}"
if [[ $modules_ok -ne 1 ]]; then
  echo "FAIL guest-setup: a device-mapper or loop module did not load" | tee -a /results/test.log
  status=1
elif [[ -z "$GUEST_TEST" || ! -f "/repo/${GUEST_TEST}" ]]; then
  echo "FAIL guest-setup: no test script /repo/${GUEST_TEST}" | tee -a /results/test.log
  status=125
else
  cd /tmp || exit 1
  set -o pipefail
  bash "/repo/${GUEST_TEST}" "${GUEST_ARGS[@]}" 2>&1 | tee -a /results/test.log
  status=$?
  set +o pipefail
fi

kill "$heartbeat_pid" 2>/dev/null
dmesg >/results/dmesg.txt 2>&1
say "test exited with status ${status} at uptime $(cut -d' ' -f1 /proc/uptime) s"
echo "$status" >/results/exit_status
umount /results
power_off
