#!/usr/bin/env bash
# Build bn_cy with AddressSanitizer + UndefinedBehaviorSanitizer and run the whole test suite
# under them; fail on any sanitizer report (or any test failure).
#
#   bash ci/sanitize.sh [pytest arguments...]
#
# 1. copies the source tree (tracked and untracked-but-not-ignored files: no build outputs) to a
#    temporary directory, so the in-tree build is not touched;
# 2. creates a fresh virtual environment with the build and test dependencies (numpy, Cython,
#    setuptools, pytest, hypothesis, threadpoolctl, ml_dtypes, and the mpi/keras-io extras:
#    mpi4py, mpich, h5py; not torch/keras, whose parity tests then skip: they exercise the peers,
#    not bn_cy's native code);
# 3. builds the extension in place in the copy with
#      CFLAGS/LDFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer
#                       -fno-sanitize-recover=undefined -g
#    (OpenMP required; without the AVX-512 variant where the CPU cannot run it, BN_CY_SAN_SIMD),
#    and checks that the module links the sanitizer runtimes;
# 4. runs pytest on tests/ with the ASan runtime preloaded (python itself is not instrumented):
#      LD_PRELOAD=$(gcc -print-file-name=libasan.so)  PYTHONMALLOC=malloc (ASan sees every block)
#      ASAN_OPTIONS=detect_leaks=0 (CPython leaks at exit by design):halt_on_error=1
#      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
#    every report is also written to a log directory, and the reports are counted;
# 5. prints "ci/sanitize.sh: N sanitizer reports" and exits non-zero when N > 0 or pytest failed.
#
# Under the sanitizers the tests see BN_CY_SANITIZER=1: tests/test_leaks.py runs its loops 2,000
# times instead of 100,000 and does not check RSS (ASan's quarantine holds freed memory), and the
# 8.6 GB float16 test of tests/test_huge.py is skipped; BN_CY_FUZZ_EXAMPLES (default here: 300
# per fuzz test) sizes the fuzz suite. Everything else runs as in ci/test.sh.
#
# Environment knobs:
#   PYTHON=python3.X             interpreter for the virtual environment (default: python3)
#   CC=gcc                       compiler (gcc or clang; its runtime: -print-file-name)
#   BN_CY_FUZZ_EXAMPLES=N        fuzz examples per test under the sanitizers (default 300)
#   BN_CY_SAN_MPI=0              do not install mpi4py/mpich/h5py (the mpi and keras-io extras)
#   BN_CY_SAN_SIMD=VALUE         BN_CY_SIMD of the instrumented build (default: avx2 where the CPU
#                                has no AVX-512, which then never runs, else every variant)
#   BN_CY_CI_WORKERS=N           pytest processes, as in ci/test.sh (ci/workers.sh)
#   BN_CY_SAN_KEEP=1             keep the temporary directory (its path is printed)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CC="${CC:-gcc}"
export CC
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
export PYTHONDONTWRITEBYTECODE=1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/bn_cy_sanitize.XXXXXX")"
cleanup() {
    if [[ "${BN_CY_SAN_KEEP:-0}" == "1" ]]; then
        echo "ci/sanitize.sh: kept $WORK"
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
mkdir -p "$SRC"
if git -C "$REPO" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard) |
        (cd "$REPO" && xargs -0 cp --parents -t "$SRC" 2> /dev/null || true)
else
    (cd "$REPO" && tar --exclude=build --exclude='*.so' --exclude='*.egg-info' -cf - .) |
        (cd "$SRC" && tar -xf -)
fi
rm -f "$SRC"/bn_cy/*.so "$SRC"/bn_cy/_kernels.c
test -f "$SRC/setup.py" || { echo "error: no setup.py in the copy" >&2; exit 2; }

step "sanitizer runtimes of $CC"
LIBASAN="$("$CC" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
    echo "error: $CC has no libasan.so ($LIBASAN); install the compiler's sanitizer runtime" >&2
    exit 2
fi
echo "libasan: $LIBASAN"

step "fresh virtual environment ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "numpy>=2" "Cython>=3.1" "setuptools>=77" pytest pytest-xdist hypothesis \
    threadpoolctl ml_dtypes
if [[ "${BN_CY_SAN_MPI:-1}" != "0" ]]; then
    # the mpi and keras-io extras, as ci/test.sh installs them (synchronized statistics run
    # sanitized too: the mpiexec'd test processes inherit the sanitizer environment)
    "$VPY" -m pip install --quiet "mpi4py>=3.1" mpich h5py
fi

SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
LOGS="$WORK/sanitizer-logs"
mkdir -p "$LOGS"

# The sanitizers check the code that runs: on a CPU without AVX-512 the AVX-512 variant never
# does, and leaving it out of the instrumented build saves a third of its compile time (about two
# minutes on a 2-core machine). BN_CY_SAN_SIMD overrides the choice (any build-time BN_CY_SIMD
# value; "default" compiles every variant).
if [[ -n "${BN_CY_SAN_SIMD:-}" ]]; then
    SAN_SIMD="$BN_CY_SAN_SIMD"
elif grep -qw avx512f /proc/cpuinfo 2> /dev/null; then
    SAN_SIMD=default
else
    SAN_SIMD=avx2
fi

step "build with $SAN_FLAGS, BN_CY_SIMD=$SAN_SIMD (OpenMP required)"
(
    cd "$SRC"
    # setup.py's OpenMP probe links its test program with LDFLAGS too (an instrumented object
    # linked without -fsanitize fails) and runs it: no leak check there.
    ASAN_OPTIONS=detect_leaks=0 CC="$CC" CFLAGS="$SAN_FLAGS" LDFLAGS="$SAN_FLAGS" \
        BN_CY_REQUIRE_OPENMP=1 BN_CY_SIMD="$SAN_SIMD" "$VPY" setup.py -q build_ext --inplace
)
SO="$(ls "$SRC"/bn_cy/_kernels*.so)"
# (ldd's output is captured first: `ldd | grep -q` can kill ldd with SIGPIPE under pipefail)
LINKED="$(ldd "$SO")"
if ! grep -q libasan <<< "$LINKED" || ! grep -q libubsan <<< "$LINKED"; then
    echo "error: $SO does not link the ASan/UBSan runtimes:" >&2
    echo "$LINKED" >&2
    exit 2
fi
grep -E 'libasan|libubsan|gomp' <<< "$LINKED"

step "pytest tests/ under AddressSanitizer + UndefinedBehaviorSanitizer${XDIST:+ ($XDIST processes)}"
set +e
(
    cd "$SRC"
    export BN_CY_SANITIZER=1
    export BN_CY_FUZZ_EXAMPLES="${BN_CY_FUZZ_EXAMPLES:-300}"
    export PYTHONMALLOC=malloc
    export LD_PRELOAD="$LIBASAN"
    export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$LOGS/asan"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan"
    "$VPY" -m pytest tests -p no:cacheprovider -ra $XDIST "$@"
)
status=$?
set -e

# every report starts with "ERROR: AddressSanitizer" or contains "runtime error:" (UBSan)
reports=0
if compgen -G "$LOGS/*" > /dev/null; then
    reports=$(cat "$LOGS"/* | grep -cE 'ERROR: AddressSanitizer|runtime error:' || true)
    if [[ "$reports" -gt 0 ]]; then
        echo "---- sanitizer reports ----"
        cat "$LOGS"/*
    fi
fi
echo "ci/sanitize.sh: $reports sanitizer reports (pytest exit status $status)"
if [[ "$reports" -gt 0 ]]; then
    exit 1
fi
exit "$status"
