#!/usr/bin/env bash
# Boots Debian's kernel under qemu (software emulation) and runs one test script inside the
# guest with the repository shared read-only at /repo and a results folder shared writable at
# /results. The guest's init is scripts/vm/guest_init.sh.
#
# Usage: scripts/vm/run_guest.sh [options] [--] <test script relative to the repo> [args...]
#   --results DIR    results folder (default: a new /tmp/clogd-vm.XXXXXX); it receives
#                    serial.log, test.log, dmesg.txt, exit_status and whatever the test writes
#   --image DIR      image from scripts/vm/build_image.sh (default: build or reuse it)
#   --timeout SEC    hard limit on the whole guest run (default ${CLOGD_VM_TIMEOUT:-600})
#   --memory MIB     guest RAM (default 1024)
#   --cpus N         virtual CPUs (default 2)
#   --hostname NAME  the guest's host name (default clogd-guest)
#   --disk FILE      extra raw disk (virtio, in order /dev/vdb, /dev/vdc, ...); opened with
#                    cache=none and no locking so two guests can share it. Repeatable
#   --qemu-arg ARG   extra qemu argument, e.g. a -netdev for the cluster tests. Repeatable
#   --follow         copy the serial console to stderr while the guest runs
#
# The deno binary the guest runs is shared read-only at /share/deno-bin: $CLOGD_DENO, else the
# repository's pinned one (scripts/deno/node_modules/.bin/deno), else deno on PATH.
#
# Exit status: the guest test's own, 124 when the hard limit ended the guest, 125 when the
# guest ended without reporting one. On any non-zero status the serial log's tail is printed.
set -euo pipefail

# The whole guest run, boot to power-off, may not take longer than this (seconds).
readonly DEFAULT_TIMEOUT_SECONDS=600
# Lines of the serial log printed when the run fails.
readonly FAILURE_LOG_LINES=400
# Lines of the guest's heartbeat log (its process table every 15 s) printed when it fails.
readonly HEARTBEAT_LOG_LINES=40

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${script_dir}/../.." && pwd)"

log() { printf 'run_guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }

results=""
image=""
timeout_s="${CLOGD_VM_TIMEOUT:-$DEFAULT_TIMEOUT_SECONDS}"
memory=1024
cpus=2
hostname=clogd-guest
follow=0
disks=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --results) results="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --memory) memory="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --hostname) hostname="$2"; shift 2 ;;
    --disk) disks+=("$2"); shift 2 ;;
    --qemu-arg) extra+=("$2"); shift 2 ;;
    --follow) follow=1; shift ;;
    -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    --) shift; break ;;
    -*) die "Unknown option: $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "Missing the test script (a path relative to the repository)"
test_script="$1"
shift
[[ -f "${repo}/${test_script}" ]] || die "No such test script: ${repo}/${test_script}"
[[ "$timeout_s" =~ ^[0-9]+$ && "$timeout_s" -gt 0 ]] || die "Bad --timeout: ${timeout_s}"
command -v qemu-system-x86_64 >/dev/null || die "Missing tool: qemu-system-x86_64"

deno_bin=""
for candidate in "${CLOGD_DENO:-}" "${repo}/scripts/deno/node_modules/.bin/deno" \
  "${repo}/node_modules/.bin/deno" "$(command -v deno || true)"; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then
    deno_bin="$(readlink -f "$candidate")"
    break
  fi
done
[[ -n "$deno_bin" ]] || die "No deno binary: run scripts/install.sh or set CLOGD_DENO"

if [[ -z "$image" ]]; then
  image="$("${script_dir}/build_image.sh")" || die "Building the guest image failed"
fi
for f in vmlinuz initrd.img root.img; do
  [[ -s "${image}/${f}" ]] || die "Image ${image} lacks ${f}"
done

if [[ -z "$results" ]]; then
  results="$(mktemp -d /tmp/clogd-vm.XXXXXX)"
fi
mkdir -p "$results"
results="$(cd "$results" && pwd)"
rm -f "${results}"/{exit_status,serial.log,test.log,dmesg.txt,heartbeat.log,qemu.out}
{
  printf 'GUEST_TEST=%q\n' "$test_script"
  printf 'GUEST_HOSTNAME=%q\n' "$hostname"
  printf 'GUEST_DENO=%q\n' "/share/deno-bin/$(basename "$deno_bin")"
  printf 'GUEST_ARGS=('
  for a in "$@"; do printf '%q ' "$a"; done
  printf ')\n'
} >"${results}/job.env"

