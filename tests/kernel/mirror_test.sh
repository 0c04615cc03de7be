#!/bin/bash
# Real-kernel test of clogd, run inside the qemu guest:
#   scripts/vm/run_guest.sh tests/kernel/mirror_test.sh [case ...]
# Creates device-mapper mirrors whose `userspace` dirty logs are served by clogd (started from
# the repository share), writes and reads through them and compares the legs byte for byte.
# Prints one line per case: `PASS <case> (<s> s)` or `FAIL <case>: <reason>`, then
# `mirror_test summary: passed <N>, failed <N>`. Exits non-zero if any case failed.
#
# Cases (all by default, in this order):
#   no-daemon              with no log server, `dmsetup create` fails at once and the kernel
#                          logs "Userspace log server not found" (ESRCH)
#   core                   clustered-core log; random data on the default leg only, so the
#                          resync must copy it (legs identical after it); 4 MiB written and read
#                          back with O_DIRECT and found on both legs; suspend, resume, 1 MiB more;
#                          remove; legs identical byte for byte
#   core-integrated-flush  the same with integrated_flush
#   core-nosync            clustered-core with nosync: in sync at once, then as above
#   disk                   as core, with a clustered-disk log on a third loop device; after remove
#                          the log device holds the kernel's header (magic, version 2, regions)
#   disk-integrated-flush  the same with integrated_flush
#   restart-core           clogd killed with SIGKILL during a stream of O_DIRECT writes and
#                          started again: every write completes, the kernel re-created the log
#                          (dmesg), the data reads back, no reply was dropped for lack of space;
#                          after a suspend/resume the mirror resyncs and the legs are identical
#   restart-disk           the same with a clustered-disk log
#   restart-idle-disk      clustered-disk, in sync; clogd killed while the mirror is idle and
#                          started again; the next write (whose IN_SYNC is the first request the
#                          new clogd sees) must reach both legs, with no reply dropped
#   shutdown               clogd exits on SIGTERM once no log is left
set -u

