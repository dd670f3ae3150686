"""Concurrency: Python threads calling bn_cy at once, layers shared between threads, and calls in
a child process after os.fork().

* 8 Python threads, each on its own inputs (shapes big enough that the kernels open OpenMP
  parallel regions, i.e. >= 32768 elements), call every operation repeatedly at the same time,
  with varying n_threads: every result is bitwise equal to the same call made serially. The GIL
  is released inside the kernels, so the calls really overlap.
* 8 threads, each training its own BatchNormalization: the same weights, outputs and gradients
  as training the layers one after the other.
* 2 threads training ONE layer on the same batch: the layer's documented behaviour is a lock
  (training calls serialize, no update is lost), so after k calls from each thread the moving
  statistics equal 2k serial calls', bitwise, and num_batches_tracked counts 2k.
* fork: after the parent has run OpenMP parallel regions (and while another parent thread keeps
  doing so), a forked child runs the operations with 1, 2 and the default number of threads and
  gets the parent's results bitwise. The child runs under a watchdog: GNU libgomp is known to
  hang in a forked child whose parent used its thread pool, and a hang must fail the test (with
  the child killed), not stall the suite.
"""

import os
import pickle
import select
import signal
import threading
import time

import numpy as np
import pytest

import bn_cy

N_PY_THREADS = 8
ROUNDS = 6
FORK_TIMEOUT = 30.0  # seconds the forked child may take before it counts as hung

SUMMARY = {}


class _SummaryPlugin:
    def pytest_terminal_summary(self, terminalreporter):
        for key, value in sorted(SUMMARY.items()):
            terminalreporter.write_line("bn_cy concurrency: %s: %s" % (key, value))


@pytest.fixture(scope="module", autouse=True)
def _concurrency_summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("bn_cy_concurrency_summary"):
        pm.register(_SummaryPlugin(), "bn_cy_concurrency_summary")
    yield


# --------------------------------------------------------------------------------------------
# inputs: one case per Python thread (different shapes, dtypes, axes, layouts, masks)

CASES = [
    ((64, 32, 48), -1, np.float32, False),
    ((16, 64, 12, 12), 1, np.float32, True),
    ((40000, 3), -1, np.float64, True),
    ((3, 50000), 0, np.float16, False),
    ((32, 24, 64), 1, np.float64, False),
    ((128, 300), -1, np.float32, True),
    ((8, 16, 20, 20), -1, np.float32, False),
    ((70000,), 0, np.float32, False),
]


def _case_inputs(i):
    shape, axis, dtype, masked = CASES[i % len(CASES)]
    rng = np.random.default_rng(100 + i)
    x = (rng.standard_normal(shape) * (1 + i) + 3 * i).astype(dtype)
    if i % 3 == 1:
        x = np.asfortranarray(x)
    dy = rng.standard_normal(shape).astype(dtype)
    ax = axis % len(shape)
    c = shape[ax]
    mask = None
    if masked:
        mask = rng.random(shape[:ax] + shape[ax + 1:]) < 0.8
    return dict(x=x, dy=dy, axis=axis, mask=mask, gamma=rng.uniform(0.5, 1.5, c),
                beta=rng.normal(0, 1, c), mean=rng.normal(3 * i, 1, c), var=rng.uniform(0.5, 2, c))


def _all_ops(a, n_threads):
    x, dy, axis, mask = a["x"], a["dy"], a["axis"], a["mask"]
    out = {}
    out["moments"] = bn_cy.moments(x, axis, mask=mask, n_threads=n_threads)
    y, m, v = bn_cy.batch_norm_train(x, a["gamma"], a["beta"], axis=axis, mask=mask,
                                     n_threads=n_threads)
    out["train"] = (y, m, v)
    out["infer"] = (bn_cy.batch_norm(x, a["mean"], a["var"], a["gamma"], a["beta"], axis=axis,
                                     n_threads=n_threads),)
    out["backward"] = bn_cy.batch_norm_backward(dy, x, m, v, a["gamma"], axis=axis, mask=mask,
                                                n_threads=n_threads)
    out["backward_infer"] = bn_cy.batch_norm_backward(dy, x, a["mean"], a["var"], a["gamma"],
                                                      axis=axis, training=False,
                                                      n_threads=n_threads)
    return out


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def _same(ref, got):
    for op, arrays in ref.items():
        for k, (r, g) in enumerate(zip(arrays, got[op])):
            assert r.dtype == g.dtype and r.shape == g.shape, (op, k)
            if _bits(r) != _bits(g):
                return "%s[%d]" % (op, k)
    return None


