#!/usr/bin/env bash
# qt_deps.sh PYTHON: Linux only. Checks the system libraries Qt's X11 (xcb) platform plugin needs (app/platform_qt.py
# reads them from PySide6's libqxcb.so and the Qt libraries it loads) and installs the missing ones' Debian packages
# (as root with apt-get, waiting for apt's lock), else prints the exact apt-get command. Never fails: the app still
# runs on other Qt platforms (wayland, offscreen) and prints the same check itself when xcb is what it will use.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
py="$1"
pkgs="$("$py" -m mlx_flash_app.platform_qt --packages)"
if [ -z "$pkgs" ]; then
  "$py" -m mlx_flash_app.platform_qt
  exit 0
fi
bash "$(dirname "$0")/apt_install.sh" "$pkgs" "Qt's X11 (xcb) platform plugin" "the app cannot open a window on X11"
"$py" -m mlx_flash_app.platform_qt || true
exit 0
