#!/usr/bin/env bash
# Builds one executable, dist/clogd, with `deno compile` (permissions and V8 flags baked in, no
# npm tree embedded). deno compile needs Deno's runtime (denort): it downloads it from Deno's
# servers, or uses DENORT_BIN=/path/to/denort. Where neither is possible this says so and fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh >/dev/null
export PATH="$PWD/scripts/deno/node_modules/.bin:$PATH"
version=$(deno --version | awk 'NR==1{print $2}')
mkdir -p dist
if [ -z "${DENORT_BIN:-}" ]; then
  dl="${DENO_DIR:-$HOME/.cache/deno}/dl/release/v${version}/denort-x86_64-unknown-linux-gnu.zip"
  if [ ! -f "$dl" ]; then
    echo "compile: checking whether Deno's runtime (denort ${version}) can be downloaded..."
  fi
fi
log=$(mktemp)
if deno compile --no-npm --allow-all --v8-flags=--stack-size=2048 --output dist/clogd main.ts >"$log" 2>&1; then
  cat "$log"; rm -f "$log"
  echo "compile: built dist/clogd ($(du -h dist/clogd | cut -f1))"
  exit 0
fi
cat "$log" >&2
if ! grep -qiE 'denort|download|error sending request|dns|connect' "$log"; then
  rm -f "$log"
  echo "compile: deno compile failed (see above)" >&2
  exit 1
fi
rm -f "$log"
cat >&2 <<MSG

compile: deno compile could not get Deno's runtime (denort ${version}). It downloads it from
Deno's servers, which this machine cannot reach. Either set DENORT_BIN=/path/to/denort (the
denort binary of Deno ${version} for x86_64-unknown-linux-gnu), or place the runtime zip at
\${DENO_DIR:-~/.cache/deno}/dl/release/v${version}/denort-x86_64-unknown-linux-gnu.zip, then
run "deno task compile" again. Meanwhile "deno task clogd ..." runs clogd from source.
MSG
exit 1
