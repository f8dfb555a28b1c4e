#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's browser tests, if it is missing.
# Playwright drives this browser through its executable path; no browser is downloaded.
# Needs root and apt; elsewhere it says what to install and the browser tests skip
# (under CI=true they fail instead).
set -uo pipefail

CHROMIUM="${SWARMGATE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for the browser tests..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null
  [ -x "$CHROMIUM" ] && exit 0
  echo "chromium did not install; the browser tests will not run." >&2
else
  echo "No chromium at $CHROMIUM: install Debian's 'chromium' package to run the browser tests." >&2
fi
exit 0
