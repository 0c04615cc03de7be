#!/usr/bin/env bash
# Builds (once, cached) the guest used by the real-kernel tests: Debian bookworm's own kernel,
# an initrd that can mount a virtio-blk ext4 root, and a read-only ext4 root image holding
# dmsetup, kmod, util-linux, procps, iproute2 and corosync with libcpg4, libquorum5 and
# libvotequorum8 (for the cluster tests).
#
# Usage: scripts/vm/build_image.sh [--force]
# Prints the image directory on stdout (everything else goes to stderr). The directory holds:
#   vmlinuz, initrd.img, root.img (ext4, mounted read-only by the guest), image.env (facts).
#
# Environment:
#   CLOGD_VM_CACHE   cache root (default /var/cache/clogd-vm); CI runs on one machine reuse it
#   CLOGD_VM_MIRROR  Debian mirror URL (default: the one this host's apt uses)
#
# The cache is keyed by a hash of this script, so editing it rebuilds. The build happens in a
# temporary directory renamed into place at the end, under a lock, so a crashed or concurrent
# build never leaves a half-made image behind. Needs root (debootstrap, chroot).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

# Debian's suite the guest runs; its 6.1 kernel is the one the fixtures were recorded with.
readonly SUITE=bookworm
# Packages on top of minbase. linux-image-amd64 pulls initramfs-tools; corosync and the
# libraries clogd opens in cluster mode (libcpg4 for CPG, libquorum5 and libvotequorum8 for
# quorum; corosync depends on them, named here so that a change there cannot drop them) and
# iproute2 are here so the cluster test (tests/kernel/cluster_test.sh) can reuse this image.
readonly PACKAGES="linux-image-amd64,dmsetup,kmod,util-linux,procps,iproute2,corosync,libcpg4,libquorum5,libvotequorum8"
# Modules the initrd must load by itself to reach the root (virtio_pci is built in on Debian).
readonly INITRD_MODULES="virtio_pci virtio_blk ext4"
# Free room left in the root image beyond what its files take (it is mounted read-only; the
# margin only covers ext4's own metadata).
readonly ROOT_IMAGE_SLACK_MIB=128
# Size limit of the in-memory build tree (it needs about 750 MiB).
readonly ROOT_TMPFS_MIB=3072

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script_path="${script_dir}/$(basename "${BASH_SOURCE[0]}")"
cache_root="${CLOGD_VM_CACHE:-/var/cache/clogd-vm}"
key="$(sha256sum "$script_path" | cut -c1-16)"
final_dir="${cache_root}/${key}"

log() { printf 'build_image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) sed -n '2,16p' "$script_path" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "Unknown argument: $arg" ;;
  esac
done

image_complete() {
  [[ -s "$1/vmlinuz" && -s "$1/initrd.img" && -s "$1/root.img" && -f "$1/image.env" ]]
}

if [[ $force -eq 0 ]] && image_complete "$final_dir"; then
  log "cached image ${final_dir}"
  printf '%s\n' "$final_dir"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "Must run as root (debootstrap and chroot need it)"
for tool in debootstrap mke2fs chroot flock sha256sum; do
  command -v "$tool" >/dev/null || die "Missing tool: $tool"
done

# The Debian mirror this host's apt reaches: only Debian's archive answers on these machines.
find_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    # deb822 stanzas: take URIs of a stanza whose Suites include the plain suite name.
    uri="$(awk -v suite="$SUITE" '
      BEGIN { RS = ""; FS = "\n" }
      {
        uris = ""; ok = 0; deb = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, /[ \t]+/); uris = u[1] }
          if ($i ~ /^Types:.*(^|[ \t:])deb([ \t]|$)/) deb = 1
          if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1 }
        }
        if (ok && deb && uris != "") { print uris; exit }
      }' "$f")"
    [[ -n "$uri" ]] && { printf '%s\n' "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    uri="$(awk -v suite="$SUITE" '$1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i + 1) == suite) { print $i; exit }
      }' "$f")"
    [[ -n "$uri" ]] && { printf '%s\n' "$uri"; return; }
  done
  printf '%s\n' "http://deb.debian.org/debian"
}

mkdir -p "$cache_root"
exec 9>"${cache_root}/.lock"
log "waiting for the build lock ${cache_root}/.lock"
flock 9
# Another build may have finished while this one waited for the lock.
if [[ $force -eq 0 ]] && image_complete "$final_dir"; then
  log "cached image ${final_dir} (built by a concurrent run)"
  printf '%s\n' "$final_dir"
  exit 0
fi

# Leftovers of a build that was killed (the lock is ours now, so none is running).
for stale in "${cache_root}"/.build-*; do
  [[ -d "$stale" ]] || continue
  mountpoint -q "${stale}/rootfs/proc" 2>/dev/null && umount -l "${stale}/rootfs/proc"
  mountpoint -q "${stale}/rootfs" 2>/dev/null && umount -l "${stale}/rootfs"
  rm -rf "$stale"
done

