#!/usr/bin/env bash
# The recipes' proof on one lent GPU in one command, sized to finish within BUDGET (480 s) on one H100/H200:
#
#   bash scripts/gpu_proof.sh                                        # GPU: full sizes; logs + JSON in ./proof-out
#   RECORD_2025=LOG RECORD_2026=LOG bash scripts/gpu_proof.sh        # ... with the records' own code beside the ports
#   DEVICE=cpu OUT=/tmp/p bash scripts/gpu_proof.sh                  # the same stages on a CPU at tiny sizes
#
# The stages and what each measures: scripts/gpu_proof.py's docstring. docs/BENCHMARKS.md has the figures.
# Environment: OUT (default ./proof-out), DEVICE (cuda), BUDGET seconds (480), STEPS per recipe (8), RECORD_2025 and
# RECORD_2026 (the records' logs, never part of this repository), PYTHON (default /opt/torch/.venv/bin/python3, else
# .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3
    elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
    else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
# The stages keep to BUDGET themselves; the outer limit only catches a hang past it.
exec timeout --kill-after=10 $(( ${BUDGET:-480} + 60 )) "$PYTHON" scripts/gpu_proof.py --out "${OUT:-./proof-out}" \
    --device "${DEVICE:-cuda}" --budget "${BUDGET:-480}" --steps "${STEPS:-8}"
