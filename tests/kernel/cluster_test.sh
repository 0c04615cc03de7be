#!/bin/bash
# Real-kernel CLUSTER test of clogd, run inside each of two qemu guests by
# scripts/vm/run_cluster.sh (not by hand: it needs the host's shared disks, link and kill):
#   tests/kernel/cluster_test.sh --node N --run-id ID [--victim writer|other|1|2]
#                                [--token MS] [--clogd-log-level L]
#
# Both guests see the same raw disks: /dev/vdb and /dev/vdc (the mirror's legs) and /dev/vdd
# (the clustered-disk log), and reach each other over a qemu UDP link on the host's loopback
# (eth0, 10.213.0.N/24 inside the guests only). A 9p share mounted at /share/coord holds the
# barriers between the guests, the data each one wrote (so the other can check it), the victim's
# write progress and the host's kill notice.
#
# Steps (each prints `PASS <step> (<s> s)` or `FAIL <step>: <reason>`; the first failure ends the
# guest, after telling the peer through /share/coord/abort.N):
#   corosync          corosync (knet over eth0, two_node) sees both nodes and is quorate
#   clogd-start       clogd in cluster mode listens on the dm-log-userspace netlink group
#   create            the same mirror (userspace log, clustered-disk on /dev/vdd; legs are linear
#                     dm devices over /dev/vdb and /dev/vdc) created on both
#   initial-resync    both kernels report every region in sync, and the random data the host put
#                     on leg 0 only is on both legs
#   writes            each node writes a distinct 2 MiB area and its half (alternate 64 KiB
#                     blocks) of a shared 2 MiB area, O_DIRECT through its own mirror
#   verify-writes     each node reads back all three areas (its own and the peer's data) through
#                     the mirror and from both legs, and is still in sync
#   status            `clogd status --json` on both: members [1,2], the same writer, equal digests,
#                     syncCount = regionCount. The victim is chosen here (--victim; default the
#                     disk log's writer)
#   kill-writes       both write at once (the victim in 4 parallel streams, one of them into a
#                     shared area); the victim suspends its leg 1 (so its next writes reach leg
#                     0 only and wait, their regions marked) and asks the host to SIGKILL its
#                     qemu; the survivor's writes all complete, with at least one full pass after
#                     it saw the kill
#   membership        (survivor) corosync sees one node and stays quorate; clogd's status shows
#                     members [self] and this node as the writer
#   out-of-sync       (survivor) dmsetup status and status --json report the same sync count,
#                     below the total: the dead node's marked regions; the disk log on /dev/vdd
#                     holds at least that many regions dirty; the legs differ in the victim's area
#                     (its held writes reached leg 0 only)
#   resync            (survivor) after dmsetup suspend + resume the mirror is in sync again
#   verify-data       (survivor) every area read through the mirror and from both legs holds what
#                     was acknowledged: the initial data, phase-1 data of both nodes, the
#                     survivor's writes, every write the victim completed before it died; blocks
#                     the victim never reached are still zero
#   remove            (survivor) dmsetup remove; the disk log then has its header and every
#                     region clean; clogd exits on SIGTERM. (The host then compares the legs.)
# Then `cluster_test summary: node N passed P, failed F`.
set -u

readonly REPO=/repo
readonly RESULTS=${RESULTS:-/results}
readonly COORD=/share/coord
readonly WORK=/tmp/cluster-test
readonly CLOGD_LOG="${RESULTS}/clogd.log"
readonly COROSYNC_DIR=/tmp/corosync

NODE=""
RUN_ID=""
VICTIM_CHOICE=writer
# Totem token timeout (ms). Under software emulation, with two guests and other work on two
# host cores, corosync in a guest sometimes does not run for 0.9-1.5 s ("Process pause
# detected"): with 1000 ms tokens timed out twice in a run (the membership re-formed). 3000 ms
# leaves a margin; failure detection is then about token + consensus (1.2 x token) = 6.6 s.
TOKEN_MS=3000
CLOGD_LOG_LEVEL=info
while [[ $# -gt 0 ]]; do
  case "$1" in
    --node) NODE=$2; shift 2 ;;
    --run-id) RUN_ID=$2; shift 2 ;;
    --victim) VICTIM_CHOICE=$2; shift 2 ;;
    --token) TOKEN_MS=$2; shift 2 ;;
    --clogd-log-level) CLOGD_LOG_LEVEL=$2; shift 2 ;;
    *) echo "FAIL arguments: unknown argument $1"; exit 2 ;;
  esac
done
[[ "$NODE" == 1 || "$NODE" == 2 ]] || { echo "FAIL arguments: --node must be 1 or 2"; exit 2; }
[[ -n "$RUN_ID" ]] || { echo "FAIL arguments: --run-id is required"; exit 2; }
readonly NODE RUN_ID TOKEN_MS CLOGD_LOG_LEVEL
readonly PEER=$((3 - NODE))
readonly CLOGD_CMD=(deno run --allow-all --v8-flags=--stack-size=2048 "${REPO}/main.ts")

# Geometry: 32 MiB legs in 512 KiB regions, 64 regions (scripts/vm/run_cluster.sh makes the
# disks). Fewer regions than mirror_test.sh: with 128 regions the initial resync (both nodes
# at once) took 31-87 s while other work loaded the host (load 5-8); 64 regions take 5.5-8 s.
readonly LEG_MIB=32
readonly SECTORS=$((LEG_MIB * 2048))
readonly REGION_SECTORS=1024
readonly REGIONS=$(((SECTORS + REGION_SECTORS - 1) / REGION_SECTORS))
readonly LEG0=/dev/vdb LEG1=/dev/vdc LOGDEV=/dev/vdd
# The mirror's legs are linear device-mapper devices over the disks, so that the victim can hold
# its writes to leg 1 (suspend it) before it dies: writes that reached leg 0 only, with their
# regions marked, for certain rather than by the luck of the kill's timing.
readonly LINEAR0=cleg0 LINEAR1=cleg1
readonly MIRROR=cmirror
readonly UUID="clogd-vm-cluster-${RUN_ID}"

