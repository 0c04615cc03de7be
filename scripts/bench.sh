#!/usr/bin/env bash
# Benchmarks (see scripts/bench/run.ts). Extra arguments go to run.ts (e.g. --seconds 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh >/dev/null
exec scripts/deno/node_modules/.bin/deno run --allow-all --v8-flags=--stack-size=2048 scripts/bench/run.ts "$@"
