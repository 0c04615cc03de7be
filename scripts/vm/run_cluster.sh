#!/usr/bin/env bash
# Two-guest real-kernel cluster test: boots two qemu guests (Debian's kernel, software
# emulation) that share a mirror's two legs and its clustered-disk log (raw image files on this
# host, attached to both with cache=none and no locking) and reach each other over a qemu UDP
# link on 127.0.0.1 only. Each guest runs corosync, clogd in cluster mode and
# tests/kernel/cluster_test.sh; when the victim asks (a file in the shared coordination folder),
# this script SIGKILLs the victim's qemu in the middle of its writes. At the end it compares the
# two leg images and checks the disk log image from the host.
#
# Usage: scripts/vm/run_cluster.sh [options]
#   --results DIR          results folder (default: a new /tmp/clogd-cluster.XXXXXX) holding
#                          node1/ and node2/ (each guest's run_guest.sh results: test.log,
#                          serial.log, clogd.log, corosync.log, dmesg.txt...), coord/ (the
#                          guests' shared folder), disks/ (leg0.img, leg1.img, log.img)
#   --image DIR            image from scripts/vm/build_image.sh (default: build or reuse it)
#   --timeout SEC          hard limit per guest, boot to power-off (default 600)
#   --victim WHICH         the node killed: writer (default: the one writing the disk log),
#                          other (the one that is not), 1 or 2
#   --token MS             corosync's totem token in the guests (default: cluster_test.sh's)
#   --clogd-log-level L    clogd's log level in the guests (default info)
#   --follow               copy both serial consoles to stderr while the guests run
#
# Prints one line per host check (`PASS host-<check>` or `FAIL host-<check>: <reason>`) and
# `run_cluster summary: passed N, failed N`; exits 0 only when the survivor's guest test and
# every host check passed.
set -uo pipefail

# Each guest's RAM (MiB) and virtual CPUs.
readonly GUEST_MEMORY_MIB=1024
readonly GUEST_CPUS=2
# How often the host looks for the victim's kill request and the guests' exits (seconds).
readonly POLL_S=0.2
# Sizes of the shared disks: the legs (cluster_test.sh's geometry: 512 KiB regions), the disk
# log (its 1024-byte header and the bitmap fit with room to spare).
readonly LEG_MIB=32
readonly REGIONS=$((LEG_MIB * 2))
readonly LOG_KIB=1024
# Random data put on leg 0 only before boot, at this offset (MiB), for the initial resync
# (cluster_test.sh's INITIAL_MIB).
readonly INITIAL_MIB=2 INITIAL_LEN_MIB=2
# How many UDP ports are tried before giving up on finding two free ones.
readonly PORT_TRIES=50
# Lines of each guest's test log printed when the run fails.
readonly FAILURE_LOG_LINES=60

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf 'run_cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }

results=""
image=""
timeout_s=600
victim=writer
token=""
clogd_level=info
follow=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --results) results="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --victim) victim="$2"; shift 2 ;;
    --token) token="$2"; shift 2 ;;
    --clogd-log-level) clogd_level="$2"; shift 2 ;;
    --follow) follow=1; shift ;;
    -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "Unknown argument: $1" ;;
  esac
done
[[ "$victim" == writer || "$victim" == other || "$victim" == 1 || "$victim" == 2 ]] ||
  die "--victim must be writer, other, 1 or 2"
command -v ss >/dev/null || die "Missing tool: ss (iproute2)"

if [[ -z "$image" ]]; then
  image="$("${script_dir}/build_image.sh")" || die "Building the guest image failed"
fi
if [[ -z "$results" ]]; then
  results="$(mktemp -d /tmp/clogd-cluster.XXXXXX)"
fi
mkdir -p "$results"
results="$(cd "$results" && pwd)"
coord="${results}/coord"
disks="${results}/disks"
rm -rf "$coord" "$disks" "${results}/node1" "${results}/node2"
mkdir -p "$coord" "$disks" "${results}/node1" "${results}/node2"