# Areas of the legs (MiB offsets). The host (run_cluster.sh) fills 2 MiB of leg 0 at
# INITIAL_MIB with random data and leaves everything else zero.
readonly INITIAL_MIB=2
# Phase 1: node N's distinct area at A_DISTINCT_MIB + A_LEN_MIB * (N - 1); a shared area.
readonly A_DISTINCT_MIB=4 A_LEN_MIB=2 A_SHARED_MIB=8
# Shared areas (4 regions each) are split into blocks, node 1 (phase 1) or the survivor (phase
# 2) writing the even ones, the other node the odd ones: the same regions, disjoint bytes. Each
# block is its own dd, and under emulation each costs 0.2-0.7 s (marks and clears go round the
# cluster): the sizes keep the phases at about 10 s.
readonly SHARED_LEN_MIB=2 SHARED_BLOCK_KIB=64
readonly SHARED_BLOCKS=$((SHARED_LEN_MIB * 1024 / SHARED_BLOCK_KIB))
# Phase 2: the shared area, the survivor's own area, the victim's own area (3 streams).
readonly B_SHARED_MIB=10 B_SURVIVOR_MIB=12 B_SURVIVOR_LEN_MIB=4 B_VICTIM_MIB=16
readonly B_CHUNK_KIB=256
readonly B_SURVIVOR_CHUNKS=$((B_SURVIVOR_LEN_MIB * 1024 / B_CHUNK_KIB))
# The victim's streams 0..B_VICTIM_OWN_STREAMS-1 write its own area, B_STREAM_CHUNKS chunks
# each; its last stream writes the odd blocks of the shared area.
readonly B_VICTIM_OWN_STREAMS=3 B_STREAM_CHUNKS=8
readonly B_VICTIM_STREAMS=$((B_VICTIM_OWN_STREAMS + 1))
# The victim asks for its kill once this many of its writes completed (all streams together):
# late enough that both nodes are writing, early enough that most of the survivor's writes
# come after the kill.
readonly KILL_AFTER_WRITES=6

# Deadlines in seconds.
readonly COROSYNC_S=90
# The first clogd start transpiles the daemon under emulation (two guests at once).
readonly DAEMON_READY_S=150
readonly BARRIER_S=240
readonly DM_STEP_S=60
readonly RESYNC_S=120
readonly IO_S=90
# A status query starts a second deno (several seconds under emulation).
readonly STATUS_S=60
# From asking for the kill to being killed (the victim fails after this).
readonly KILL_S=60
# How long the victim waits for every stream's write to be held by the suspended leg 1.
readonly STUCK_S=20
# From seeing the kill to the survivor's writes completing: failure detection (token +
# consensus), then every outstanding request answered.
readonly FAILOVER_IO_S=120
readonly SHUTDOWN_S=20
readonly POLL_S=0.2
# Each status poll is two requests round the cluster, competing with the resync.
readonly RESYNC_POLL_S=1

export DM_DISABLE_UDEV=1

CLOGD_PID=""
COROSYNC_PID=""
BASE_DEPARTURES=0
REASON=""
PASSED=0
FAILED=0
VICTIM=""

