# Sourced by ci/test.sh and ci/sanitize.sh: the pytest-xdist arguments of their test runs.
#
# BN_CY_CI_WORKERS=N runs the tests in N processes (1: in pytest's own process, no xdist); unset,
# N is the number of cores, at most 4 (each test's kernels run on several threads already). In CI
# on a 2-core machine, two processes took the suite from 182 s to 141 s and the sanitized suite
# from 231 s to 163 s: one process leaves the second core idle through the tests' Python and
# NumPy work.
pytest_worker_args() {
    local n="${BN_CY_CI_WORKERS:-}"
    if [[ -z "$n" ]]; then
        n="$(nproc 2> /dev/null || echo 1)"
        (( n > 4 )) && n=4
    fi
    if [[ ! "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: BN_CY_CI_WORKERS must be a positive integer, got '$n'" >&2
        return 2
    fi
    # --dist loadfile: each test file runs whole in one process, in its order (tests/test_fuzz.py
    # ends with a check of the calls its fuzz tests made in that process)
    (( n > 1 )) && echo "-n $n --dist loadfile"
    return 0
}
