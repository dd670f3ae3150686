"""Leaks: 100,000 calls of every public operation do not grow the process's memory, and no call
(successful or raising) changes the reference count of its inputs.

Memory is the resident set size from /proc/self/statm, measured after a warm-up, with garbage
collected and freed heap memory returned to the system (malloc_trim) before each reading, so
what remains is memory still held. The growth allowed for 100,000 calls is 1 MB: a leak of a
single byte per call, or of one small object every hundred calls, exceeds it.

Under the sanitizers (ci/sanitize.sh sets BN_CY_SANITIZER=1) AddressSanitizer keeps freed memory
in quarantine, so RSS says nothing there: the loops run 2,000 calls and the RSS bound is not
checked (AddressSanitizer itself then watches every one of those calls).
"""

import ctypes
import ctypes.util
import gc
import os
import sys
import time
import weakref

import numpy as np
import pytest

import bn_cy

SANITIZER = os.environ.get("BN_CY_SANITIZER") == "1"
CALLS = 2_000 if SANITIZER else 100_000
WARMUP = 500 if SANITIZER else 10_000
MAX_GROWTH = 1 << 20  # bytes

RESULTS = {}  # name -> (calls, growth in bytes, seconds), printed in the terminal summary

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None


def rss_bytes():
    """Resident memory of this process after a full collection and a heap trim."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="needs /proc/self/statm (Linux)")


class _SummaryPlugin:
    def pytest_terminal_summary(self, terminalreporter):
        for name, (calls, growth, secs) in sorted(RESULTS.items()):
            terminalreporter.write_line(
                "bn_cy leaks: %-28s %7d calls  RSS growth %+8.1f kB  %.1f s"
                % (name, calls, growth / 1024, secs))


@pytest.fixture(scope="module", autouse=True)
def _leak_summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("bn_cy_leak_summary"):
        pm.register(_SummaryPlugin(), "bn_cy_leak_summary")
    yield


# --------------------------------------------------------------------------------------------
# small inputs, one set per operation

def _inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 4)).astype(dtype)
    return dict(
        x=x,
        dy=rng.standard_normal(x.shape).astype(dtype),
        mean=np.zeros(4, np.float32),
        var=np.ones(4, np.float32),
        gamma=np.linspace(0.5, 1.5, 4),
        beta=np.linspace(-1, 1, 4),
        mask=rng.random((8, 3)) < 0.7,
        weights=rng.random((8, 3)),
        out=np.empty_like(x),
    )


def _op_calls(a):
    """name -> zero-argument callable making one call of a public operation."""
    x, dy, mean, var, gamma, beta = a["x"], a["dy"], a["mean"], a["var"], a["gamma"], a["beta"]
    mask, weights, out = a["mask"], a["weights"], a["out"]
    return {
        "moments": lambda: bn_cy.moments(x, -1),
        "moments-mask": lambda: bn_cy.moments(x, 2, mask=weights),
        "batch_norm": lambda: bn_cy.batch_norm(x, mean, var, gamma, beta),
        "batch_norm-out": lambda: bn_cy.batch_norm(x, mean, var, gamma, beta, axis=2, out=out),
        "batch_norm_train": lambda: bn_cy.batch_norm_train(x, gamma, beta, mask=mask),
        "batch_norm_train-out": lambda: bn_cy.batch_norm_train(x, gamma, beta, out=out),
        "batch_norm_backward": lambda: bn_cy.batch_norm_backward(dy, x, mean, var, gamma,
                                                                 mask=mask),
        "batch_norm_backward-infer": lambda: bn_cy.batch_norm_backward(
            dy, x, mean, var, gamma, training=False, out=out),
        "moments-float16-planes": lambda: bn_cy.moments(x.astype(np.float16), 1),
        "build_info+threads": lambda: (bn_cy.build_info(), bn_cy.get_num_threads(),
                                       bn_cy.set_num_threads(2), bn_cy.set_num_threads(None)),
    }


def _error_calls(a):
    """name -> (callable that raises, exception class)."""
    x, dy, mean, var, out = a["x"], a["dy"], a["mean"], a["var"], a["out"]
    bad = np.ones(3)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    return {
        "moments-axis": (lambda: bn_cy.moments(x, 5), ValueError),
        "moments-mask-shape": (lambda: bn_cy.moments(x, -1, mask=bad), ValueError),
        "moments-mask-negative": (lambda: bn_cy.moments(x, -1, mask=-a["weights"]), ValueError),
        "batch_norm-gamma": (lambda: bn_cy.batch_norm(x, mean, var, bad), ValueError),
        "batch_norm-out-readonly": (lambda: bn_cy.batch_norm(x, mean, var, out=ro), ValueError),
        "batch_norm_train-complex": (lambda: bn_cy.batch_norm_train(x.astype(np.complex64)),
                                     TypeError),
        "batch_norm_train-epsilon": (lambda: bn_cy.batch_norm_train(x, epsilon=-1.0), ValueError),
        "batch_norm_backward-dy": (lambda: bn_cy.batch_norm_backward(dy[:1], x, mean, var),
                                   ValueError),
        "batch_norm_backward-threads": (lambda: bn_cy.batch_norm_backward(dy, x, mean, var,
                                                                          n_threads=0),
                                        ValueError),
        "out-wrong-dtype": (lambda: bn_cy.batch_norm_train(x, out=out.astype(np.float64)),
                            ValueError),
    }


def _layer_calls():
    """Layer forward/backward callables, when bn_cy exports the layer."""
    if not hasattr(bn_cy, "BatchNormalization"):
        return {}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    train = bn_cy.BatchNormalization()
    infer = bn_cy.BatchNormalization(axis=1)
    train(x, training=True)
    infer(x, training=False)

    def train_step():
        train(x, training=True)
        return train.backward(dy)

    def infer_step():
        infer(x, training=False)
        return infer.backward(dy)

    return {"layer-train+backward": train_step, "layer-infer+backward": infer_step}


def _all_success_calls():
    a = _inputs()
    calls = _op_calls(a)
    calls.update(_layer_calls())
    return a, calls


# --------------------------------------------------------------------------------------------
# memory


def _loop(fn, n):
    for _ in range(n):
        fn()


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_op_calls(_inputs())) + ["layer-train+backward",
                                                                   "layer-infer+backward"])
def test_calls_do_not_grow_memory(name, restore_threads):
    a, calls = _all_success_calls()
    if name not in calls:
        pytest.skip("bn_cy.BatchNormalization is not exported")
    fn = calls[name]
    _loop(fn, WARMUP)
    before = rss_bytes()
    t0 = time.perf_counter()
    _loop(fn, CALLS)
    secs = time.perf_counter() - t0
    growth = rss_bytes() - before
    RESULTS[name] = (CALLS, growth, secs)
    if not SANITIZER:
        assert growth < MAX_GROWTH, "%d calls of %s grew RSS by %.1f kB" % (
            CALLS, name, growth / 1024)


@needs_proc
@pytest.mark.skipif(SANITIZER, reason="RSS is meaningless under AddressSanitizer")
def test_rss_sensor_sees_a_small_leak():
    """The measurement can see what the tests above rule out: 100,000 calls that each keep a
    16-byte buffer (about 2 MB with the allocator's overhead) grow RSS by more than 1 MB. Run in
    a fresh interpreter: in this one, memory freed by earlier tests would absorb the growth."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from test_leaks import rss_bytes, MAX_GROWTH\n"
        "held = []\n"
        "before = rss_bytes()\n"
        "for i in range(100_000):\n"
        "    held.append(bytes(16) + i.to_bytes(4, 'little'))\n"
        "growth = rss_bytes() - before\n"
        "assert growth > MAX_GROWTH, growth\n"
        "print(growth)\n" % os.path.dirname(os.path.abspath(__file__))
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_proc
@pytest.mark.slow
def test_raising_calls_do_not_grow_memory():
    a = _inputs()
    errs = _error_calls(a)

    def all_errors():
        for fn, exc in errs.values():
            try:
                fn()
            except exc:
                pass
            else:  # pragma: no cover
                raise AssertionError("no exception")

    n = max(CALLS // len(errs), 1)
    _loop(all_errors, max(WARMUP // len(errs), 1))
    before = rss_bytes()
    t0 = time.perf_counter()
    _loop(all_errors, n)
    secs = time.perf_counter() - t0
    growth = rss_bytes() - before
    RESULTS["raising calls (all kinds)"] = (n * len(errs), growth, secs)
    if not SANITIZER:
        assert growth < MAX_GROWTH, "%d raising calls grew RSS by %.1f kB" % (
            n * len(errs), growth / 1024)


# --------------------------------------------------------------------------------------------
# reference counts


def _refcounts(objs):
    return {k: sys.getrefcount(v) for k, v in objs.items()}


def _leaked_references(before, after):
    """Inputs: any change. Shared dtype objects: a net increase (other arrays of the dtype are
    created and freed around the calls, so their counts move; a leak would add one per call)."""
    changed = {}
    for k in before:
        if k.startswith("dtype-"):
            if after[k] - before[k] > 20:
                changed[k] = (before[k], after[k])
        elif after[k] != before[k]:
            changed[k] = (before[k], after[k])
    return changed


def _tracked(a):
    """Inputs whose reference counts must not move, plus the shared dtype objects."""
    objs = {k: v for k, v in a.items() if isinstance(v, np.ndarray)}
    objs["dtype-float32"] = np.dtype(np.float32)
    objs["dtype-float64"] = np.dtype(np.float64)
    return objs


def test_refcounts_unchanged_by_calls(restore_threads):
    a, calls = _all_success_calls()
    objs = _tracked(a)
    for name, fn in calls.items():
        for _ in range(3):  # warm caches (first-call imports, lazily built objects)
            fn()
        before = _refcounts(objs)
        for _ in range(200):
            fn()
        gc.collect()
        after = _refcounts(objs)
        changed = _leaked_references(before, after)
        assert not changed, "%s changed reference counts: %s" % (name, changed)


def test_results_hold_no_extra_references():
    """Returned arrays are owned by the caller alone: once the caller drops them they are freed
    (nothing inside bn_cy keeps a reference), and out= gets no extra reference."""
    a = _inputs()
    x, dy, mean, var = a["x"], a["dy"], a["mean"], a["var"]
    makers = {
        "moments": lambda: bn_cy.moments(x),
        "batch_norm_train": lambda: bn_cy.batch_norm_train(x, mask=a["mask"]),
        "batch_norm": lambda: (bn_cy.batch_norm(x, mean, var),),
        "batch_norm_backward": lambda: bn_cy.batch_norm_backward(dy, x, mean, var),
    }
    for name, make in makers.items():
        refs = [weakref.ref(arr) for arr in make()]
        gc.collect()
        alive = [i for i, r in enumerate(refs) if r() is not None]
        assert not alive, "%s: results %s still referenced after the caller dropped them" % (
            name, alive)
    out = a["out"]
    n0 = sys.getrefcount(out)
    y = bn_cy.batch_norm_train(x, out=out)[0]
    assert y is out
    del y
    gc.collect()
    assert sys.getrefcount(out) == n0


def test_refcounts_unchanged_by_raising_calls():
    a = _inputs()
    errs = _error_calls(a)
    objs = _tracked(a)
    for name, (fn, exc) in errs.items():
        for _ in range(3):
            with pytest.raises(exc):
                fn()
        before = _refcounts(objs)
        for _ in range(200):
            try:
                fn()
            except exc:
                pass
        gc.collect()
        after = _refcounts(objs)
        changed = _leaked_references(before, after)
        assert not changed, "%s changed reference counts: %s" % (name, changed)
