#!/usr/bin/env bash
# Installs what clogd needs to run, test and demo on a fresh Debian 12 machine: Deno (pinned in
# package.json, from npm) and the Debian packages (corosync, libcpg, qemu, debootstrap, dmsetup,
# iproute2, nftables). Idempotent: does nothing that is already done. Run as root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

# Deno is pinned in scripts/deno/package.json (not at the top level: a package.json there makes
# `deno task` resolve it as npm dependencies, and the deno package's per-platform builds fail to).
deno=scripts/deno/node_modules/.bin/deno
if [ ! -x "$deno" ] || ! "$deno" --version >/dev/null 2>&1; then
  echo "install: deno from npm (scripts/deno/package-lock.json)"
  # Not `npm ci`: the deno package lists a build per platform as optional dependencies, the lock
  # holds only this platform's, and npm ci rejects such a lock as out of sync. npm install
  # installs exactly what the lock pins and leaves it unchanged.
  npm install --prefix scripts/deno --no-audit --no-fund --loglevel=error
fi

need=()
command -v corosync >/dev/null 2>&1 || need+=(corosync)
[ -e /usr/lib/x86_64-linux-gnu/libcpg.so.4 ] || need+=(libcpg4)
[ -e /usr/include/corosync/cpg.h ] || need+=(libcpg-dev)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v dmsetup >/dev/null 2>&1 || need+=(dmsetup)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v mke2fs >/dev/null 2>&1 || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "install: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
"$deno" --version | head -1
