#!/usr/bin/env bash
# Benchmark bn_cy against NumPy, PyTorch CPU, Keras 3 (torch backend) and the streaming floor:
#
#   bash ci/bench.sh [report.py arguments...]     e.g.  bash ci/bench.sh --quick
#
# Installs bn_cy from a clean copy of the source tree (OpenMP required) with the peers
# (torch==2.13.0 CPU wheel, keras==3.15.1, ml_dtypes, threadpoolctl) into a virtual environment,
# then runs benchmarks/report.py, which prints one table per mode and writes BENCHMARKS.md at the
# repository root (use --output to write elsewhere, --output - for nowhere).
#
# The environment is $BN_CY_BENCH_VENV (default: a temporary one, removed afterwards); pointing it
# at a kept directory skips the peer installation the next time (bn_cy itself is always
# reinstalled from the current sources).
# Time on an idle machine: other processes on the cores distort multi-threaded timings.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
export KERAS_BACKEND="${KERAS_BACKEND:-torch}"
if [[ "${BN_CY_OPENMP:-}" != "0" ]]; then
    export BN_CY_REQUIRE_OPENMP="${BN_CY_REQUIRE_OPENMP:-1}"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/bn_cy_bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
VENV="${BN_CY_BENCH_VENV:-$WORK/venv-bench}"
step() { printf '\n==> bench: %s  [%ss]\n' "$*" "$SECONDS" >&2; }

step "copy the source tree"
bash "$REPO/ci/wheel.sh" --copy-source "$REPO" "$WORK/src" >&2

if [[ ! -x "$VENV/bin/python" ]]; then
    step "virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch, keras, ml_dtypes, threadpoolctl" 2>/dev/null; then
    step "peers: torch==2.13.0 (CPU wheel), keras==3.15.1, ml_dtypes, threadpoolctl"
    "$VPY" -m pip install torch==2.13.0 >&2
    "$VPY" -m pip install keras==3.15.1 ml_dtypes threadpoolctl >&2
fi

step "install bn_cy from source"
"$VPY" -m pip uninstall -y bn_cy >&2 || true   # a kept environment: always the current sources
"$VPY" -m pip install "$WORK/src" >&2

step "benchmarks/report.py $*"
# Run from outside the source tree so that the installed bn_cy is the one measured; the report
# goes to the repository's BENCHMARKS.md unless --output says otherwise.
cd "$WORK"
has_output=0
for arg in "$@"; do
    [[ "$arg" == "--output" || "$arg" == --output=* ]] && has_output=1
done
extra=()
[[ $has_output -eq 1 ]] || extra=(--output "$REPO/BENCHMARKS.md")
BN_CY_BENCH_COMMAND="bash ci/bench.sh $*" "$VPY" "$REPO/benchmarks/report.py" "$@" ${extra[@]+"${extra[@]}"}
