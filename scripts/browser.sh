#!/usr/bin/env bash
# Install (when missing) the headless browser the browser tests drive: Debian's chromium
# and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver), as scripts/services.sh
# installs the servers. Idempotent: with both present it only says where they are.
set -euo pipefail

log() { printf '[browser] %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=()
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
[ -x /usr/bin/chromedriver ] || apt_packages+=(chromium-driver)
if [ ${#apt_packages[@]} -gt 0 ]; then
  log "installing ${apt_packages[*]} from Debian"
  as_root apt-get update -qq
  # Fonts come as the package's recommends; the page needs a readable sans-serif.
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq "${apt_packages[@]}" fonts-dejavu-core >/dev/null
fi

log "ready: $(/usr/bin/chromium --version 2>/dev/null | head -1), $(/usr/bin/chromedriver --version | head -1)"
