#!/usr/bin/env bash
# bn_cy's test command (the README's, and what .ci/run calls):
#
#   bash ci/test.sh [pytest arguments...]
#
# 1. copies the source tree (tracked and untracked-but-not-ignored files, never build outputs) to
#    a temporary directory, so stale objects of an in-place build cannot leak into the result;
# 2. creates a fresh virtual environment, builds bn_cy's wheel from that copy (OpenMP required:
#    BN_CY_REQUIRE_OPENMP=1) and installs it with its extras `test`, `mpi` (mpi4py + an MPI
#    library) and `keras-io`, plus the parity peers torch==2.13.0 (CPU wheel), keras==3.15.1 and
#    ml_dtypes;
# 3. runs pytest on tests/ against the *installed* package, from a directory that holds no bn_cy
#    source (a plugin fails the run if `import bn_cy` resolves anywhere but site-packages);
#    arguments given to this script go to that pytest;
# 4. smoke-runs `python -m bn_cy` and the benchmark suite once with timing disabled;
# 5. checks that same wheel in another fresh environment (ci/wheel.sh): its contents, an install
#    with nothing but its own dependencies, a run from outside the source tree;
# 6. builds the extension again with AddressSanitizer + UBSan and reruns the suite (ci/sanitize.sh).
# The extension is compiled twice: the wheel (tested, then checked) and the sanitizer build.
#
# Environment knobs:
#   PYTHON=python3.X          interpreter for the virtual environments (default: python3)
#   BN_CY_OPENMP=0            test a serial build (then OpenMP is not required)
#   BN_CY_CI_PEERS=0          skip torch/keras/ml_dtypes (their parity tests then skip)
#   BN_CY_CI_EXTRAS=test      the extras to install (default: test,mpi,keras-io)
#   BN_CY_CI_BENCH_SMOKE=0    skip the benchmark smoke run
#   BN_CY_CI_WHEEL=0          skip the wheel check
#   BN_CY_CI_SANITIZE=0       skip the AddressSanitizer/UBSan run (ci/sanitize.sh)
#   BN_CY_CI_WORKERS=N        pytest processes (pytest-xdist; default: the cores, at most 4; 1: none)
#   BN_CY_CI_KEEP=1           keep the temporary directory (its path is printed)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
export PYTHONDONTWRITEBYTECODE=1
export KERAS_BACKEND="${KERAS_BACKEND:-torch}"
if [[ "${BN_CY_OPENMP:-}" != "0" ]]; then
    export BN_CY_REQUIRE_OPENMP="${BN_CY_REQUIRE_OPENMP:-1}"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/bn_cy_ci.XXXXXX")"
