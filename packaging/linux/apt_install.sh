#!/usr/bin/env bash
# apt_install.sh PACKAGES WHAT WITHOUT: install Debian packages (PACKAGES: one name or a space-separated list) when
# running as root with apt-get, else print the command that does.
# Optional set-up only: never fails (exit 0), a missing package just skips or slows what needs it.
# Says what happened on one line: "installed", "already present", or "could not install ... (why)".
# apt-get waits up to $APT_LOCK_TIMEOUT seconds (default 300) for dpkg's locks (another apt, unattended-upgrades)
# instead of failing at once with "Could not get lock"; `apt-get update` takes the lists lock, which it waits for too.
set -u
what="$2"
without="$3"
timeout="${APT_LOCK_TIMEOUT:-300}"
missing=()
for p in $1; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$1: already present ($what)"
  exit 0
fi
pkg="${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$pkg: not installed (no apt-get here; install it with your package manager for $what); without it: $without"
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "$pkg: not installed; run 'sudo apt-get install $pkg' for $what; without it: $without"
  exit 0
fi
echo "$pkg: installing ($what); waiting up to ${timeout} s for apt's lock if another apt runs..."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
lock=(-o "DPkg::Lock::Timeout=$timeout")
# `apt-get update` takes the lists lock, for which apt 2.6 does not wait (DPkg::Lock::Timeout covers dpkg's
# locks only): retry it while another process holds that lock. An update that still fails is not fatal: the
# install below runs on the package lists already there and reports its own error.
deadline=$((SECONDS + timeout))
until apt-get "${lock[@]}" update -qq >"$log" 2>&1; do
  grep -qE "Could not get lock|Unable to lock" "$log" && [ "$SECONDS" -lt "$deadline" ] || break
  sleep 2
done
if DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq "${missing[@]}" >>"$log" 2>&1; then
  echo "$pkg: installed"
else
  why="$(grep -E '^(E|W):' "$log" | head -n 3 | tr '\n' ' ')"
  echo "$pkg: could not install (${why:-apt-get failed, see: apt-get install $pkg}); without it: $without"
fi
exit 0
