#!/usr/bin/env bash
# The README's command 1: install, then run DDOME on Fashion-MNIST in Flower's simulation.
# Ends non-zero, with the reason as the last line, if the run fails.
# Extra arguments go to the launcher, e.g. --run-config "num-server-rounds=10".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m server_app.launch "$@"