def _run_threads(target, n):
    """Start n threads at one barrier; re-raise the first exception of any of them."""
    barrier = threading.Barrier(n)
    errors = [None] * n

    def wrap(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[i] = exc

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a thread did not finish within 300 s (deadlock?)"
    for e in errors:
        if e is not None:
            raise e


# --------------------------------------------------------------------------------------------
# functional ops from many Python threads


THREAD_SETTINGS = [None, 1, 2, 3]


def test_python_threads_match_serial_bitwise():
    inputs = [_case_inputs(i) for i in range(N_PY_THREADS)]
    serial = [_all_ops(a, 1) for a in inputs]  # any thread count gives the same bits
    mismatches = []

    def work(i):
        for r in range(ROUNDS):
            nt = THREAD_SETTINGS[(i + r) % len(THREAD_SETTINGS)]
            diff = _same(serial[i], _all_ops(inputs[i], nt))
            if diff:
                mismatches.append((i, r, nt, diff))

    t0 = time.perf_counter()
    _run_threads(work, N_PY_THREADS)
    SUMMARY["functional"] = "%d Python threads x %d rounds x 5 ops (n_threads in %s), %.1f s" % (
        N_PY_THREADS, ROUNDS, THREAD_SETTINGS, time.perf_counter() - t0)
    assert not mismatches, "concurrent results differ from serial ones: %s" % mismatches[:5]


def test_python_threads_share_inputs_read_only():
    """Many threads reading the very same arrays at once (the inputs are never written)."""
    a = _case_inputs(1)
    before = {k: v.copy() for k, v in a.items() if isinstance(v, np.ndarray)}
    ref = _all_ops(a, 2)
    mismatches = []

    def work(i):
        for r in range(3):
            diff = _same(ref, _all_ops(a, THREAD_SETTINGS[(i + r) % 4]))
            if diff:
                mismatches.append((i, r, diff))

    _run_threads(work, N_PY_THREADS)
    assert not mismatches, mismatches[:5]
    for k, v in before.items():
        assert _bits(v) == _bits(a[k]), "%s was modified" % k


def test_out_arrays_per_thread():
    """Each thread writes into its own out= array (in place into its own x too)."""
    inputs = [_case_inputs(i) for i in range(N_PY_THREADS)]
    serial = [bn_cy.batch_norm_train(a["x"], a["gamma"], a["beta"], axis=a["axis"],
                                     mask=a["mask"], n_threads=1)[0] for a in inputs]
    results = [None] * N_PY_THREADS

    def work(i):
        a = inputs[i]
        xcopy = a["x"].copy(order="K")
        for r in range(3):
            out = np.empty_like(a["x"]) if r % 2 == 0 else xcopy
            y = bn_cy.batch_norm_train(out if r % 2 else a["x"], a["gamma"], a["beta"],
                                       axis=a["axis"], mask=a["mask"], out=out,
                                       n_threads=THREAD_SETTINGS[(i + r) % 4])[0]
            assert y is out
            if r % 2:  # in place: restore x for the next in-place round
                results[i] = y.copy()
                xcopy[...] = a["x"]
            else:
                assert _bits(y) == _bits(serial[i]), (i, r)

    _run_threads(work, N_PY_THREADS)
    for i in range(N_PY_THREADS):
        assert _bits(results[i]) == _bits(serial[i]), "in-place result of thread %d differs" % i


# --------------------------------------------------------------------------------------------
# layers


def _layer_case(i):
    rng = np.random.default_rng(500 + i)
    shape, axis = [((32, 16, 16, 8), -1), ((16, 8, 24, 24), 1), ((4096, 12), -1),
                   ((64, 40, 20), 1)][i % 4]
    x = [rng.standard_normal(shape).astype(np.float32) * (1 + k) + k for k in range(3)]
    dy = rng.standard_normal(shape).astype(np.float32)
    return axis, x, dy


def _train_layer(i, layer, steps=4):
    axis, xs, dy = _layer_case(i)
    outs = []
    for s in range(steps):
        y = layer(xs[s % len(xs)], training=True)
        dx = layer.backward(dy)
        outs.append((y, dx) + tuple(np.array(g) for g in layer.gradients))
    y = layer(xs[0], training=False)
    dx = layer.backward(dy)
    outs.append((y, dx))
    return outs, [np.array(w) for w in layer.get_weights()]


def _new_layer(i):
    axis = _layer_case(i)[0]
    return bn_cy.BatchNormalization(axis=axis, momentum=0.9, name="bn_thread_%d" % i)


def _layers_available():
    return hasattr(bn_cy, "BatchNormalization")


needs_layer = pytest.mark.skipif(not _layers_available(),
                                 reason="bn_cy.BatchNormalization is not exported")


@needs_layer
def test_threads_with_separate_layers_match_serial():
    serial = [_train_layer(i, _new_layer(i)) for i in range(N_PY_THREADS)]
    layers = [_new_layer(i) for i in range(N_PY_THREADS)]
    got = [None] * N_PY_THREADS

    def work(i):
        got[i] = _train_layer(i, layers[i])

    t0 = time.perf_counter()
    _run_threads(work, N_PY_THREADS)
    SUMMARY["layers"] = ("%d Python threads, one layer each, 4 training steps + backward, "
                         "%.1f s" % (N_PY_THREADS, time.perf_counter() - t0))
    for i in range(N_PY_THREADS):
        (s_outs, s_w), (g_outs, g_w) = serial[i], got[i]
        for step, (a, b) in enumerate(zip(s_outs, g_outs)):
            for k, (p, q) in enumerate(zip(a, b)):
                assert _bits(p) == _bits(q), "layer %d step %d output %d differs" % (i, step, k)
        for k, (p, q) in enumerate(zip(s_w, g_w)):
            assert _bits(p) == _bits(q), "layer %d weight %d differs" % (i, k)


@needs_layer
def test_two_threads_training_one_layer_serialize():
    """The documented behaviour: a lock; no moving-average update is lost or torn. Both threads
    train on the same batch, so the order of the updates does not matter and after k calls from
    each thread the weights equal those after 2k serial calls, bitwise."""
    axis, xs, dy = _layer_case(0)
    x = xs[1]
    k = 25
    ref = bn_cy.BatchNormalization(axis=axis, momentum=0.9)
    y_train = [ref(x, training=True) for _ in range(2 * k)]
    shared = bn_cy.BatchNormalization(axis=axis, momentum=0.9)
    shared.build(x.shape)
    outputs = [[] for _ in range(2)]

    def work(i):
        for _ in range(k):
            outputs[i].append(shared(x, training=True))

    _run_threads(work, 2)
    for p, q in zip(ref.get_weights(), shared.get_weights()):
        assert _bits(p) == _bits(q), "moving statistics differ from 2k serial updates"
    if hasattr(shared, "num_batches_tracked"):
        assert int(shared.num_batches_tracked) == 2 * k
    for outs in outputs:  # every training output normalizes with the same batch statistics
        for y in outs:
            assert _bits(y) == _bits(y_train[0])
    # concurrent inference on the shared layer: all equal to a serial inference call
    y_inf = ref(x, training=False)
    infer = [[] for _ in range(4)]

    def read(i):
        for _ in range(5):
            infer[i].append(shared(x, training=False))

    _run_threads(read, 4)
    for outs in infer:
        for y in outs:
            assert _bits(y) == _bits(y_inf)
    SUMMARY["shared layer"] = ("2 threads x %d training calls on one layer: serialized, no "
                               "update lost; 4 threads x 5 inference calls" % k)


@needs_layer
def test_backward_uses_the_calling_threads_forward():
    """Two threads alternate forward/backward on one layer with different batches: each
    backward differentiates its own thread's forward (as documented)."""
    axis, xs, dy = _layer_case(2)
    shared = bn_cy.BatchNormalization(axis=axis)
    shared(xs[0], training=False)
    ref = []
    for i in range(2):
        solo = bn_cy.BatchNormalization(axis=axis)
        solo(xs[i], training=False)
        ref.append(solo.backward(dy))
    got = [[] for _ in range(2)]

    def work(i):
        for _ in range(10):
            shared(xs[i], training=False)
            got[i].append(shared.backward(dy))

    _run_threads(work, 2)
    for i in range(2):
        for dx in got[i]:
            assert _bits(dx) == _bits(ref[i])


# --------------------------------------------------------------------------------------------
# fork


def _fork_and_collect(child_fn, timeout=FORK_TIMEOUT):
    """Run child_fn() in a forked child; return its (pickled) result, or fail on a crash, an
    exception or a hang (the child is killed after `timeout` seconds)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            try:
                payload = pickle.dumps(("ok", child_fn()))
            except BaseException as exc:  # noqa: BLE001 - sent to the parent
                payload = pickle.dumps(("error", repr(exc)))
                code = 1
            with os.fdopen(wfd, "wb") as f:
                f.write(payload)
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(rfd, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child did not finish within %.0f s: it hangs (OpenMP "
                            "runtime after fork?)" % timeout)
            ready, _, _ = select.select([f], [], [], min(left, 1.0))
            if ready:
                data = os.read(f.fileno(), 1 << 20)
                if not data:
                    break
                chunks.append(data)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail("the forked child died of signal %d" % os.WTERMSIG(status))
    kind, value = pickle.loads(b"".join(chunks)) if chunks else ("error", "no output")
    if kind != "ok":
        pytest.fail("the forked child failed: %s" % value)
    return value


def _fork_work():
    a = _case_inputs(0)
    b = _case_inputs(1)
    return {"nt1": _all_ops(a, 1), "nt2": _all_ops(a, 2), "default": _all_ops(b, None),
            "threads": bn_cy.get_num_threads()}


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_fork_after_parent_used_openmp():
    # the parent runs parallel regions first (the runtime's thread pool then exists)
    big = _case_inputs(0)
    parent = {"nt1": _all_ops(big, 1), "nt2": _all_ops(big, 2),
              "default": _all_ops(_case_inputs(1), None)}
    t0 = time.perf_counter()
    child = _fork_and_collect(_fork_work)
    SUMMARY["fork"] = "child after parent's parallel regions: ok in %.1f s (child threads %s)" % (
        time.perf_counter() - t0, child["threads"])
    for key in ("nt1", "nt2", "default"):
        diff = _same(parent[key], child[key])
        assert diff is None, "forked child result %s differs (%s)" % (key, diff)


@needs_fork
def test_fork_while_another_thread_runs_openmp():
    """fork() while a parent thread is inside parallel regions: the child still works."""
    a = _case_inputs(0)
    ref = _all_ops(a, 2)
    stop = threading.Event()
    started = threading.Event()

    def busy():
        while not stop.is_set():
            _all_ops(a, 2)
            started.set()

    t = threading.Thread(target=busy)
    t.start()
    try:
        started.wait(60)
        results = [_fork_and_collect(lambda: _all_ops(a, 2)) for _ in range(3)]
    finally:
        stop.set()
        t.join()
    for child in results:
        assert _same(ref, child) is None


@needs_fork
def test_fork_in_child_of_child():
    """Forking twice (a child that forks again after using threads) works too."""
    a = _case_inputs(3)
    ref = _all_ops(a, 2)

    def child():
        _all_ops(a, 2)
        return _fork_and_collect(lambda: _all_ops(a, 2), timeout=FORK_TIMEOUT / 2)

    got = _fork_and_collect(child)
    assert _same(ref, got) is None


@needs_fork
def test_multiprocessing_fork_pool():
    """The common form: a multiprocessing pool with the fork start method, after the parent
    used OpenMP."""
    import multiprocessing

    a = _case_inputs(2)
    ref = _all_ops(a, 2)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        res = pool.map_async(_pool_job, [2, None, 1, 2])
        try:
            got = res.get(timeout=FORK_TIMEOUT)
        except multiprocessing.TimeoutError:
            pool.terminate()
            pytest.fail("multiprocessing fork pool workers hung")
    for g in got:
        assert _same(ref, g) is None


def _pool_job(nt):
    return _all_ops(_case_inputs(2), nt)