kernel_args=(
  console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/sbin/clogd-vm-init
  # A panic (init exited) reboots at once, and -no-reboot turns that into qemu exiting.
  panic=-1 noresume
  # Nothing in the guest is untrusted; the mitigations only slow down software emulation.
  mitigations=off
  quiet loglevel=4
)
# shellcheck disable=SC2054 # commas separate qemu sub-options, not array elements
qemu=(
  qemu-system-x86_64
  -accel tcg -cpu max -smp "$cpus" -m "$memory"
  -nodefaults -no-user-config -display none -no-reboot
  -serial "file:${results}/serial.log"
  -kernel "${image}/vmlinuz" -initrd "${image}/initrd.img" -append "${kernel_args[*]}"
  -drive "file=${image}/root.img,if=virtio,format=raw,readonly=on"
  -fsdev "local,id=repo,path=${repo},security_model=none,readonly=on,multidevs=remap"
  -device virtio-9p-pci,fsdev=repo,mount_tag=repo
  -fsdev "local,id=results,path=${results},security_model=none,multidevs=remap"
  -device virtio-9p-pci,fsdev=results,mount_tag=results
  -fsdev "local,id=denobin,path=$(dirname "$deno_bin"),security_model=none,readonly=on"
  -device virtio-9p-pci,fsdev=denobin,mount_tag=denobin
)
for d in "${disks[@]}"; do
  qemu+=(-drive "file.filename=${d},file.locking=off,if=virtio,format=raw,cache=none")
done
qemu+=("${extra[@]}")

qemu_pid=""
tail_pid=""
stop_children() {
  # Only what this script started, by pid.
  [[ -n "$tail_pid" ]] && kill "$tail_pid" 2>/dev/null
  if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then
    local child
    child="$(pgrep -P "$qemu_pid" 2>/dev/null || true)"
    kill "$qemu_pid" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$qemu_pid" 2>/dev/null || break
      sleep 0.5
    done
    # timeout(1) should have stopped qemu and exited; if it is still there, stop both.
    if kill -0 "$qemu_pid" 2>/dev/null; then
      # shellcheck disable=SC2086 # one pid per word
      [[ -n "$child" ]] && kill -9 $child 2>/dev/null
      kill -9 "$qemu_pid" 2>/dev/null
    fi
  fi
  return 0
}
trap stop_children EXIT
trap 'exit 130' INT TERM

log "booting $(basename "$image") image, test ${test_script}, deno ${deno_bin}, results ${results}, limit ${timeout_s} s"
started=$(date +%s.%N)
: >"${results}/serial.log"
# timeout(1) passes on a TERM it receives, so killing its pid stops qemu too.
timeout --kill-after=10 "$timeout_s" "${qemu[@]}" </dev/null >"${results}/qemu.out" 2>&1 &
qemu_pid=$!
if [[ $follow -eq 1 ]]; then
  tail -n +1 -f --pid="$qemu_pid" "${results}/serial.log" >&2 &
  tail_pid=$!
fi
set +e
wait "$qemu_pid"
qemu_rc=$?
set -e
qemu_pid=""
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

if [[ $qemu_rc -eq 124 || $qemu_rc -eq 137 ]]; then
  log "the guest ran out of time (${timeout_s} s)"
  rc=124
elif [[ -s "${results}/exit_status" ]]; then
  rc="$(tr -dc '0-9' <"${results}/exit_status")"
  rc="${rc:-125}"
else
  log "the guest ended without reporting an exit status (qemu exit ${qemu_rc})"
  rc=125
fi
log "guest finished in ${elapsed} s with status ${rc}"
if [[ $rc -ne 0 ]]; then
  if [[ -s "${results}/qemu.out" ]]; then
    log "qemu said:"
    cat "${results}/qemu.out" >&2
  fi
  if [[ -s "${results}/heartbeat.log" ]]; then
    log "last ${HEARTBEAT_LOG_LINES} lines of ${results}/heartbeat.log (the guest's process table):"
    tail -n "$HEARTBEAT_LOG_LINES" "${results}/heartbeat.log" >&2
  fi
  log "last ${FAILURE_LOG_LINES} lines of ${results}/serial.log:"
  tail -n "$FAILURE_LOG_LINES" "${results}/serial.log" >&2
fi
exit "$rc"