uptime_s() { cut -d' ' -f1 /proc/uptime; }
now_ms() {
  local t=${EPOCHREALTIME/./}
  echo $((10#$t / 1000))
}
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }'; }
note() { printf '[%s] node%s: %s\n' "$(uptime_s)" "$NODE" "$*"; }
fail() { REASON="$*"; return 1; }

# Runs a command, giving up on it after $1 seconds; returns even when the command is stuck in
# the kernel (a dmsetup waiting for a reply cannot be killed).
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

wait_until() {
  local secs=$1 end
  shift
  end=$(($(now_ms) + secs * 1000))
  until "$@"; do
    (($(now_ms) >= end)) && return 1
    sleep "${WAIT_POLL_S:-$POLL_S}"
  done
}

# ---- coordination with the peer and the host (files in the 9p share, read uncached)

peer_aborted() { compgen -G "${COORD}/abort.*" >/dev/null; }
abort_reasons() { cat "${COORD}"/abort.* 2>/dev/null | tr '\n' ' '; }

# barrier NAME: waits until the peer reached the same point; fails at once if it gave up.
barrier() {
  local name=$1 started
  started=$(uptime_s)
  : >"${COORD}/barrier.${name}.${NODE}"
  if ! wait_until "$BARRIER_S" barrier_passed "$name"; then
    fail "the peer did not reach barrier ${name} within ${BARRIER_S} s"
    return 1
  fi
  if [[ ! -e "${COORD}/barrier.${name}.${PEER}" ]]; then
    fail "the peer gave up before barrier ${name}: $(abort_reasons)"
    return 1
  fi
  note "barrier ${name} passed after $(since "$started") s"
}
barrier_passed() { [[ -e "${COORD}/barrier.$1.${PEER}" ]] || peer_aborted; }
# Like peer_aborted, for the waits of a single node: the other side's failure ends them early.
other_failed() {
  peer_aborted && { fail "the peer gave up: $(abort_reasons)"; return 0; }
  return 1
}

# ---- netlink, corosync, clogd

# True while a process listens on multicast group 7 of NETLINK_CONNECTOR (see mirror_test.sh).
log_server_listening() {
  awk '$2 == 11 && $3 != 0 && substr($4, 7, 1) ~ /[4567cdefCDEF]/ { found = 1 } END { exit !found }' \
    /proc/net/netlink
}
clogd_alive() { [[ -n "$CLOGD_PID" ]] && kill -0 "$CLOGD_PID" 2>/dev/null; }
process_gone() { ! kill -0 "$1" 2>/dev/null; }

# Prefixes each line with the guest's uptime and wall-clock time (as corosync.log has it):
# clogd's own lines carry no time, and the failover timing is read from them.
stamp_lines() {
  local line up _ now hms
  while IFS= read -r line; do
    read -r up _ </proc/uptime
    now=$EPOCHREALTIME
    printf -v hms '%(%H:%M:%S)T' "${now%.*}"
    printf '[%s %s.%s] %s\n' "$up" "$hms" "${now#*.}" "$line"
  done
}

# failover_split: prints when corosync formed the membership without the victim and when clogd
# handled the crash (wall-clock times in this guest), and clogd's part in ms.
failover_split() {
  local membership handled
  membership=$(grep "A new membership .* Members left: ${VICTIM}" "${RESULTS}/corosync.log" |
    tail -n 1 | awk '{ print $3 }')
  handled=$(grep "Node ${VICTIM} left the group (crash)" "$CLOGD_LOG" | tail -n 1 |
    awk '{ sub(/\]$/, "", $2); print $2 }')
  [[ -n "$membership" && -n "$handled" ]] || { echo "(not found in the logs)"; return 0; }
  awk -v a="$membership" -v b="$handled" 'function s(t, p) { split(t, p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
    BEGIN { printf "corosync formed the membership without node %s at %s, clogd handled the crash at %s: clogd'"'"'s part %.0f ms\n", "'"$VICTIM"'", a, substr(b, 1, 12), (s(b) - s(a)) * 1000 }'
}

setup_network() {
  modprobe virtio_net || { fail "modprobe virtio_net failed"; return 1; }
  wait_until 10 test -e /sys/class/net/eth0 || { fail "no eth0 (the qemu link)"; return 1; }
  ip addr add "10.213.0.${NODE}/24" dev eth0 && ip link set eth0 up ||
    { fail "cannot configure eth0"; return 1; }
}

write_corosync_conf() {
  mkdir -p "$COROSYNC_DIR"
  cat >"${COROSYNC_DIR}/corosync.conf" <<EOF
totem {
  version: 2
  cluster_name: clogdvm
  # Not knet: knet declares a link down when its pings go unanswered for token / 2, and a
  # guest stalled by the host that long (measured: 1.5 s with a 3 s token) then split the
  # cluster in two although the token itself would have arrived in time. udpu only queues.
  transport: udpu
  crypto_cipher: none
  crypto_hash: none
  token: ${TOKEN_MS}
}
system {
  state_dir: /var/lib/corosync
  # corosync's default, real-time priority (only within this guest): the daemons, dd and the
  # kernel's work must not delay the token.
  sched_rr: yes
}
logging {
  to_logfile: yes
  logfile: ${RESULTS}/corosync.log
  to_syslog: no
  to_stderr: no
  timestamp: hires
}
quorum {
  provider: corosync_votequorum
  two_node: 1
}
nodelist {
  node {
    name: node1
    nodeid: 1
    ring0_addr: 10.213.0.1
  }
  node {
    name: node2
    nodeid: 2
    ring0_addr: 10.213.0.2
  }
}
EOF
}

# quorum_nodes: prints "<nodes> <quorate Yes|No>" from corosync-quorumtool.
quorum_nodes() {
  corosync-quorumtool -s 2>/dev/null |
    awk '/^Nodes:/ { n = $2 } /^Quorate:/ { q = $2 } END { print (n == "" ? 0 : n), (q == "" ? "No" : q) }'
}
cluster_of() { [[ "$(quorum_nodes)" == "$1 Yes" ]]; }
# How many memberships corosync formed without a node that was there before: a kill, or a
# partition. (A lost token that re-forms the same membership is harmless: CPG reports no change.)
departures() { grep -c "A new membership .* Members left" "${RESULTS}/corosync.log" 2>/dev/null || true; }
# no_departure WHEN: fails when corosync dropped a node since the cluster came up, other than by
# the kill. A partition under load (two_node keeps both halves quorate) leaves two clogds each
# serving the log alone: the test would no longer test what it claims.
no_departure() {
  local now
  now=$(departures)
  ((now == BASE_DEPARTURES)) && return 0
  fail "corosync dropped a node $((now - BASE_DEPARTURES)) time(s) $1: a stall of a guest split the cluster: $(grep -E "A processor failed|A new membership|Process pause" "${RESULTS}/corosync.log" | tail -n 4 | cut -c1-160 | tr '\n' '|')"
}

step_corosync() {
  setup_network || return 1
  write_corosync_conf
  corosync -f -c "${COROSYNC_DIR}/corosync.conf" >"${RESULTS}/corosync.out" 2>&1 </dev/null &
  COROSYNC_PID=$!
  local started
  started=$(uptime_s)
  if ! wait_until "$COROSYNC_S" cluster_of 2; then
    fail "corosync did not see 2 quorate nodes within ${COROSYNC_S} s (quorumtool: $(quorum_nodes))"
    return 1
  fi
  note "corosync: 2 nodes, quorate, after $(since "$started") s (token ${TOKEN_MS} ms)"
  barrier corosync || return 1
  BASE_DEPARTURES=$(departures)
}

step_clogd_start() {
  local started
  started=$(uptime_s)
  printf '==== clogd start at uptime %s: serve --cluster\n' "$started" >>"$CLOGD_LOG"
  (cd "$REPO" && exec "${CLOGD_CMD[@]}" serve --cluster --log-level "$CLOGD_LOG_LEVEL") \
    > >(stamp_lines >>"$CLOGD_LOG") 2>&1 </dev/null &
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
  note "clogd (pid ${CLOGD_PID}) listening after $(since "$started") s"
  barrier clogd-up
}
ready_or_dead() { ! clogd_alive || log_server_listening; }

# ---- the mirror

mirror_status() {
  deadline 30 dmsetup status "$MIRROR" >"${WORK}/status" 2>&1 || return 1
  cat "${WORK}/status"
}
# "<sync_count>/<regions> <health>", e.g. "128/128 AA".
mirror_sync() {
  local line
  line=$(mirror_status) || { echo "(dmsetup status failed or hung)"; return 1; }
  awk '{ n = $4; print $(5 + n), $(7 + n) }' <<<"$line"
}
in_sync() { [[ "$(mirror_sync)" == "${REGIONS}/${REGIONS} AA" ]]; }
in_sync_or_peer_failed() { in_sync || other_failed; }

wait_resync() {
  local started
  started=$(uptime_s)
  if ! WAIT_POLL_S=$RESYNC_POLL_S wait_until "$RESYNC_S" in_sync_or_peer_failed; then
    fail "not in sync after ${RESYNC_S} s: status $(mirror_sync)"
    return 1
  fi
  [[ -z "$REASON" ]] || return 1
  note "in sync (${REGIONS}/${REGIONS}) after $(since "$started") s"
}

step_create() {
  local dev
  for dev in "$LEG0" "$LEG1" "$LOGDEV"; do
    [[ -b "$dev" ]] || { fail "no ${dev}: the host did not attach the shared disks"; return 1; }
  done
  [[ $(blockdev --getsize64 "$LEG0") == $((LEG_MIB * 1048576)) ]] ||
    { fail "${LEG0} is not ${LEG_MIB} MiB"; return 1; }
  local logdev table
  logdev=$(cat "/sys/block/$(basename "$LOGDEV")/dev")
  deadline "$DM_STEP_S" dmsetup create "$LINEAR0" --table "0 ${SECTORS} linear ${LEG0} 0" &&
    deadline "$DM_STEP_S" dmsetup create "$LINEAR1" --table "0 ${SECTORS} linear ${LEG1} 0" ||
    { fail "cannot create the linear legs"; return 1; }
  table="0 ${SECTORS} mirror userspace 4 ${UUID} clustered-disk ${logdev} ${REGION_SECTORS} 2 /dev/mapper/${LINEAR0} 0 /dev/mapper/${LINEAR1} 0"
  barrier before-create || return 1
  note "dmsetup create ${MIRROR}: ${table}"
  deadline "$DM_STEP_S" dmsetup create "$MIRROR" --table "$table" ||
    { fail "dmsetup create failed"; return 1; }
  dmsetup table "$MIRROR" | grep -q "userspace .*${UUID}" ||
    { fail "the loaded table lacks the userspace log: $(dmsetup table "$MIRROR")"; return 1; }
}

step_initial_resync() {
  wait_resync || return 1
  barrier initial-sync || return 1
  # The data the host put on leg 0 only, now on both (the legs as a whole are compared at the
  # end: a full compare here costs 10 s while the peer works too).
  expect_area "$INITIAL_MIB" "${COORD}/initial.bin" "the initial data"
}

# expect_area OFFSET_MIB FILE WHAT: the mirror and both legs hold FILE at OFFSET_MIB.
expect_area() {
  local off=$1 file=$2 what=$3 mib src
  mib=$(($(stat -c %s "$file") / 1048576))
  for src in "/dev/mapper/${MIRROR}" "$LEG0" "$LEG1"; do
    deadline "$IO_S" dd if="$src" of="${WORK}/readback" bs=1M skip="$off" count="$mib" \
      iflag=direct status=none || { fail "reading ${what} from ${src} failed"; return 1; }
    cmp -s "$file" "${WORK}/readback" ||
      { fail "${src} does not hold ${what} at ${off} MiB: $(cmp "$file" "${WORK}/readback" 2>&1 | head -n 1)"; return 1; }
  done
}

# write_blocks FILE OFFSET_MIB BLOCK_KIB FIRST STEP COUNT: writes blocks FIRST, FIRST+STEP, ...
# (COUNT of them) of FILE to the mirror at OFFSET_MIB, one O_DIRECT dd each.
write_blocks() {
  local file=$1 off=$2 kib=$3 first=$4 step=$5 count=$6 i b
  for ((i = 0; i < count; i++)); do
    b=$((first + i * step))
    dd if="$file" of="/dev/mapper/${MIRROR}" bs="${kib}K" skip="$b" \
      seek=$((off * 1024 / kib + b)) count=1 oflag=direct conv=notrunc status=none ||
      return 1
  done
}

# merge_blocks OUT EVEN_FILE ODD_FILE BLOCK_KIB BLOCKS: OUT gets the even blocks of EVEN_FILE and
# the odd blocks of ODD_FILE.
merge_blocks() {
  local out=$1 even=$2 odd=$3 kib=$4 blocks=$5 b
  cp "$even" "$out"
  for ((b = 1; b < blocks; b += 2)); do
    dd if="$odd" of="$out" bs="${kib}K" skip="$b" seek="$b" count=1 conv=notrunc status=none
  done
}

step_writes() {
  local distinct="${WORK}/a-distinct.${NODE}" shared="${WORK}/a-shared.${NODE}"
  dd if=/dev/urandom of="$distinct" bs=1M count="$A_LEN_MIB" status=none
  dd if=/dev/urandom of="$shared" bs=1M count="$SHARED_LEN_MIB" status=none
  cp "$distinct" "$shared" "$COORD/" || { fail "cannot share the data with the peer"; return 1; }
  barrier writes || return 1
  local started off
  started=$(uptime_s)
  off=$((A_DISTINCT_MIB + A_LEN_MIB * (NODE - 1)))
  deadline "$IO_S" dd if="$distinct" of="/dev/mapper/${MIRROR}" bs=1M seek="$off" \
    oflag=direct conv=notrunc status=none ||
    { fail "writing the distinct area at ${off} MiB failed"; return 1; }
  # Node 1 the even blocks, node 2 the odd ones, both at once.
  deadline "$IO_S" write_blocks "$shared" "$A_SHARED_MIB" "$SHARED_BLOCK_KIB" $((NODE - 1)) 2 \
    $((SHARED_BLOCKS / 2)) || { fail "writing the shared area failed"; return 1; }
  note "wrote ${A_LEN_MIB} MiB at ${off} MiB and $((SHARED_BLOCKS / 2)) blocks of ${SHARED_BLOCK_KIB} KiB in the shared area in $(since "$started") s"
}

step_verify_writes() {
  barrier written || return 1
  local n
  for n in 1 2; do
    expect_area $((A_DISTINCT_MIB + A_LEN_MIB * (n - 1))) "${COORD}/a-distinct.${n}" \
      "node ${n}'s distinct data" || return 1
  done
  merge_blocks "${WORK}/a-shared.expected" "${COORD}/a-shared.1" "${COORD}/a-shared.2" \
    "$SHARED_BLOCK_KIB" "$SHARED_BLOCKS"
  expect_area "$A_SHARED_MIB" "${WORK}/a-shared.expected" "both nodes' blocks of the shared area" ||
    return 1
  in_sync || { fail "not in sync after the writes: status $(mirror_sync)"; return 1; }
}

# status_json FILE: `clogd status --json` into FILE.
status_json() {
  deadline "$STATUS_S" "${CLOGD_CMD[@]}" status --json >"$1" 2>"${WORK}/status.err" ||
    { fail "clogd status --json failed: $(head -c 300 "${WORK}/status.err")"; return 1; }
}
# json_field FILE KEY: the first scalar value of KEY in a pretty-printed JSON file. The status
# holds one log, so the per-log keys (syncCount, digest, writer...) are unique.
json_field() {
  awk -v key="\"$2\":" '$1 == key { v = $2; sub(/,$/, "", v); gsub(/"/, "", v); print v; exit }' "$1"
}
# json_members FILE: the log's members, comma-separated.
json_members() {
  awk '/"members": \[\]/ { print ""; exit }
    /"members": \[/ { m = 1; out = ""; next }
    m && /\]/ { print out; exit }
    m { v = $1; sub(/,$/, "", v); out = (out == "" ? v : out "," v) }' "$1"
}

step_status() {
  local mine="${COORD}/status-1.${NODE}.json" theirs="${COORD}/status-1.${PEER}.json"
  status_json "$mine" || return 1
  barrier status || return 1
  local f members writer sync regions
  for f in "$mine" "$theirs"; do
    members=$(json_members "$f")
    writer=$(json_field "$f" writer)
    sync=$(json_field "$f" syncCount)
    regions=$(json_field "$f" regionCount)
    [[ "$members" == "1,2" ]] || { fail "$(basename "$f"): members [${members}], want [1,2]"; return 1; }
    [[ "$writer" == 1 || "$writer" == 2 ]] || { fail "$(basename "$f"): writer ${writer}"; return 1; }
    [[ "$sync" == "$REGIONS" && "$regions" == "$REGIONS" ]] ||
      { fail "$(basename "$f"): syncCount ${sync}, regionCount ${regions}, want ${REGIONS}"; return 1; }
  done
  no_departure "before the kill" || return 1
  local d1 d2 w1 w2
  d1=$(json_field "$mine" digest)
  d2=$(json_field "$theirs" digest)
  w1=$(json_field "$mine" writer)
  w2=$(json_field "$theirs" writer)
  [[ -n "$d1" && "$d1" == "$d2" ]] || { fail "digests differ: node ${NODE} ${d1}, node ${PEER} ${d2}"; return 1; }
  [[ "$w1" == "$w2" ]] || { fail "the nodes name different writers: ${w1} and ${w2}"; return 1; }
  case "$VICTIM_CHOICE" in
    writer) VICTIM=$w1 ;;
    other) VICTIM=$((3 - w1)) ;;
    1 | 2) VICTIM=$VICTIM_CHOICE ;;
    *) fail "--victim must be writer, other, 1 or 2"; return 1 ;;
  esac
  note "members [1,2], writer ${w1}, digest ${d1}; node ${VICTIM} will be killed"
}

