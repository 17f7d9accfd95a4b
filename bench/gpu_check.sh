#!/usr/bin/env bash
# The one command to run first when a GPU machine is lent (H100 / H200, at most 9 minutes):
#   bash bench/gpu_check.sh                # GPU machine: every stage, files into $OUT (or --out DIR)
#   bash bench/gpu_check.sh --cpu-smoke    # any machine: the same stages at tiny sizes on the CPU (CI)
# Everything (install from carried .whl/, per-stage time limits, summary) is in bench/gpu_check.py;
# `bash bench/gpu_check.sh --help` lists the stages and options. PYTHON overrides the interpreter.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
