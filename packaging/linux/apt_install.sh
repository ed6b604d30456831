#!/usr/bin/env bash
# apt_install.sh PACKAGE WHAT WITHOUT: install a Debian package when running as root with apt-get, else print how to.
# Optional set-up only: never fails (exit 0), a missing package just skips or slows what needs it.
set -u
pkg="$1"
what="$2"
without="$3"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing Debian's $pkg ($what)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null) \
    || echo "warning: could not install $pkg; without it: $without"
else
  echo "note: 'sudo apt-get install $pkg' for $what; without it: $without"
fi
exit 0