# ---- phase 2: writes across the kill

victim_stream() { # victim_stream S: loops over its chunks until the guest dies
  local s=$1 file kib off first step count i pass=0
  if ((s < B_VICTIM_OWN_STREAMS)); then
    file="${WORK}/b-victim.bin" kib=$B_CHUNK_KIB off=$B_VICTIM_MIB
    first=$((s * B_STREAM_CHUNKS)) step=1 count=$B_STREAM_CHUNKS
  else
    file="${WORK}/b-shared.bin" kib=$SHARED_BLOCK_KIB off=$B_SHARED_MIB
    first=1 step=2 count=$((SHARED_BLOCKS / 2))
  fi
  while :; do
    for ((i = 0; i < count; i++)); do
      write_blocks "$file" "$off" "$kib" $((first + i * step)) 1 1 || exit 1
      # Only what completed is recorded: the survivor checks exactly these writes. Renamed
      # into place, so that the kill never leaves an empty or half-written record behind.
      echo "${pass} ${i}" >"${COORD}/b-progress.${s}.tmp" &&
        mv "${COORD}/b-progress.${s}.tmp" "${COORD}/b-progress.${s}"
      echo >>"${WORK}/b-done.${s}"
    done
    pass=$((pass + 1))
  done
}
victim_writes_done() {
  local total=0 s n
  for ((s = 0; s < B_VICTIM_STREAMS; s++)); do
    n=$({ wc -l <"${WORK}/b-done.${s}"; } 2>/dev/null || echo 0)
    total=$((total + n))
  done
  echo "$total"
}
victim_ready_to_die() { (($(victim_writes_done) >= KILL_AFTER_WRITES)) || other_failed; }

