#!/usr/bin/env bash
# The test command: installs what is missing, runs every test (unit, netlink integration in
# network namespaces, disk crash tests, the real-kernel test under qemu), and prints a plain
# closing line "N passed, N failed". Extra arguments go to `deno test` (e.g. a file or --filter).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
export PATH="$PWD/scripts/deno/node_modules/.bin:$PATH"
junit=$(mktemp /tmp/clogd-junit.XXXXXX.xml)
trap 'rm -f "$junit"' EXIT
deno test --allow-all --v8-flags=--stack-size=2048 --junit-path="$junit" "$@"
rc=$?
# Count test cases (steps included) from the JUnit report: a <testcase> with a <failure> failed.
read -r passed failed < <(deno run --allow-read scripts/junit_count.ts "$junit")
echo "${passed} passed, ${failed} failed"
if [ "$rc" -eq 0 ] && [ "$failed" -ne 0 ]; then rc=1; fi
exit "$rc"