readonly REPO=/repo
readonly RESULTS=${RESULTS:-/results}
readonly WORK=/tmp/mirror-test
readonly CLOGD_LOG="${RESULTS}/clogd.log"
# --clogd-log-level=LEVEL (first argument) changes clogd's log level, e.g. to debug a failure.
CLOGD_LOG_LEVEL=info
if [[ "${1:-}" == --clogd-log-level=* ]]; then
  CLOGD_LOG_LEVEL=${1#*=}
  shift
fi
readonly CLOGD_CMD=(deno run --allow-all --v8-flags=--stack-size=2048 "${REPO}/main.ts"
  serve --standalone --log-level "$CLOGD_LOG_LEVEL")

# Geometry: 64 MiB legs in 512 KiB regions, 128 regions (as in the recorded 6.1 fixture).
readonly LEG_MIB=64
readonly SECTORS=$((LEG_MIB * 2048))
readonly REGION_SECTORS=1024
readonly REGIONS=$(((SECTORS + REGION_SECTORS - 1) / REGION_SECTORS))
# The disk log needs 1024 bytes of header plus the bitmap; 1 MiB is plenty.
readonly LOG_DEV_KIB=1024
# Writes during the restart case: this many chunks of RESTART_CHUNK_KIB, each its own dd.
readonly RESTART_CHUNKS=96
readonly RESTART_CHUNK_KIB=256
# clogd is killed once this many chunks are written, so most of the writes come after it.
readonly RESTART_KILL_AFTER_CHUNKS=8

# Deadlines in seconds. The first daemon start transpiles the whole daemon under emulation.
readonly DAEMON_READY_S=90
# One dmsetup call. A lost reply costs the kernel 15 s before it resends.
readonly DM_STEP_S=60
readonly RESYNC_S=120
readonly IO_S=90
# Restart: a request lost with the killed daemon times out after 15 s, then the kernel
# re-creates the log (2 s sleeps between tries) before the I/O can go on.
readonly RESTART_IO_S=180
readonly SHUTDOWN_S=15
# How often waits poll (seconds).
readonly POLL_S=0.2
# How often the resync wait asks for the mirror's status: each ask is two requests to clogd
# that compete with the resync for the guest's CPU.
readonly RESYNC_POLL_S=0.5

export DM_DISABLE_UDEV=1

CLOGD_PID=""
REASON=""
PASSED=0
FAILED=0
LOOPS=()
MIRROR=""

uptime_s() { cut -d' ' -f1 /proc/uptime; }
# Milliseconds on the wall clock, without a fork (bash 5's EPOCHREALTIME).
now_ms() {
  local t=${EPOCHREALTIME/./}
  echo $((10#$t / 1000))
}
note() { printf '[%s] %s\n' "$(uptime_s)" "$*"; }
fail() { REASON="$*"; return 1; }

# Runs a command, giving up on it after $1 seconds. Unlike timeout(1) this returns even when
# the command is stuck in the kernel (a dmsetup waiting for a reply cannot be killed).
deadline() {
  local secs=$1 pid end
  shift
  end=$(($(now_ms) + secs * 1000))
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if (($(now_ms) >= end)); then
      kill -9 "$pid" 2>/dev/null
      note "gave up after ${secs} s: $*"
      return 124
    fi
    sleep "$POLL_S"
  done
  wait "$pid"
}

# Polls until the command succeeds or $1 seconds (of wall clock, however long each try takes)
# pass.
wait_until() {
  local secs=$1 end
  shift
  end=$(($(now_ms) + secs * 1000))
  until "$@"; do
    (($(now_ms) >= end)) && return 1
    sleep "${WAIT_POLL_S:-$POLL_S}"
  done
}

# True while some process other than the kernel listens on multicast group 7 of
# NETLINK_CONNECTOR (protocol 11): the dm-log-userspace group. /proc/net/netlink prints the
# first 32 groups as a hex mask; group 7 is bit 6 (0x40), the 7th hex digit's bit 2.
log_server_listening() {
  awk '$2 == 11 && $3 != 0 && substr($4, 7, 1) ~ /[4567cdefCDEF]/ { found = 1 } END { exit !found }' \
    /proc/net/netlink
}

process_gone() { ! kill -0 "$1" 2>/dev/null; }

clogd_alive() { [[ -n "$CLOGD_PID" ]] && kill -0 "$CLOGD_PID" 2>/dev/null; }

start_clogd() {
  local started
  started=$(uptime_s)
  printf '\n==== clogd start at uptime %s: %s\n' "$started" "${CLOGD_CMD[*]}" >>"$CLOGD_LOG"
  (cd "$REPO" && exec "${CLOGD_CMD[@]}") >>"$CLOGD_LOG" 2>&1 </dev/null &
  CLOGD_PID=$!
  if ! wait_until "$DAEMON_READY_S" ready_or_dead; then
    fail "clogd did not listen on the dm-log-userspace netlink group within ${DAEMON_READY_S} s"
    return 1
  fi
  if ! clogd_alive; then
    wait "$CLOGD_PID"
    fail "clogd exited with status $? before listening (see clogd.log)"
    CLOGD_PID=""
    return 1
  fi
  note "clogd (pid ${CLOGD_PID}) listening after $(awk -v a="$started" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }') s"
}
ready_or_dead() { ! clogd_alive || log_server_listening; }

kill_clogd() {
  clogd_alive || return 0
  kill -9 "$CLOGD_PID"
  wait "$CLOGD_PID" 2>/dev/null
  CLOGD_PID=""
}

new_loop() { # new_loop VAR FILE SIZE_KIB: sets VAR to a new loop device backed by FILE
  truncate -s "${3}K" "$2" || return 1
  local dev
  dev=$(losetup --find --show "$2") || return 1
  LOOPS+=("$dev")
  printf -v "$1" '%s' "$dev"
}

# Best-effort teardown after a case, whether it passed or not.
cleanup_case() {
  if [[ -n "$MIRROR" ]] && dmsetup info "$MIRROR" >/dev/null 2>&1; then
    deadline "$DM_STEP_S" dmsetup remove "$MIRROR" >/dev/null 2>&1 ||
      deadline 10 dmsetup remove --force "$MIRROR" >/dev/null 2>&1
  fi
  MIRROR=""
  local dev
  for dev in "${LOOPS[@]}"; do
    losetup -d "$dev" 2>/dev/null
  done
  LOOPS=()
  rm -rf "$WORK"
  mkdir -p "$WORK"
}

# mirror_table KIND(core|disk) FLUSH(0|1) NOSYNC(0|1) UUID LEG0 LEG1 [LOGDEV_MAJ:MIN]
mirror_table() {
  local kind=$1 flush=$2 nosync=$3 uuid=$4 leg0=$5 leg1=$6 logdev=${7:-}
  local args=("$uuid")
  ((flush)) && args+=(integrated_flush)
  if [[ $kind == core ]]; then
    args+=(clustered-core "$REGION_SECTORS")
  else
    args+=(clustered-disk "$logdev" "$REGION_SECTORS")
  fi
  ((nosync)) && args+=(nosync)
  printf '0 %s mirror userspace %s %s 2 %s 0 %s 0\n' "$SECTORS" "${#args[@]}" "${args[*]}" \
    "$leg0" "$leg1"
}

# Prints the mirror's status line. Through a file, not a pipe: a `dmsetup status` stuck in the
# kernel would hold a pipe open and hang the caller's command substitution with it.
mirror_status() {
  deadline 30 dmsetup status "$MIRROR" >"${WORK}/status" 2>&1 || return 1
  cat "${WORK}/status"
}

# Prints "<sync_count>/<regions> <health>" from the mirror's status line, e.g. "128/128 AA".
mirror_sync() {
  local line
  line=$(mirror_status) || { echo "(dmsetup status failed or hung)"; return 1; }
  # 0 <len> mirror <#legs> <dev>... <sync>/<total> 1 <health> <log status...>
  awk '{ n = $4; print $(5 + n), $(7 + n) }' <<<"$line"
}

in_sync() { [[ "$(mirror_sync)" == "${REGIONS}/${REGIONS} AA" ]]; }

wait_resync() {
  local started
  started=$(uptime_s)
  if ! WAIT_POLL_S=$RESYNC_POLL_S wait_until "$RESYNC_S" in_sync; then
    fail "not in sync after ${RESYNC_S} s: status $(mirror_sync)"
    return 1
  fi
  note "in sync (${REGIONS}/${REGIONS}) after $(awk -v a="$started" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }') s"
}

legs_identical() { # legs_identical FILE0 FILE1 WHEN
  cmp -s "$1" "$2" || fail "legs differ $3: $(cmp "$1" "$2" 2>&1 | head -n 1)"
}

# write_and_verify SRC OFFSET_MIB LEG0FILE LEG1FILE: writes SRC through the mirror at the
# offset with O_DIRECT, reads it back through the mirror and checks it landed on both legs.
write_and_verify() {
  local src=$1 off=$2 f0=$3 f1=$4 mib
  mib=$(($(stat -c %s "$src") / 1048576))
  deadline "$IO_S" dd if="$src" of="/dev/mapper/${MIRROR}" bs=1M seek="$off" count="$mib" \
    oflag=direct conv=notrunc,fsync status=none ||
    { fail "writing ${mib} MiB at ${off} MiB failed"; return 1; }
  deadline "$IO_S" dd if="/dev/mapper/${MIRROR}" of="${WORK}/readback" bs=1M skip="$off" \
    count="$mib" iflag=direct status=none ||
    { fail "reading ${mib} MiB at ${off} MiB failed"; return 1; }
  cmp -s "$src" "${WORK}/readback" ||
    { fail "data read back at ${off} MiB differs from what was written"; return 1; }
  local f
  for f in "$f0" "$f1"; do
    dd if="$f" bs=1M skip="$off" count="$mib" status=none | cmp -s - "$src" ||
      { fail "$(basename "$f") does not hold the data written at ${off} MiB"; return 1; }
  done
  note "wrote and verified ${mib} MiB at ${off} MiB (sha256 $(sha256sum <"$src" | cut -c1-16))"
}

# The kernel's disk log header: magic "MiRr" (0x4D695272), version 2, nr_regions, LE.
check_disk_log_header() {
  local magic version regions want_magic=$((0x4D695272))
  read -r magic version < <(od -An -tu4 -N8 "$1")
  regions=$(od -An -tu8 -j8 -N8 "$1" | tr -d ' ')
  [[ "$magic" == "$want_magic" && "$version" == 2 && "$regions" == "$REGIONS" ]] ||
    fail "disk log header is magic=${magic} version=${version} nr_regions=${regions}, want ${want_magic} 2 ${REGIONS}"
}

dmesg_count() { dmesg | grep -c -- "$1"; }

# ---- cases

case_no_daemon() {
  kill_clogd
  log_server_listening && { fail "something already listens on the dm-log-userspace group"; return 1; }
  local leg0 leg1 before
  new_loop leg0 "${WORK}/leg0.img" $((LEG_MIB * 1024)) || return 1
  new_loop leg1 "${WORK}/leg1.img" $((LEG_MIB * 1024)) || return 1
  MIRROR=nodaemon
  before=$(dmesg_count "Userspace log server not found")
  local rc=0
  deadline 30 dmsetup create "$MIRROR" \
    --table "$(mirror_table core 0 0 clogd-vm-no-daemon "$leg0" "$leg1")" 2>/dev/null || rc=$?
  [[ $rc -eq 124 ]] && { fail "dmsetup create hung instead of failing"; return 1; }
  [[ $rc -ne 0 ]] || { fail "dmsetup create succeeded with no log server"; return 1; }
  (($(dmesg_count "Userspace log server not found") > before)) ||
    fail "the kernel did not log 'Userspace log server not found'"
}

# mirror_case KIND FLUSH NOSYNC
mirror_case() {
  local kind=$1 flush=$2 nosync=$3
  clogd_alive || start_clogd || return 1
  local f0="${WORK}/leg0.img" f1="${WORK}/leg1.img" logf="${WORK}/log.img"
  local leg0 leg1 logdev="" uuid
  new_loop leg0 "$f0" $((LEG_MIB * 1024)) || { fail "losetup failed"; return 1; }
  new_loop leg1 "$f1" $((LEG_MIB * 1024)) || { fail "losetup failed"; return 1; }
  if ((!nosync)); then
    # Data only on the default leg: the resync must copy it to the other.
    dd if=/dev/urandom of="$f0" bs=1M seek=8 count=8 conv=notrunc status=none
  fi
  if [[ $kind == disk ]]; then
    local ldev
    new_loop ldev "$logf" "$LOG_DEV_KIB" || { fail "losetup failed"; return 1; }
    logdev=$(cat "/sys/block/$(basename "$ldev")/dev")
  fi
  uuid="clogd-vm-${CASE}-$(od -An -tx4 -N8 /dev/urandom | tr -d ' ')"
  MIRROR="m-${CASE}"
  local table
  table=$(mirror_table "$kind" "$flush" "$nosync" "$uuid" "$leg0" "$leg1" "$logdev")
  note "dmsetup create ${MIRROR}: ${table}"
  deadline "$DM_STEP_S" dmsetup create "$MIRROR" --table "$table" ||
    { fail "dmsetup create failed"; return 1; }
  dmsetup table "$MIRROR" | grep -q "userspace .*${uuid}" ||
    { fail "the loaded table lacks the userspace log: $(dmsetup table "$MIRROR")"; return 1; }
  if ((nosync)); then
    in_sync || { fail "nosync mirror not in sync at once: status $(mirror_sync)"; return 1; }
  else
    wait_resync || return 1
  fi
  legs_identical "$f0" "$f1" "after the initial resync" || return 1

  dd if=/dev/urandom of="${WORK}/data1" bs=1M count=4 status=none
  write_and_verify "${WORK}/data1" 16 "$f0" "$f1" || return 1
  in_sync || { fail "not in sync after writing: status $(mirror_sync)"; return 1; }

  deadline "$DM_STEP_S" dmsetup suspend "$MIRROR" || { fail "dmsetup suspend failed"; return 1; }
  deadline "$DM_STEP_S" dmsetup resume "$MIRROR" || { fail "dmsetup resume failed"; return 1; }
  dd if=/dev/urandom of="${WORK}/data2" bs=1M count=1 status=none
  write_and_verify "${WORK}/data2" 40 "$f0" "$f1" || return 1
  in_sync || { fail "not in sync after suspend, resume and a write: status $(mirror_sync)"; return 1; }

  deadline "$DM_STEP_S" dmsetup remove "$MIRROR" || { fail "dmsetup remove failed"; return 1; }
  dmsetup info "$MIRROR" >/dev/null 2>&1 && { fail "the mirror still exists after remove"; return 1; }
  MIRROR=""
  legs_identical "$f0" "$f1" "after remove" || return 1
  if [[ $kind == disk ]]; then
    check_disk_log_header "$logf" || return 1
  fi
  clogd_alive || fail "clogd died during the case"
}

# Writes RESTART_CHUNKS chunks of SRC to the mirror at offset 8 MiB, one dd each, counting
# progress in $WORK/progress. Exits non-zero at the first failed write.
restart_writer() {
  local src=$1 i
  for ((i = 0; i < RESTART_CHUNKS; i++)); do
    dd if="$src" of="/dev/mapper/${MIRROR}" bs="${RESTART_CHUNK_KIB}K" skip="$i" \
      seek=$((8 * 1024 / RESTART_CHUNK_KIB + i)) count=1 oflag=direct conv=notrunc status=none ||
      exit 1
    echo $((i + 1)) >"${WORK}/progress"
  done
}
writer_progress() { cat "${WORK}/progress" 2>/dev/null || echo 0; }
writer_reached() { (($(writer_progress) >= RESTART_KILL_AFTER_CHUNKS)); }

# restart_case KIND
restart_case() {
  local kind=$1
  clogd_alive || start_clogd || return 1
  local f0="${WORK}/leg0.img" f1="${WORK}/leg1.img" logf="${WORK}/log.img"
  local leg0 leg1 logdev="" uuid
  new_loop leg0 "$f0" $((LEG_MIB * 1024)) || { fail "losetup failed"; return 1; }
  new_loop leg1 "$f1" $((LEG_MIB * 1024)) || { fail "losetup failed"; return 1; }
  if [[ $kind == disk ]]; then
    local ldev
    new_loop ldev "$logf" "$LOG_DEV_KIB" || { fail "losetup failed"; return 1; }
    logdev=$(cat "/sys/block/$(basename "$ldev")/dev")
  fi
  uuid="clogd-vm-${CASE}-$(od -An -tx4 -N8 /dev/urandom | tr -d ' ')"
  MIRROR="m-${CASE}"
  local table
  table=$(mirror_table "$kind" 0 0 "$uuid" "$leg0" "$leg1" "$logdev")
  note "dmsetup create ${MIRROR}: ${table}"
  deadline "$DM_STEP_S" dmsetup create "$MIRROR" --table "$table" ||
    { fail "dmsetup create failed"; return 1; }
  wait_resync || return 1

  local src="${WORK}/restart-data" mib=$((RESTART_CHUNKS * RESTART_CHUNK_KIB / 1024))
  dd if=/dev/urandom of="$src" bs="${RESTART_CHUNK_KIB}K" count="$RESTART_CHUNKS" status=none
  local reconnects_before enospc_before writer
  reconnects_before=$(dmesg_count "Reconnected to userspace log server")
  enospc_before=$(dmesg_count "Insufficient space to receive package")
  echo 0 >"${WORK}/progress"
  restart_writer "$src" &
  writer=$!
  if ! wait_until "$IO_S" writer_reached; then
    kill "$writer" 2>/dev/null
    fail "the writer made no progress before the kill ($(writer_progress) chunks)"
    return 1
  fi
  kill -0 "$writer" 2>/dev/null ||
    { fail "the writer finished before clogd could be killed: make RESTART_CHUNKS larger"; return 1; }
  local old_pid=$CLOGD_PID
  kill_clogd
  note "killed clogd (pid ${old_pid}) with SIGKILL after $(writer_progress) of ${RESTART_CHUNKS} chunks"
  # A moment with no server: requests sent now fail with ESRCH in the kernel.
  sleep 1
  start_clogd || return 1

  if ! wait_until "$RESTART_IO_S" process_gone "$writer"; then
    kill "$writer" 2>/dev/null
    fail "writes did not complete within ${RESTART_IO_S} s of the restart ($(writer_progress) of ${RESTART_CHUNKS} chunks)"
    return 1
  fi
  wait "$writer" || { fail "a write failed after the restart ($(writer_progress) chunks done)"; return 1; }
  note "all ${RESTART_CHUNKS} chunks written"
  (($(dmesg_count "Reconnected to userspace log server") > reconnects_before)) ||
    { fail "the kernel never re-created the log (no 'Reconnected to userspace log server')"; return 1; }
  # An error reply sets the kernel's reply capacity for that request to the reply's data_size;
  # the kernel's retry after re-creating the log reuses it. A -ESRCH reply without data thus
  # leaves the retried IN_SYNC no room for its answer: it fails with ENOSPC, reads as "not in
  # sync", and the write goes to the default leg only, unmarked, while the log may say in sync.
  # Checked last, so that the checks below still run and report.
  local dropped=""
  if (($(dmesg_count "Insufficient space to receive package") > enospc_before)); then
    dropped=$(dmesg | grep "Insufficient space" | tail -n 1 | sed 's/^\[[^]]*\] //')
  fi

  deadline "$IO_S" dd if="/dev/mapper/${MIRROR}" of="${WORK}/readback" bs=1M skip=8 \
    count="$mib" iflag=direct status=none || { fail "reading back failed"; return 1; }
  cmp -s "$src" "${WORK}/readback" ||
    { fail "data read back differs from what was written across the restart"; return 1; }
  note "status after the restart: $(mirror_sync)"
  # The kernel's re-CTR/RESUME after ESRCH does not reset its cached in_sync_hint (only a real
  # resume does), so once a mirror has been in sync it never asks the restarted daemon for
  # resync work. An operator's suspend and resume starts the recovery of whatever the new log
  # holds out of sync.
  deadline "$DM_STEP_S" dmsetup suspend "$MIRROR" || { fail "dmsetup suspend failed"; return 1; }
  deadline "$DM_STEP_S" dmsetup resume "$MIRROR" || { fail "dmsetup resume failed"; return 1; }
  wait_resync || return 1
  deadline "$DM_STEP_S" dmsetup remove "$MIRROR" || { fail "dmsetup remove failed"; return 1; }
  MIRROR=""
  legs_identical "$f0" "$f1" "after the restart and remove" || return 1
  local f
  for f in "$f0" "$f1"; do
    dd if="$f" bs=1M skip=8 count="$mib" status=none | cmp -s - "$src" ||
      { fail "$(basename "$f") does not hold the data written across the restart"; return 1; }
  done
  if [[ $kind == disk ]]; then
    check_disk_log_header "$logf" || return 1
  fi
  clogd_alive || { fail "the restarted clogd died"; return 1; }
  [[ -z "$dropped" ]] ||
    fail "the kernel dropped a reply after the restart: ${dropped} (an error reply must keep data_size at the request's reply size)"
}

# restart_idle_case: clogd killed while the mirror is idle, so the first request the new clogd
# sees is the IN_SYNC of the next write, for a log it does not know. The write must still reach
# both legs: the disk log says every region is in sync, so nothing would resync a leg the write
# missed.
restart_idle_case() {
  clogd_alive || start_clogd || return 1
  local f0="${WORK}/leg0.img" f1="${WORK}/leg1.img" logf="${WORK}/log.img"
  local leg0 leg1 ldev logdev uuid
  new_loop leg0 "$f0" $((LEG_MIB * 1024)) || { fail "losetup failed"; return 1; }
  new_loop leg1 "$f1" $((LEG_MIB * 1024)) || { fail "losetup failed"; return 1; }
  new_loop ldev "$logf" "$LOG_DEV_KIB" || { fail "losetup failed"; return 1; }
  logdev=$(cat "/sys/block/$(basename "$ldev")/dev")
  uuid="clogd-vm-${CASE}-$(od -An -tx4 -N8 /dev/urandom | tr -d ' ')"
  MIRROR="m-${CASE}"
  local table
  table=$(mirror_table disk 0 0 "$uuid" "$leg0" "$leg1" "$logdev")
  note "dmsetup create ${MIRROR}: ${table}"
  deadline "$DM_STEP_S" dmsetup create "$MIRROR" --table "$table" ||
    { fail "dmsetup create failed"; return 1; }
  wait_resync || return 1

  local reconnects_before enospc_before old_pid=$CLOGD_PID
  reconnects_before=$(dmesg_count "Reconnected to userspace log server")
  enospc_before=$(dmesg_count "Insufficient space to receive package")
  kill_clogd
  note "killed the idle clogd (pid ${old_pid}) with SIGKILL"
  start_clogd || return 1
  dd if=/dev/urandom of="${WORK}/data1" bs=1M count=1 status=none
  if ! write_and_verify "${WORK}/data1" 24 "$f0" "$f1"; then
    if (($(dmesg_count "Insufficient space to receive package") > enospc_before)); then
      REASON="${REASON}, after the kernel dropped a reply: $(dmesg | grep "Insufficient space" | tail -n 1 | sed 's/^\[[^]]*\] //') (the retried IN_SYNC failed, so the write went to the default leg only; an error reply must keep data_size at the request's reply size)"
    fi
    return 1
  fi
  (($(dmesg_count "Reconnected to userspace log server") > reconnects_before)) ||
    { fail "the kernel never re-created the log (no 'Reconnected to userspace log server')"; return 1; }
  if (($(dmesg_count "Insufficient space to receive package") > enospc_before)); then
    fail "the kernel dropped a reply after the restart: $(dmesg | grep "Insufficient space" | tail -n 1 | sed 's/^\[[^]]*\] //')"
    return 1
  fi
  in_sync || { fail "not in sync after the restart and a write: status $(mirror_sync)"; return 1; }
  deadline "$DM_STEP_S" dmsetup remove "$MIRROR" || { fail "dmsetup remove failed"; return 1; }
  MIRROR=""
  legs_identical "$f0" "$f1" "after the restart and remove" || return 1
  check_disk_log_header "$logf" || return 1
  clogd_alive || fail "the restarted clogd died"
}

case_shutdown() {
  clogd_alive || start_clogd || return 1
  kill -TERM "$CLOGD_PID"
  if ! wait_until "$SHUTDOWN_S" process_gone "$CLOGD_PID"; then
    kill_clogd
    fail "clogd still running ${SHUTDOWN_S} s after SIGTERM"
    return 1
  fi
  wait "$CLOGD_PID"
  local rc=$?
  note "clogd exited with status ${rc} after SIGTERM"
  CLOGD_PID=""
  log_server_listening && fail "a socket still listens on the dm-log-userspace group"
  return 0
}

# What a failed case leaves behind, for whoever reads the log.
diagnose() {
  [[ -n "$MIRROR" ]] && note "status: $(mirror_status || echo "dmsetup status failed or hung")"
  local pid
  for pid in $(ps -eo pid=,stat= | awk '$2 ~ /^D/ { print $1 }'); do
    note "stuck in the kernel: $(ps -o pid=,args= -p "$pid")"
    sed 's/^/  | /' "/proc/${pid}/stack" 2>/dev/null
  done
  # clogd writes every log's state to its log on SIGUSR2.
  clogd_alive && kill -USR2 "$CLOGD_PID" && sleep 1
  note "last kernel messages:"
  dmesg | tail -n 15 | sed 's/^/  | /'
  if [[ -s "$CLOGD_LOG" ]]; then
    note "last clogd log lines:"
    tail -n 30 "$CLOGD_LOG" | sed 's/^/  | /'
  fi
}

run_case() {
  CASE=$1
  local fn=$2
  shift 2
  REASON=""
  local started rc
  started=$(uptime_s)
  note "---- ${CASE}"
  "$fn" "$@"
  rc=$?
  [[ $rc -ne 0 && -z "$REASON" ]] && REASON="failed with status ${rc}"
  local took
  took=$(awk -v a="$started" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')
  if [[ $rc -eq 0 ]]; then
    echo "PASS ${CASE} (${took} s)"
    PASSED=$((PASSED + 1))
  else
    echo "FAIL ${CASE}: ${REASON} (${took} s)"
    FAILED=$((FAILED + 1))
    diagnose
  fi
  cleanup_case
}

ALL_CASES=(no-daemon core core-integrated-flush core-nosync disk disk-integrated-flush
  restart-core restart-disk restart-idle-disk shutdown)
cases=("$@")
[[ ${#cases[@]} -gt 0 ]] || cases=("${ALL_CASES[@]}")

mkdir -p "$WORK"
: >"$CLOGD_LOG"
note "mirror test: ${LEG_MIB} MiB legs, region ${REGION_SECTORS} sectors, ${REGIONS} regions; kernel $(uname -r)"
if [[ ! -f "${REPO}/main.ts" ]]; then
  note "no ${REPO}/main.ts: the cases that need clogd will fail"
fi
for c in "${cases[@]}"; do
  case "$c" in
    no-daemon) run_case "$c" case_no_daemon ;;
    core) run_case "$c" mirror_case core 0 0 ;;
    core-integrated-flush) run_case "$c" mirror_case core 1 0 ;;
    core-nosync) run_case "$c" mirror_case core 0 1 ;;
    disk) run_case "$c" mirror_case disk 0 0 ;;
    disk-integrated-flush) run_case "$c" mirror_case disk 1 0 ;;
    restart-core) run_case "$c" restart_case core ;;
    restart-disk) run_case "$c" restart_case disk ;;
    restart-idle-disk) run_case "$c" restart_idle_case ;;
    shutdown) run_case "$c" case_shutdown ;;
    *) echo "FAIL ${c}: unknown case"; FAILED=$((FAILED + 1)) ;;
  esac
done
kill_clogd
# Not in the "N passed, N failed" form: CI reads that form as the whole run's result.
echo "mirror_test summary: passed ${PASSED}, failed ${FAILED}"
[[ $FAILED -eq 0 ]]
