#!/usr/bin/env bash
# apt_install.sh PACKAGE WHAT WITHOUT: install a Debian package when running as root with apt-get, else print how to.
# Optional set-up only: never fails (exit 0), a missing package just skips or slows what needs it.
# Says what happened on one line: "installed", "already present", or "could not install ... (why)".
# apt-get waits up to $APT_LOCK_TIMEOUT seconds (default 300) for dpkg's locks (another apt, unattended-upgrades)
# instead of failing at once with "Could not get lock"; `apt-get update` takes the lists lock, which it waits for too.
set -u
pkg="$1"
what="$2"
without="$3"
timeout="${APT_LOCK_TIMEOUT:-300}"
if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
  echo "$pkg: already present ($what)"
  exit 0
fi
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
if apt-get "${lock[@]}" update -qq >"$log" 2>&1 \
   && DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq "$pkg" >>"$log" 2>&1; then
  echo "$pkg: installed"
else
  why="$(grep -E '^(E|W):' "$log" | head -n 3 | tr '\n' ' ')"
  echo "$pkg: could not install (${why:-apt-get failed, see: apt-get install $pkg}); without it: $without"
fi
exit 0
