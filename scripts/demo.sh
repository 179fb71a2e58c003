#!/usr/bin/env bash
# The demo: a short research session on CPU with the embedded default corpus.
#   init (cpu profile, short budget) -> prepare -> baseline -> iterate 3 (random agent) -> log --best
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo_workspace}"
DEMO_BUDGET="${DEMO_BUDGET:-20}"

if [ ! -f "$DEMO_DIR/ar.toml" ]; then
    rm -rf "$DEMO_DIR"
    ar init "$DEMO_DIR" --profile cpu --budget "$DEMO_BUDGET" --tag demo
fi
cd "$DEMO_DIR"
ar prepare
ar baseline
ar iterate --n 3 --agent random --seed 0
ar log --best
