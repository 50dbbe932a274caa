#!/usr/bin/env bash
# Set up (idempotent), then run the Fashion-MNIST demo. Extra arguments go to the demo script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/fashion_mnist_demo.py "$@"
