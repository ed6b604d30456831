#!/usr/bin/env bash
# Installs Debian's public-domain King James Bible (package bible-kjv, command `bible`), the real English
# prose the quality tests read. Nothing is committed; the text comes from the registry at test time.
set -u
if command -v bible >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing Debian's bible-kjv for the perplexity tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv >/dev/null) \
    || echo "warning: could not install bible-kjv; tests that need real English text will be skipped"
else
  echo "note: install Debian's bible-kjv (sudo apt-get install bible-kjv) to run the perplexity tests; skipping them"
fi
exit 0
