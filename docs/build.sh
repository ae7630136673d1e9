#!/usr/bin/env bash
# Build the documentation site with warnings as errors, running every gallery example.
# Needs: pip install -e ".[docs]". Output: docs/_build/html/index.html
set -euo pipefail
cd "$(dirname "$0")/.."
# a fresh build: sphinx-gallery skips examples whose source is unchanged since the last run
rm -rf docs/_build docs/auto_examples docs/gen_modules docs/api/generated docs/sg_execution_times.rst
export MPLBACKEND=Agg
log="$(mktemp)"
start=$(date +%s)
status=0
python -m sphinx -W --keep-going -b html docs docs/_build/html 2>&1 | tee "$log" || status=$?
elapsed=$(( $(date +%s) - start ))
executed=$(sed -n 's/.*successfully executed \([0-9]*\) out of \([0-9]*\).*/\1 of \2/p' "$log" | tail -1)
# Sphinx's last word: "build succeeded." or "build finished with problems, N warnings ..."
warnings=$(sed -n 's/.*build finished with problems, \([0-9]*\) warning.*/\1/p' "$log" | tail -1)
if [ -z "$warnings" ]; then
  if grep -q "build succeeded" "$log"; then warnings=0; else warnings="unknown (no build summary)"; fi
fi
rm -f "$log"
echo "docs: ${executed:-0 of ?} gallery examples executed, ${warnings} warnings, ${elapsed} s"
exit "$status"
