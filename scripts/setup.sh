#!/usr/bin/env bash
# Create .venv/ at the repository root and install gancleanse with its test and Ray extras
# (Ray is optional for users: pip install gancleanse[ray]; the tests check the Ray executor).
# torch is pinned first: on machines with a local CPU wheel this avoids a multi-GB CUDA download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,ray]"
# torch-fidelity: the tests' reference Inception; without dependencies (torchvision's wheel does not import beside this CPU torch)
.venv/bin/python -m pip install --quiet --no-deps "torch-fidelity==0.4.0"
echo "gancleanse installed in .venv ($(.venv/bin/gancleanse --version))"
