#!/usr/bin/env bash
# Install everything the app and its tests need into .venv, on a fresh machine.
# Where the system has apt, Debian's packages provide the data offline (Fashion-MNIST) and
# the tools the deployment tests use (docker-compose to validate compose files, openssl
# for TLS certificates); elsewhere torchvision downloads Fashion-MNIST on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "== system packages: dataset-fashion-mnist docker-compose openssl (apt)"
  # NEEDRESTART_SUSPEND: Ubuntu's needrestart hook has nothing to restart here and only adds noise.
  if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq \
      dataset-fashion-mnist docker-compose openssl >/dev/null; }; then
    echo "   apt could not install them: Fashion-MNIST will be downloaded, deployment tests skipped"
  fi
fi

echo "== Python environment in .venv"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned to a pair that installs offline from the package index here
# (any torch >= 2.4 with its matching torchvision works).
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[test]"
echo "== installed: run the tests with .venv/bin/python -m pytest -q"
