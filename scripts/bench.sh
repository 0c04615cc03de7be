#!/usr/bin/env bash
# Benchmarks. `deno task bench [--seconds N]`: the standalone daemon (scripts/bench/run.ts).
# `deno task bench --cluster [options]`: the cluster over corosync (scripts/bench/cluster.ts,
# options after --cluster go to it, e.g. --json, --seconds 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh >/dev/null
script=scripts/bench/run.ts
args=()
for arg in "$@"; do
  if [ "$arg" = "--cluster" ]; then
    script=scripts/bench/cluster.ts
  else
    args+=("$arg")
  fi
done
exec scripts/deno/node_modules/.bin/deno run --allow-all --v8-flags=--stack-size=2048 "$script" "${args[@]}"