# The shared disks: zero legs but for random data on leg 0 (the initial resync must copy it),
# and a zero log device (the first CTR writes its header).
truncate -s "${LEG_MIB}M" "${disks}/leg0.img" "${disks}/leg1.img"
truncate -s "${LOG_KIB}K" "${disks}/log.img"
head -c $((INITIAL_LEN_MIB * 1048576)) /dev/urandom >"${coord}/initial.bin"
dd if="${coord}/initial.bin" of="${disks}/leg0.img" bs=1M seek="$INITIAL_MIB" conv=notrunc \
  status=none || die "Cannot write the initial data"

# Two free UDP ports on the loopback, one per guest end of the link.
free_port() {
  local p
  for ((i = 0; i < PORT_TRIES; i++)); do
    p=$((20000 + RANDOM % 40000))
    [[ "$p" == "${1:-}" ]] && continue
    if [[ -z "$(ss -Hlun "sport = :${p}")" ]]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}
port1=$(free_port) || die "No free UDP port"
port2=$(free_port "$port1") || die "No free UDP port"
run_id="$(date +%s)-$$"

guest_args=(--run-id "$run_id" --victim "$victim" --clogd-log-level "$clogd_level")
[[ -n "$token" ]] && guest_args+=(--token "$token")

runner_pid=(0 "" "")
start_guest() { # start_guest N
  local n=$1 mine peer follow_arg=()
  if ((n == 1)); then mine=$port1 peer=$port2; else mine=$port2 peer=$port1; fi
  ((follow)) && follow_arg=(--follow)
  bash "${script_dir}/run_guest.sh" --image "$image" --results "${results}/node${n}" \
    --timeout "$timeout_s" --memory "$GUEST_MEMORY_MIB" --cpus "$GUEST_CPUS" \
    --hostname "clogd-node${n}" "${follow_arg[@]}" \
    --disk "${disks}/leg0.img" --disk "${disks}/leg1.img" --disk "${disks}/log.img" \
    --qemu-arg -netdev \
    --qemu-arg "socket,id=link,udp=127.0.0.1:${peer},localaddr=127.0.0.1:${mine}" \
    --qemu-arg -device --qemu-arg "virtio-net-pci,netdev=link,mac=52:54:00:c1:0d:0${n}" \
    --qemu-arg -fsdev \
    --qemu-arg "local,id=coord,path=${coord},security_model=none,multidevs=remap" \
    --qemu-arg -device --qemu-arg "virtio-9p-pci,fsdev=coord,mount_tag=coord" \
    --qemu-arg -pidfile --qemu-arg "${results}/node${n}/qemu.pid" \
    -- tests/kernel/cluster_test.sh --node "$n" "${guest_args[@]}" \
    >"${results}/node${n}/run_guest.out" 2>"${results}/node${n}/run_guest.err" &
  runner_pid[n]=$!
}

stop_guests() {
  # Only what this script started, by pid: run_guest.sh stops its own qemu on TERM.
  local n
  for n in 1 2; do
    [[ -n "${runner_pid[n]}" ]] && kill "${runner_pid[n]}" 2>/dev/null
  done
  return 0
}
trap stop_guests EXIT
trap 'exit 130' INT TERM