cleanup() {
    if [[ "${BN_CY_CI_KEEP:-0}" == "1" ]]; then
        echo "ci/test.sh: kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

step() { printf '\n==> %s  [%ss]\n' "$*" "$SECONDS"; }

. "$REPO/ci/workers.sh"
XDIST="$(pytest_worker_args)"

step "copy the source tree of $REPO"
SRC="$WORK/src"
bash "$REPO/ci/wheel.sh" --copy-source "$REPO" "$SRC"

step "fresh virtual environment ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$WORK/venv-test"
VPY="$WORK/venv-test/bin/python"
"$VPY" -m pip --version

if [[ "${BN_CY_CI_PEERS:-1}" != "0" ]]; then
    step "parity peers: torch==2.13.0 (CPU wheel), keras==3.15.1, ml_dtypes"
    "$VPY" -m pip install torch==2.13.0
    "$VPY" -m pip install keras==3.15.1 ml_dtypes
fi

step "build bn_cy's wheel from source (BN_CY_REQUIRE_OPENMP=${BN_CY_REQUIRE_OPENMP:-unset}, BN_CY_OPENMP=${BN_CY_OPENMP:-unset})"
# installing from source is building this wheel; the same wheel is checked by ci/wheel.sh below
WHEEL="$(PYTHON="$VPY" bash "$REPO/ci/wheel.sh" --build "$SRC" "$WORK/wheelhouse")"
echo "built $WHEEL"

EXTRAS="${BN_CY_CI_EXTRAS:-test,mpi,keras-io}"
step "install $(basename "$WHEEL")[$EXTRAS]"
"$VPY" -m pip install "$WHEEL[$EXTRAS]"
# with the mpi extra installed, the mpiexec tests must run: a missing MPI fails them, never skips
[[ ",$EXTRAS," == *",mpi,"* ]] && export BN_CY_REQUIRE_MPI=1

# Tests run from here: the copied tests/, benchmarks/ and pyproject.toml (for pytest's
# configuration) and no bn_cy/ directory, so `import bn_cy` can only find the installed package.
RUN="$WORK/run"
mkdir -p "$RUN" "$WORK/plugins"
cp -R "$SRC/tests" "$RUN/tests"
[[ -d "$SRC/benchmarks" ]] && cp -R "$SRC/benchmarks" "$RUN/benchmarks"
cp "$SRC/pyproject.toml" "$RUN/pyproject.toml"
# documents the tests check against their data (the bad-input table)
cp "$SRC/README.md" "$RUN/README.md"
[[ -d "$SRC/docs" ]] && cp -R "$SRC/docs" "$RUN/docs"
cat > "$WORK/plugins/_bn_cy_ci_guard.py" <<'PY'
"""pytest plugin of ci/test.sh: the package under test must be the installed one."""
import os
import sysconfig

import pytest

import bn_cy

_SITE = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
_FILE = os.path.realpath(bn_cy.__file__)


def pytest_report_header(config):
    return "bn_cy under test: %s (build: %s)" % (_FILE, bn_cy.build_info())


def pytest_sessionstart(session):
    if not any(_FILE.startswith(site + os.sep) for site in _SITE):
        raise pytest.UsageError("bn_cy was imported from %s, not from site-packages %s" % (_FILE, sorted(_SITE)))
PY

step "installed bn_cy"
cd "$RUN"
"$VPY" - <<'PY'
import os, sys, sysconfig
import bn_cy
site = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
path = os.path.realpath(bn_cy.__file__)
print("bn_cy.__file__ =", path)
if not any(path.startswith(s + os.sep) for s in site):
    sys.exit("error: bn_cy does not come from site-packages %s" % sorted(site))
info = bn_cy.build_info()
print(info)
if os.environ.get("BN_CY_REQUIRE_OPENMP") == "1" and not info["openmp"]:
    sys.exit("error: BN_CY_REQUIRE_OPENMP=1 but the installed build has no OpenMP")
PY

step "pytest tests/ against the installed package${XDIST:+ ($XDIST processes)}"
# (XDIST unquoted: "-n N --dist loadfile" or nothing)
PYTHONPATH="$WORK/plugins" "$VPY" -m pytest tests -p _bn_cy_ci_guard -p no:cacheprovider -ra $XDIST "$@"

step "bn-cy (the README's main command), quick, from the source tree's root"
# from the root, as the README runs it: the installed script must not pick up the source bn_cy/
(cd "$SRC" && "$WORK/venv-test/bin/bn-cy" --repeat 1)
"$VPY" -m bn_cy demo > /dev/null

if [[ "${BN_CY_CI_BENCH_SMOKE:-1}" != "0" && -d "$RUN/benchmarks" ]]; then
    step "benchmark suite smoke run (each callable once, nothing timed)"
    PYTHONPATH="$WORK/plugins" "$VPY" -m pytest benchmarks -p _bn_cy_ci_guard -p no:cacheprovider \
        --benchmark-disable --bench-quick -m "not large" -q
    "$VPY" benchmarks/report.py --quick --cases tiny --repeat 1 --budget 0.01 --no-memory --silent --output - > /dev/null
fi
cd "$REPO"

if [[ "${BN_CY_CI_WHEEL:-1}" != "0" ]]; then
    step "wheel: the tested wheel, installed and checked in another fresh environment"
    BN_CY_CI_WHEEL_FILE="$WHEEL" bash "$REPO/ci/wheel.sh" "$REPO/dist"
fi

if [[ "${BN_CY_CI_SANITIZE:-1}" != "0" ]]; then
    step "sanitizers: the suite again on an ASan + UBSan build (ci/sanitize.sh)"
    bash "$REPO/ci/sanitize.sh" -q
fi

step "ci/test.sh: all passed"