run_victim() {
  local s pids=()
  dd if=/dev/urandom of="${WORK}/b-victim.bin" bs="${B_CHUNK_KIB}K" \
    count=$((B_VICTIM_OWN_STREAMS * B_STREAM_CHUNKS)) status=none
  dd if=/dev/urandom of="${WORK}/b-shared.bin" bs=1M count="$SHARED_LEN_MIB" status=none
  cp "${WORK}/b-victim.bin" "${WORK}/b-shared.bin" "$COORD/" ||
    { fail "cannot share the data with the peer"; return 1; }
  barrier kill-writes || return 1
  for ((s = 0; s < B_VICTIM_STREAMS; s++)); do
    victim_stream "$s" &
    pids+=($!)
  done
  if ! wait_until "$IO_S" victim_ready_to_die; then
    fail "the victim's writes made no progress ($(victim_writes_done) done)"
    return 1
  fi
  [[ -z "$REASON" ]] || return 1
  for s in "${pids[@]}"; do
    kill -0 "$s" 2>/dev/null || { fail "a victim write failed before the kill"; return 1; }
  done
  # Writes from now on reach leg 0 and wait for leg 1, their regions marked, until the kill.
  note "suspending ${LINEAR1} (leg 1 of this node's mirror) after $(victim_writes_done) writes"
  deadline "$DM_STEP_S" dmsetup suspend --noflush "$LINEAR1" || { fail "cannot suspend ${LINEAR1}"; return 1; }
  if ! wait_until "$STUCK_S" streams_stuck; then
    note "only $(stuck_writes) of ${B_VICTIM_STREAMS} streams waited on leg 1 after ${STUCK_S} s"
    (($(stuck_writes) > 0)) || { fail "no write waited on the suspended leg 1"; return 1; }
  fi
  note "asking the host for the kill: $(stuck_writes) writes wait on leg 1, $(victim_writes_done) completed"
  echo "$NODE" >"${COORD}/kill-request.tmp" && mv "${COORD}/kill-request.tmp" "${COORD}/kill-request"
  sleep "$KILL_S"
  fail "still alive ${KILL_S} s after asking the host to kill this guest"
}