log "run ${run_id}: two guests, link 127.0.0.1:${port1} <-> 127.0.0.1:${port2}, victim ${victim}, results ${results}"
started=$(date +%s.%N)
elapsed() { awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
start_guest 1
start_guest 2

rc=(0 "" "")
killed=""
while [[ -z "${rc[1]}" || -z "${rc[2]}" ]]; do
  if [[ -z "$killed" && -s "${coord}/kill-request" ]]; then
    killed=$(tr -dc '12' <"${coord}/kill-request" | head -c 1)
    if [[ "$killed" != 1 && "$killed" != 2 ]]; then
      echo "host: bad kill request $(cat "${coord}/kill-request")" >"${coord}/abort.host"
      killed=bad
    else
      qpid=$(cat "${results}/node${killed}/qemu.pid" 2>/dev/null)
      if [[ -n "$qpid" ]] && kill -9 "$qpid" 2>/dev/null; then
        while kill -0 "$qpid" 2>/dev/null; do sleep 0.05; done
        log "killed node ${killed}'s qemu (pid ${qpid}) with SIGKILL at $(elapsed) s"
        echo "node ${killed} (qemu pid ${qpid}) SIGKILLed at host time $(date +%T.%N | cut -c1-12)" \
          >"${coord}/killed"
      else
        echo "host: cannot kill node ${killed}'s qemu (pid '${qpid}')" >"${coord}/abort.host"
      fi
    fi
  fi
  for n in 1 2; do
    [[ -n "${rc[n]}" ]] && continue
    kill -0 "${runner_pid[n]}" 2>/dev/null && continue
    wait "${runner_pid[n]}"
    rc[n]=$?
    runner_pid[n]=""
    log "node ${n}'s guest ended at $(elapsed) s with status ${rc[n]}"
    # A guest that ended on its own without success: tell the other one at once, rather than
    # let it wait for a barrier until its deadline.
    if [[ "$n" != "$killed" && "${rc[n]}" != 0 && ! -e "${coord}/abort.${n}" ]]; then
      echo "host: node ${n}'s guest ended with status ${rc[n]}" >"${coord}/abort.host"
    fi
  done
  sleep "$POLL_S"
done
log "both guests ended after $(elapsed) s"

passed=0
failed=0
check() { # check NAME REASON-IF-FAILED COMMAND...
  local name=$1 reason=$2
  shift 2
  if "$@"; then
    echo "PASS host-${name}"
    passed=$((passed + 1))
  else
    echo "FAIL host-${name}: ${reason}"
    failed=$((failed + 1))
  fi
}

survivor=""
[[ "$killed" == 1 || "$killed" == 2 ]] && survivor=$((3 - killed))
check victim-killed "no node asked to be killed, or the kill failed" test -n "$survivor"
if [[ -n "$survivor" ]]; then
  check survivor-passed "node ${survivor}'s guest test ended with status ${rc[survivor]}" \
    test "${rc[survivor]}" = 0
  check survivor-done "node ${survivor} did not finish every step" test -e "${coord}/survivor-done"
fi
check legs-identical "the leg images differ: $(cmp "${disks}/leg0.img" "${disks}/leg1.img" 2>&1 | head -n 1)" \
  cmp -s "${disks}/leg0.img" "${disks}/leg1.img"

# The disk log image: the kernel's header (magic "MiRr", version 2, the region count) and, after
# the survivor's resync and remove, every region clean (clean bits from byte 1024; REGIONS is a
# multiple of 8).
readonly BITMAP_BYTES=$((REGIONS / 8))
log_image_clean() {
  local magic version regions clean
  read -r magic version < <(od -An -tu4 -N8 "${disks}/log.img")
  regions=$(od -An -tu8 -j8 -N8 "${disks}/log.img" | tr -d ' ')
  [[ "$magic" == $((0x4D695272)) && "$version" == 2 && "$regions" == "$REGIONS" ]] || return 1
  clean=$(od -An -v -tx1 -j1024 -N"$BITMAP_BYTES" "${disks}/log.img" | tr -d ' \n')
  [[ "$clean" == "$(printf 'ff%.0s' $(seq "$BITMAP_BYTES"))" ]]
}
check disk-log-clean "the log image's header or clean bits are wrong: $(od -An -tx1 -N16 "${disks}/log.img" | tr -s ' ') / $(od -An -tx1 -j1024 -N"$BITMAP_BYTES" "${disks}/log.img" | tr -s ' ')" \
  log_image_clean

echo "run_cluster summary: passed ${passed}, failed ${failed}"
log "finished after $(elapsed) s; results in ${results}"
if ((failed > 0)); then
  for n in 1 2; do
    log "node ${n}: last ${FAILURE_LOG_LINES} lines of ${results}/node${n}/test.log:"
    tail -n "$FAILURE_LOG_LINES" "${results}/node${n}/test.log" >&2 2>/dev/null
  done
  exit 1
fi
exit 0
