#!/usr/bin/env bash
# Installs Debian's public-domain King James Bible (package bible-kjv, command `bible`), the real English
# prose the quality tests read. Nothing is committed; the text comes from the registry at test time.
set -u
command -v bible >/dev/null 2>&1 && exit 0
exec bash "$(dirname "$0")/../../packaging/linux/apt_install.sh" bible-kjv "the perplexity tests" \
  "tests that need real English text are skipped"