# Writes stuck in the kernel: dd processes in uninterruptible sleep.
stuck_writes() { ps -eo stat=,comm= | awk '$1 ~ /^D/ && $2 == "dd" { n++ } END { print n + 0 }'; }
streams_stuck() { (($(stuck_writes) >= B_VICTIM_STREAMS)); }

killed_or_aborted() { [[ -e "${COORD}/killed" ]] || peer_aborted; }

survivor_writer() {
  local i pass=0 seen_kill_in_pass=-1
  while :; do
    for ((i = 0; i < B_SURVIVOR_CHUNKS; i++)); do
      write_blocks "${WORK}/b-survivor.bin" "$B_SURVIVOR_MIB" "$B_CHUNK_KIB" "$i" 1 1 || exit 1
      write_blocks "${WORK}/b-shared.survivor" "$B_SHARED_MIB" "$SHARED_BLOCK_KIB" $((2 * i)) 1 1 ||
        exit 1
      echo "${pass} ${i}" >"${WORK}/b-progress.survivor"
    done
    # Done after one whole pass begun after the kill was seen.
    ((seen_kill_in_pass >= 0 && seen_kill_in_pass < pass)) && exit 0
    ((seen_kill_in_pass < 0)) && [[ -e "${WORK}/killed-seen" ]] && seen_kill_in_pass=$pass
    pass=$((pass + 1))
  done
}

run_survivor() {
  dd if=/dev/urandom of="${WORK}/b-survivor.bin" bs="${B_CHUNK_KIB}K" count="$B_SURVIVOR_CHUNKS" \
    status=none
  dd if=/dev/urandom of="${WORK}/b-shared.survivor" bs=1M count="$SHARED_LEN_MIB" status=none
  barrier kill-writes || return 1
  local writer started
  started=$(uptime_s)
  survivor_writer &
  writer=$!
  if ! wait_until "$KILL_S" killed_or_aborted || [[ ! -e "${COORD}/killed" ]]; then
    kill "$writer" 2>/dev/null
    fail "the host did not kill node ${VICTIM} within ${KILL_S} s ($(abort_reasons))"
    return 1
  fi
  : >"${WORK}/killed-seen"
  KILL_SEEN=$(uptime_s)
  note "the host killed node ${VICTIM}: $(cat "${COORD}/killed"); my writes so far: $(cat "${WORK}/b-progress.survivor" 2>/dev/null || echo none)"
  # Failure detection as corosync reports it, while the writes go on.
  if ! wait_until "$FAILOVER_IO_S" cluster_of 1; then
    fail "corosync still reports $(quorum_nodes) (nodes, quorate) ${FAILOVER_IO_S} s after the kill"
    return 1
  fi
  DETECTED_S=$(since "$KILL_SEEN")
  note "corosync: 1 node, quorate, ${DETECTED_S} s after the kill was seen"
  if ! wait_until "$FAILOVER_IO_S" process_gone "$writer"; then
    kill "$writer" 2>/dev/null
    fail "the survivor's writes did not complete within ${FAILOVER_IO_S} s of the kill (at $(cat "${WORK}/b-progress.survivor" 2>/dev/null))"
    return 1
  fi
  wait "$writer" || { fail "a survivor write failed (at $(cat "${WORK}/b-progress.survivor"))"; return 1; }
  note "the survivor's writes completed $(since "$KILL_SEEN") s after the kill was seen ($(since "$started") s in all)"
}

step_kill_writes() {
  if ((NODE == VICTIM)); then run_victim; else run_survivor; fi
}

step_membership() {
  cluster_of 1 || { fail "corosync reports $(quorum_nodes) (nodes, quorate), want 1 Yes"; return 1; }
  BASE_DEPARTURES=$((BASE_DEPARTURES + 1))
  no_departure "besides the kill" || return 1
  local f="${WORK}/status-2.json"
  status_json "$f" || return 1
  cp "$f" "${RESULTS}/status-after-kill.json"
  local members writer
  members=$(json_members "$f")
  writer=$(json_field "$f" writer)
  [[ "$members" == "$NODE" ]] || { fail "clogd's members are [${members}], want [${NODE}]"; return 1; }
  [[ "$writer" == "$NODE" ]] || { fail "clogd's writer is ${writer}, want ${NODE} (the survivor)"; return 1; }
  note "failover: $(failover_split)"
}

# disk_log_dirty FILE: prints how many of the REGIONS clean bits (at byte 1024) are 0.
disk_log_dirty() {
  od -An -v -tu1 -j1024 -N$(((REGIONS + 7) / 8)) "$1" |
    awk -v n="$REGIONS" '{ for (i = 1; i <= NF; i++) { b = $i
        for (k = 0; k < 8; k++) { if (r < n && b % 2 == 0) d++; b = int(b / 2); r++ } } }
      END { print d + 0 }'
}
read_log_dev() { dd if="$LOGDEV" of="$1" bs=4096 count=1 iflag=direct status=none; }