mirror="${CLOGD_VM_MIRROR:-$(find_mirror)}"
started=$(date +%s)
work="$(mktemp -d "${cache_root}/.build-${key}-XXXXXX")"
root="${work}/rootfs"
cleanup() {
  local rc=$?
  # Anything left mounted must go before the tree can be removed.
  mountpoint -q "${root}/proc" 2>/dev/null && umount -l "${root}/proc"
  mountpoint -q "$root" 2>/dev/null && umount -l "$root"
  rm -rf "$work"
  [[ $rc -eq 0 ]] || log "failed after $(($(date +%s) - started)) s"
}
trap cleanup EXIT
# The tree is built in memory: dpkg syncs every file it unpacks, which costs real disk
# writes for the thousands of kernel modules, and the tree is thrown away after mke2fs.
mkdir -p "$root"
mount -t tmpfs -o "size=${ROOT_TMPFS_MIB}m,mode=0755" tmpfs "$root"

log "debootstrap ${SUITE} (minbase + ${PACKAGES}) from ${mirror}"
mkdir -p "${cache_root}/debs"
# Downloaded packages are kept so that a rebuild after editing this script downloads only
# what changed.
if ! debootstrap --variant=minbase --include="$PACKAGES" --components=main \
  --cache-dir="${cache_root}/debs" \
  "$SUITE" "$root" "$mirror" >"${work}/debootstrap.log" 2>&1; then
  tail -n 40 "${work}/debootstrap.log" >&2
  [[ -f "${root}/debootstrap/debootstrap.log" ]] && tail -n 40 "${root}/debootstrap/debootstrap.log" >&2
  die "debootstrap failed"
fi
log "debootstrap done after $(($(date +%s) - started)) s"

kver="$(basename "$(ls -d "${root}"/lib/modules/*/ | head -n 1)")"
[[ -n "$kver" && -f "${root}/boot/vmlinuz-${kver}" ]] || die "No kernel found in the guest root"

# A small initrd (MODULES=list) holding just what reaching the root needs, loaded explicitly
# rather than found by udev: it unpacks and boots faster under software emulation.
printf '%s\n' $INITRD_MODULES >"${root}/etc/initramfs-tools/modules"
printf 'MODULES=list\nRESUME=none\n' >"${root}/etc/initramfs-tools/conf.d/clogd-vm.conf"
mount -t proc proc "${root}/proc"
chroot "$root" update-initramfs -u -k "$kver" >"${work}/initramfs.log" 2>&1 ||
  { cat "${work}/initramfs.log" >&2; die "update-initramfs failed"; }
umount "${root}/proc"
chroot "$root" lsinitramfs "/boot/initrd.img-${kver}" >"${work}/initrd.list"
for mod in $INITRD_MODULES; do
  # Built into the kernel, or in the initrd (lsinitramfs runs in the chroot: not every host has it).
  grep -q "/${mod}\.ko" "${root}/lib/modules/${kver}/modules.builtin" "${work}/initrd.list" ||
    die "Neither the kernel nor the initrd has module ${mod}"
done
for mod in 9pnet_virtio 9p dm-mod dm-mirror dm-log-userspace loop virtio_net; do
  chroot "$root" modinfo -k "$kver" "$mod" >/dev/null 2>&1 ||
    die "The guest kernel lacks module ${mod}"
done

# The guest's first process: mounts the repository share and hands over to the init script
# kept in the repository (scripts/vm/guest_init.sh), so changing that script needs no rebuild.
cat >"${root}/sbin/clogd-vm-init" <<'EOF'
#!/bin/sh
# Baked into the image by scripts/vm/build_image.sh. The real work is in the repository.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe 9pnet_virtio && modprobe 9p
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose repo /repo &&
  [ -x /repo/scripts/vm/guest_init.sh ]; then
  exec /repo/scripts/vm/guest_init.sh
fi
echo "clogd-vm-init: cannot mount the repository share or find scripts/vm/guest_init.sh" >/dev/console
echo o >/proc/sysrq-trigger
sleep 10
EOF
chmod 0755 "${root}/sbin/clogd-vm-init"
mkdir -p "${root}/repo" "${root}/results" "${root}/share"

# Nothing in the guest reads these; they only make the image larger.
rm -rf "${root}"/var/cache/apt/archives/*.deb "${root}"/var/lib/apt/lists/* \
  "${root}"/usr/share/doc/* "${root}"/usr/share/man/* "${root}"/usr/share/locale/* \
  "${root}"/usr/share/info/*

cp "${root}/boot/vmlinuz-${kver}" "${work}/vmlinuz"
cp "${root}/boot/initrd.img-${kver}" "${work}/initrd.img"

size_mib=$(($(du -sm "$root" | cut -f1) + ROOT_IMAGE_SLACK_MIB))
log "making a ${size_mib} MiB ext4 root image"
# stdout carries only the image directory: mke2fs's chatter goes to stderr.
mke2fs -q -F -t ext4 -O ^has_journal -L clogd-root -d "$root" "${work}/root.img" "${size_mib}M" >&2 ||
  die "mke2fs failed"

elapsed=$(($(date +%s) - started))
cat >"${work}/image.env" <<EOF
KERNEL_VERSION=${kver}
SUITE=${SUITE}
MIRROR=${mirror}
PACKAGES=${PACKAGES}
BUILD_SECONDS=${elapsed}
BUILT_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
umount "$root"
rmdir "$root"

rm -rf "$final_dir"
mv "$work" "$final_dir"
# Images keyed by older versions of this script are dead weight (about 1 GB each).
for old in "${cache_root}"/*/; do
  [[ "${old%/}" == "${cache_root}/debs" ]] && continue
  [[ "${old%/}" == "$final_dir" ]] || rm -rf "${old%/}"
done
log "built ${final_dir} (kernel ${kver}) in ${elapsed} s"
printf '%s\n' "$final_dir"
