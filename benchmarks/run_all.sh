#!/bin/sh
# Run every CPU benchmark once with its defaults (about 15 minutes on 2 busy cores).
# Each script prints its tables and writes benchmarks/results/<name>.md; RESULTS.md collects them.
# gpu_inference.py and gpu_pipeline.py run for real only where nvidia-smi finds a GPU (see
# benchmarks/README.md); elsewhere their --smoke runs check that they still work.
# Needs the test setup (scripts/test: dcmtk, orthanc, .venv) and py-spy, installed here if missing.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pip show -q py-spy >/dev/null 2>&1 || "$PY" -m pip install -q py-spy
status=0
for script in ingest sending latency pipeline inference microbatch; do
    echo "== benchmarks/$script.py"
    "$PY" "benchmarks/$script.py" || status=1
done
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "== benchmarks/gpu_inference.py"
    KERAS_BACKEND=jax "$PY" benchmarks/gpu_inference.py || status=1
    echo "== benchmarks/gpu_pipeline.py"
    KERAS_BACKEND=jax "$PY" benchmarks/gpu_pipeline.py || status=1
else
    echo "== benchmarks/gpu_inference.py --smoke (no GPU here)"
    "$PY" benchmarks/gpu_inference.py --smoke || status=1
    echo "== benchmarks/gpu_pipeline.py --smoke (no GPU here)"
    "$PY" benchmarks/gpu_pipeline.py --smoke || status=1
fi
exit $status