step_out_of_sync() {
  local f="${WORK}/status-2.json" json_sync dm_sync dirty
  json_sync=$(json_field "$f" syncCount)
  dm_sync=$(mirror_sync | cut -d/ -f1)
  note "after the kill: dmsetup $(mirror_sync), clogd syncCount ${json_sync}"
  [[ "$json_sync" =~ ^[0-9]+$ ]] || { fail "no syncCount in clogd's status"; return 1; }
  ((json_sync < REGIONS)) ||
    { fail "clogd reports ${json_sync}/${REGIONS} in sync: the dead node's marked regions must be out of sync"; return 1; }
  [[ "$dm_sync" == "$json_sync" ]] ||
    { fail "dmsetup status says ${dm_sync} in sync, clogd ${json_sync}"; return 1; }
  read_log_dev "${WORK}/log-after-kill" || { fail "cannot read ${LOGDEV}"; return 1; }
  cp "${WORK}/log-after-kill" "${RESULTS}/log-after-kill.bin"
  dirty=$(disk_log_dirty "${WORK}/log-after-kill")
  note "disk log: ${dirty} of ${REGIONS} regions dirty"
  ((dirty >= REGIONS - json_sync)) ||
    { fail "the disk log has ${dirty} regions dirty, fewer than the $((REGIONS - json_sync)) out of sync"; return 1; }
  # The victim's writes held by its suspended leg 1 reached leg 0 only: in its own area (no
  # one else writes there) the legs differ until the resync copies leg 0 over leg 1.
  local mib=$((B_VICTIM_OWN_STREAMS * B_STREAM_CHUNKS * B_CHUNK_KIB / 1024)) first
  deadline "$IO_S" dd if="$LEG0" of="${WORK}/victim-leg0" bs=1M skip="$B_VICTIM_MIB" count="$mib" \
    iflag=direct status=none &&
    deadline "$IO_S" dd if="$LEG1" of="${WORK}/victim-leg1" bs=1M skip="$B_VICTIM_MIB" \
      count="$mib" iflag=direct status=none || { fail "reading the victim's area failed"; return 1; }
  first=$(cmp "${WORK}/victim-leg0" "${WORK}/victim-leg1" 2>/dev/null | awk '{ sub(/,$/, "", $5); print $5 }')
  [[ -n "$first" ]] ||
    { fail "the legs are identical in the victim's area: none of its held writes reached leg 0"; return 1; }
  note "the legs differ in the victim's area from byte ${first} (its chunk $(((first - 1) / (B_CHUNK_KIB * 1024))), held by leg 1)"
}

step_resync() {
  local started
  started=$(uptime_s)
  deadline "$DM_STEP_S" dmsetup suspend "$MIRROR" || { fail "dmsetup suspend failed"; return 1; }
  deadline "$DM_STEP_S" dmsetup resume "$MIRROR" || { fail "dmsetup resume failed"; return 1; }
  wait_resync || return 1
  note "suspend, resume and resync took $(since "$started") s"
}

# read_area OUT OFFSET_MIB LEN_MIB: OUT gets that area of leg 0 (what the mirror reads).
read_area() {
  deadline "$IO_S" dd if="$LEG0" of="$1" bs=1M skip="$2" count="$3" iflag=direct status=none
}
# put_blocks OUT SRC FIRST COUNT KIB: blocks FIRST..FIRST+COUNT-1 of SRC into OUT, in place.
put_blocks() {
  (($4 > 0)) || return 0
  dd if="$2" of="$1" bs="${5}K" skip="$3" seek="$3" count="$4" conv=notrunc status=none
}

# victim_acked S: prints "<first> <step> <count> <acked>" for the victim's stream S: its
# blocks are FIRST, FIRST+STEP, ... (COUNT of them), and the first ACKED were written and
# acknowledged (all of them once a pass completed). The stream died at block ACKED (maybe in
# flight); in its first pass, the blocks after that one were never written.
victim_acked() {
  local s=$1 pass i first step count
  if ((s < B_VICTIM_OWN_STREAMS)); then
    first=$((s * B_STREAM_CHUNKS)) step=1 count=$B_STREAM_CHUNKS
  else
    first=1 step=2 count=$((SHARED_BLOCKS / 2))
  fi
  if [[ -s "${COORD}/b-progress.${s}" ]]; then
    read -r pass i <"${COORD}/b-progress.${s}"
  else
    pass=0 i=-1
  fi
  if ((pass > 0)); then echo "$first $step $count $count"; else echo "$first $step $count $((i + 1))"; fi
}

