#!/usr/bin/env bash
# The demo: a short research session on CPU with the embedded default corpus.
#   init (cpu profile, short budget) -> prepare -> baseline -> iterate 3 (random agent)
#   -> log (every run, and the noise in words) -> log --best (the kept chain, paired gains)
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo_workspace}"
DEMO_BUDGET="${DEMO_BUDGET:-20}"
DEMO_N="${DEMO_N:-3}"

if [ ! -f "$DEMO_DIR/ar.toml" ]; then
    rm -rf "$DEMO_DIR"
    ar init "$DEMO_DIR" --profile cpu --budget "$DEMO_BUDGET" --tag demo
fi
cd "$DEMO_DIR"
ar prepare
ar baseline
echo
echo "== ar iterate: the baseline is run on 5 seeds first (the noise), then each candidate"
echo "   runs on the same seeds as the best, and is kept only when its paired runs show it"
echo "   better (one lucky run is never kept)."
ar iterate --n "$DEMO_N" --agent random --seed 0
echo
ar log
echo
ar log --best
