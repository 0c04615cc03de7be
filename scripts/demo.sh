#!/usr/bin/env bash
# The main job: clogd serving a realistic kernel workload. In a private network namespace, the
# daemon runs as it would on a node, and the kernel simulator plays device-mapper's side over
# real netlink: mirrors created, resynced while written and read, suspended and resumed, status
# queried, removed; then a clustered-disk log with integrated flush, a kill -9 of the daemon in
# the middle of writes, and the kernel's reconnect (ESRCH, re-CTR, RESUME). Every answer is
# checked by the simulator; `clogd status` shows the daemon's view on the way. Last, a three-node
# cluster (corosync and clogd per node, in network namespaces) under load, with a daemon killed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/scripts/deno/node_modules/.bin:$PATH"

ns="clogd-demo-$$"
dir=$(mktemp -d /tmp/clogd-demo.XXXXXX)
daemon_pid=""
cluster_up=""
cleanup() {
  [ -n "$daemon_pid" ] && kill -9 "$daemon_pid" 2>/dev/null || true
  [ -n "$cluster_up" ] && deno run --allow-all scripts/cluster.ts --dir "$dir/cluster" down >/dev/null 2>&1 || true
  ip netns delete "$ns" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$ns"

clogd() { deno run --allow-all --v8-flags=--stack-size=2048 main.ts "$@"; }
in_ns() { ip netns exec "$ns" "$@"; }
start_daemon() {
  in_ns deno run --allow-all --v8-flags=--stack-size=2048 main.ts serve --standalone \
    --accept-user-peers --control "$dir/clogd.sock" --pidfile "$dir/clogd.pid" \
    2> >(sed -u 's/^/    | /' >&2) &
  disown $! 2>/dev/null || true
  for _ in $(seq 100); do
    if clogd status --control "$dir/clogd.sock" >/dev/null 2>&1; then
      daemon_pid=$(cat "$dir/clogd.pid") # the daemon's own pid (not the backgrounded shell's)
      return 0
    fi
    sleep 0.1
  done
  echo "demo: clogd did not start" >&2
  exit 1
}
show_status() {
  echo "  \$ clogd status"
  clogd status --control "$dir/clogd.sock" | sed 's/^/    /'
}
sim() { in_ns deno run --allow-all main.ts kernel-sim "$@"; }

echo "== 1. clogd serve --standalone (in network namespace $ns; its log lines are prefixed with |)"
start_daemon
sleep 0.5

echo
echo "== 2. Two clustered-core mirrors of 4,096 regions: resync while writing and reading, 8 bios in"
echo "      flight each, two suspend/resume cycles, dmsetup status every 0.5 s, then removal"
sim --logs 2 --regions 4096 --region-size 1024 --ios 6000 --iodepth 8 --read-share 0.3 \
  --hot-regions 0.05 --suspend-cycles 2 --status-every-ms 500 --uuid demo-core --seed 7 \
  > "$dir/sim2.out" 2>&1 &
sim_pid=$!
sleep 2
show_status
wait "$sim_pid"
sed 's/^/  /' "$dir/sim2.out"

echo
echo "== 3. A clustered-disk mirror with integrated flush on a log file: every FLUSH answered only"
echo "      once its marks are on stable storage (fdatasync, group commit)"
truncate -s 1M "$dir/log0.img"
sim --type disk --device "$dir/log%d.img" --disk-fresh --regions 8192 --region-size 512 \
  --integrated-flush --ios 4000 --iodepth 32 --uuid demo-disk --seed 9 | sed 's/^/  /'

echo
echo "== 4. kill -9 clogd in the middle of writes, start it again: the simulated kernel gets -ESRCH,"
echo "      re-sends CTR and RESUME, and clogd rebuilds the log from the disk"
sim --type disk --device "$dir/log%d.img" --regions 8192 --region-size 512 --integrated-flush \
  --duration 6 --iodepth 16 --uuid demo-disk --esrch-retry-ms 300 --timeout-ms 2000 \
  --after-restart unknown --seed 10 > "$dir/sim4.out" 2>&1 &
sim_pid=$!
sleep 2
show_status
echo "  kill -9 clogd (pid $daemon_pid)"
kill -9 "$daemon_pid"
while kill -0 "$daemon_pid" 2>/dev/null; do sleep 0.05; done
daemon_pid=""
sleep 0.5
echo "  restarting clogd"
start_daemon
wait "$sim_pid" && rc=0 || rc=$?
sed 's/^/  /' "$dir/sim4.out"

if [ "$rc" -eq 0 ]; then
  echo
  echo "== 5. A three-node cluster on this machine (deno task cluster): one network namespace, corosync"
  echo "      and clogd (cluster mode) per node; a simulated kernel on every node writes one shared"
  echo "      clustered-core log; node 2's clogd is killed with kill -9 in the middle and restarted"
  cl() { deno run --allow-all --v8-flags=--stack-size=2048 scripts/cluster.ts --dir "$dir/cluster" "$@"; }
  cluster_up=1
  cl up 3 | sed 's/^/  /'
  # A request in flight when a daemon dies is lost with it; the real kernel resends it after
  # 15 s, the simulated one here after 2 s (then -ESRCH, re-CTR, RESUME: a join with a checkpoint).
  # The mirrors stay resumed at the end (--no-remove), so the replicas can be compared at rest.
  cl load all --duration 8 --logs 1 -- --timeout-ms 2000 --esrch-retry-ms 300 --no-remove \
    > "$dir/load5.out" 2>&1 &
  load_pid=$!
  sleep 3
  echo "  kill -9 node 2's clogd, then start it again (times: when the others saw it, ms)"
  cl fault kill-daemon 2 | sed 's/^/    /'
  cl fault restart-daemon 2 | sed 's/^/    /'
  wait "$load_pid" && rc=0 || rc=$?
  grep -E '"(node|requests|answered|violations|requestsPerSec)"' "$dir/load5.out" | sed 's/^/  /'
  echo "  \$ deno task cluster status   (node 2's kernel got -ESRCH, re-sent CTR and RESUME and"
  echo "    rejoined with a checkpoint: every node holds the log, with the same digest)"
  cl status | sed 's/^/    /'
  cl down | sed 's/^/  /'
  cluster_up=""
fi
echo
if [ "$rc" -eq 0 ]; then
  echo "demo: done; every answer matched the simulated kernel's model"
else
  echo "demo: the kernel simulator reported problems (exit $rc)" >&2
  exit "$rc"
fi
