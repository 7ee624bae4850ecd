#!/usr/bin/env bash
# The browser tests drive Debian's Chromium through Playwright (browsers cannot be downloaded here).
set -eu
if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium for the browser tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
