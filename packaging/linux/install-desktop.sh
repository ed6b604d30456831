#!/usr/bin/env sh
# Add the Linux bundle to the desktop's application menu (per user, no root):
#   dist/mlx-flash/install-desktop.sh        (the copy inside the bundle)
# writes ~/.local/share/applications/mlx-flash.desktop pointing at this bundle's executable and icon.
# Undo: rm ~/.local/share/applications/mlx-flash.desktop
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
exe="$here/mlx-flash"
icon="$here/mlx-flash.png"
[ -x "$exe" ] || { echo "error: $exe not found: run this from inside the bundle folder (dist/mlx-flash/)" >&2; exit 1; }
apps="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
mkdir -p "$apps"
sed -e "s|^Exec=.*|Exec=\"$exe\"|" -e "s|^Icon=.*|Icon=$icon|" "$here/mlx-flash.desktop" > "$apps/mlx-flash.desktop"
chmod +x "$apps/mlx-flash.desktop"
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database "$apps" || true
echo "installed $apps/mlx-flash.desktop -> $exe"
