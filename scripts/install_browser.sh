#!/usr/bin/env bash
# Install what the server's browser test (tests/test_server_page.py) needs: Debian's Chromium
# with its matching chromedriver, and the selenium package. Nothing is downloaded outside the
# package managers (selenium is given the driver's path, so it never fetches one).
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
fi
python -m pip install -q "selenium>=4.20"
chromium --version
chromedriver --version