# The expected content of an area the victim wrote starts from what leg 0 holds (the default
# leg, which the resync copied to the other), so that the block a stream had in flight, whose
# content is either, is only required to be the same on the mirror and both legs. Every other
# block is set to what must be there: completed writes, or zeros where the stream never got.
step_verify_data() {
  expect_area "$INITIAL_MIB" "${COORD}/initial.bin" "the initial data" || return 1
  local n
  for n in 1 2; do
    expect_area $((A_DISTINCT_MIB + A_LEN_MIB * (n - 1))) "${COORD}/a-distinct.${n}" \
      "node ${n}'s phase-1 data" || return 1
  done
  expect_area "$A_SHARED_MIB" "${WORK}/a-shared.expected" "the phase-1 shared area" || return 1
  expect_area "$B_SURVIVOR_MIB" "${WORK}/b-survivor.bin" "the survivor's writes" || return 1

  local s first step count acked b checked=0 streams=""
  local own="${WORK}/b-victim.expected" shared="${WORK}/b-shared.expected"
  read_area "$own" "$B_VICTIM_MIB" $((B_VICTIM_OWN_STREAMS * B_STREAM_CHUNKS * B_CHUNK_KIB / 1024)) ||
    { fail "reading the victim's area failed"; return 1; }
  read_area "$shared" "$B_SHARED_MIB" "$SHARED_LEN_MIB" ||
    { fail "reading the phase-2 shared area failed"; return 1; }
  # The survivor's even blocks of the shared area.
  for ((b = 0; b < SHARED_BLOCKS; b += 2)); do
    put_blocks "$shared" "${WORK}/b-shared.survivor" "$b" 1 "$SHARED_BLOCK_KIB"
  done
  for ((s = 0; s < B_VICTIM_STREAMS; s++)); do
    read -r first step count acked < <(victim_acked "$s")
    streams="${streams} ${acked}/${count}"
    checked=$((checked + acked))
    if ((s < B_VICTIM_OWN_STREAMS)); then
      put_blocks "$own" "${COORD}/b-victim.bin" "$first" "$acked" "$B_CHUNK_KIB"
      if ((acked + 1 < count)); then
        put_blocks "$own" /dev/zero $((first + acked + 1)) $((count - acked - 1)) "$B_CHUNK_KIB"
      fi
    else
      for ((b = 0; b < count; b++)); do
        if ((b < acked)); then
          put_blocks "$shared" "${COORD}/b-shared.bin" $((first + b * step)) 1 "$SHARED_BLOCK_KIB"
        elif ((b > acked && acked < count)); then
          put_blocks "$shared" /dev/zero $((first + b * step)) 1 "$SHARED_BLOCK_KIB"
        fi
      done
    fi
  done
  note "the victim's streams had completed${streams} writes"
  expect_area "$B_VICTIM_MIB" "$own" "the victim's completed writes (zeros where it never got)" ||
    return 1
  expect_area "$B_SHARED_MIB" "$shared" \
    "the phase-2 shared area (the survivor's blocks, the victim's completed ones)" || return 1
  note "checked ${checked} completed victim writes"
}

step_remove() {
  deadline "$DM_STEP_S" dmsetup remove "$MIRROR" || { fail "dmsetup remove failed"; return 1; }
  deadline "$DM_STEP_S" dmsetup remove "$LINEAR0" && deadline "$DM_STEP_S" dmsetup remove "$LINEAR1" ||
    { fail "removing the linear legs failed"; return 1; }
  read_log_dev "${WORK}/log-end" || { fail "cannot read ${LOGDEV}"; return 1; }
  local magic version regions want_magic=$((0x4D695272)) dirty
  read -r magic version < <(od -An -tu4 -N8 "${WORK}/log-end")
  regions=$(od -An -tu8 -j8 -N8 "${WORK}/log-end" | tr -d ' ')
  [[ "$magic" == "$want_magic" && "$version" == 2 && "$regions" == "$REGIONS" ]] ||
    { fail "disk log header is magic=${magic} version=${version} nr_regions=${regions}"; return 1; }
  dirty=$(disk_log_dirty "${WORK}/log-end")
  ((dirty == 0)) || { fail "the disk log has ${dirty} regions dirty after resync and remove"; return 1; }
  kill -TERM "$CLOGD_PID"
  if ! wait_until "$SHUTDOWN_S" process_gone "$CLOGD_PID"; then
    fail "clogd still running ${SHUTDOWN_S} s after SIGTERM"
    return 1
  fi
  wait "$CLOGD_PID"
  note "clogd exited with status $? after SIGTERM"
  CLOGD_PID=""
}

# What a failed step leaves behind, for whoever reads the log.
diagnose() {
  dmsetup info "$MIRROR" >/dev/null 2>&1 &&
    note "status: $(mirror_status || echo "dmsetup status failed or hung")"
  note "corosync: $(quorum_nodes) (nodes, quorate)"
  local pid
  for pid in $(ps -eo pid=,stat= | awk '$2 ~ /^D/ { print $1 }'); do
    note "stuck in the kernel: $(ps -o pid=,args= -p "$pid")"
    sed 's/^/  | /' "/proc/${pid}/stack" 2>/dev/null
  done
  clogd_alive && kill -USR2 "$CLOGD_PID" && sleep 1
  note "last kernel messages:"
  dmesg | tail -n 15 | sed 's/^/  | /'
  if [[ -s "$CLOGD_LOG" ]]; then
    note "last clogd log lines:"
    tail -n 30 "$CLOGD_LOG" | sed 's/^/  | /'
  fi
}

run_step() {
  local name=$1 fn=$2 started rc took
  REASON=""
  started=$(uptime_s)
  note "---- ${name}"
  "$fn"
  rc=$?
  [[ $rc -ne 0 && -z "$REASON" ]] && REASON="failed with status ${rc}"
  [[ $rc -eq 0 && -n "$REASON" ]] && rc=1
  took=$(since "$started")
  if [[ $rc -eq 0 ]]; then
    echo "PASS ${name} (${took} s)"
    PASSED=$((PASSED + 1))
    return 0
  fi
  echo "FAIL ${name}: ${REASON} (${took} s)"
  FAILED=$((FAILED + 1))
  echo "node ${NODE} failed ${name}: ${REASON}" >"${COORD}/abort.${NODE}"
  diagnose
  return 1
}

finish() {
  clogd_alive && kill -9 "$CLOGD_PID" 2>/dev/null
  [[ -n "$COROSYNC_PID" ]] && kill "$COROSYNC_PID" 2>/dev/null
  # Not in the "N passed, N failed" form: CI reads that form as the whole run's result.
  echo "cluster_test summary: node ${NODE} passed ${PASSED}, failed ${FAILED}"
  exit $((FAILED > 0 ? 1 : 0))
}

mkdir -p "$WORK" /share/coord
: >"$CLOGD_LOG"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 coord "$COORD"; then
  echo "FAIL setup: cannot mount the coordination share"
  FAILED=1
  finish
fi
note "cluster test, run ${RUN_ID}: ${LEG_MIB} MiB legs, ${REGIONS} regions, kernel $(uname -r)"
for step in corosync clogd-start create initial-resync writes verify-writes status kill-writes; do
  run_step "$step" "step_${step//-/_}" || finish
done
# Only the survivor gets here.
for step in membership out-of-sync resync verify-data remove; do
  run_step "$step" "step_${step//-/_}" || finish
done
: >"${COORD}/survivor-done"
finish
