"""Huge inputs: more than 2**32 elements through np.broadcast_to views (no memory behind them),
and more than 2**31 real float16 elements (about 4.3 GB in and 4.3 GB out).

The broadcast views have dims that collapse into the kernels' (outer, C, inner) view, so bn_cy
must work on them without a copy (a copy would need 17-34 GB): the tests run with the address
space limited to what the process already has plus 3 GB, so a copy fails fast with MemoryError
instead of exhausting the machine. Their expected statistics follow from the data behind the
view (each value repeated the same number of times).

The real-memory test is marked `large` and skips, saying why, when /proc/meminfo's MemAvailable
is below 12 GB. Its input repeats one random block of rows, so the whole output can be checked
cheaply: it must repeat the output block bitwise (the normalization is elementwise per channel),
and that block, plus rows around element 2**31, are checked against the float64 oracle.
"""

import contextlib
import os
import resource
import time

import numpy as np
import pytest

import bn_cy
from conftest import check_stats, check_y
from reference import ref_batch_norm, ref_moments

SANITIZER = os.environ.get("BN_CY_SANITIZER") == "1"
GB = 1 << 30
TIMES = {}


class _SummaryPlugin:
    def pytest_terminal_summary(self, terminalreporter):
        for key, value in sorted(TIMES.items()):
            terminalreporter.write_line("bn_cy huge: %s: %s" % (key, value))


@pytest.fixture(scope="module", autouse=True)
def _huge_summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("bn_cy_huge_summary"):
        pm.register(_SummaryPlugin(), "bn_cy_huge_summary")
    yield


def _vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@contextlib.contextmanager
def address_space_limit(extra):
    """Limit the address space to the current size plus `extra` bytes (no-op where it cannot be
    done: not Linux, or under AddressSanitizer, which reserves terabytes of shadow memory)."""
    if SANITIZER or not os.path.exists("/proc/self/status"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# > 2**32 elements through zero strides


def _base(n, c, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c)) * 2 + 5).astype(dtype)


def _moments_timed(key, x, axis, **kw):
    assert x.size > 2**32, x.size
    with address_space_limit(3 * GB):
        t0 = time.perf_counter()
        mean, var = bn_cy.moments(x, axis, **kw)
        TIMES[key] = "%d elements (%.2f x 2**32), strides %s: %.2f s" % (
            x.size, x.size / 2**32, x.strides, time.perf_counter() - t0)
    return mean, var


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_moments_broadcast_inner_zero_stride(dtype):
    """(outer, C, inner) with inner stride 0: each base value counts 2**13 times."""
    base = _base(2**17 + 3, 4, dtype, 1)
    x = np.broadcast_to(base[:, :, None], (base.shape[0], 4, 2**13))
    mean, var = _moments_timed("inner-zero-stride %s" % np.dtype(dtype).name, x, 1)
    check_stats(mean, var, base, 1, ref=ref_moments(base, 1))


def test_moments_broadcast_negative_axis_two_zero_stride_dims():
    """Two zero-stride dims after the feature axis (they collapse into one), axis negative."""
    base = _base(2**15 + 1, 4, np.float32, 2)
    x = np.broadcast_to(base[:, :, None, None], (base.shape[0], 4, 2**5, 2**12))
    mean, var = _moments_timed("two inner zero-stride dims, axis=-3", x, -3)
    check_stats(mean, var, base, 1, ref=ref_moments(base, 1))


def test_moments_broadcast_rows_layout():
    """rows family (channel stride 1), every row the same: over 2**32 / 3 rows, the mean is
    that row exactly and the variance exactly 0."""
    row = _base(1, 3, np.float32, 3)[0]
    x = np.broadcast_to(row[None, :], (2**32 // 3 + 1, 3))
    mean, var = _moments_timed("rows, outer zero stride", x, -1)
    assert mean.dtype == np.float32 and var.dtype == np.float32
    assert np.array_equal(mean, row), (mean, row)
    assert np.array_equal(var, np.zeros(3, np.float32)), var


def test_moments_broadcast_planes_layout():
    """planes family (inner stride 1) over a real 2**20-element plane repeated 2**12 times."""
    v = _base(2**20, 1, np.float32, 4)[:, 0]
    x = np.broadcast_to(v[None, None, :], (2**10 + 1, 4, 2**20))
    mean, var = _moments_timed("planes, real inner plane", x, 1)
    rm, rv = ref_moments(v[:, None], 1)
    check_stats(mean, var, np.broadcast_to(v[:, None], (2**20, 4)), 1,
                ref=(np.repeat(rm, 4), np.repeat(rv, 4)))


# --------------------------------------------------------------------------------------------
# > 2**31 real float16 elements


BLOCK_ROWS = 4096
CHANNELS = 2048
ROWS = 2**31 // CHANNELS + BLOCK_ROWS + 5  # > 2**31 elements, last block partial


@pytest.mark.large
@pytest.mark.skipif(SANITIZER, reason="8.6 GB under AddressSanitizer: not in the sanitizer job")
def test_batch_norm_float16_over_2_to_31_elements():
    need = 12 * GB
    avail = mem_available()
    if avail < need:
        pytest.skip("needs MemAvailable >= 12 GB for 2 x 4.3 GB float16 arrays; this machine "
                    "has %.1f GB available" % (avail / GB))
    rng = np.random.default_rng(7)
    block = (rng.standard_normal((BLOCK_ROWS, CHANNELS)) * 3 + 2).astype(np.float16)
    x = np.empty((ROWS, CHANNELS), np.float16)
    assert x.size > 2**31
    for r in range(0, ROWS, BLOCK_ROWS):
        n = min(BLOCK_ROWS, ROWS - r)
        x[r:r + n] = block[:n]
    mean = rng.normal(2, 0.5, CHANNELS).astype(np.float32)
    var = rng.uniform(4, 12, CHANNELS).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, CHANNELS)
    beta = rng.normal(0, 1, CHANNELS)

    t0 = time.perf_counter()
    y = bn_cy.batch_norm(x, mean, var, gamma, beta, epsilon=1e-3)
    TIMES["batch_norm float16"] = "%d elements (%.2f x 2**31): %.2f s" % (
        x.size, x.size / 2**31, time.perf_counter() - t0)
    assert y.dtype == np.float16 and y.shape == x.shape
    y_block = y[:BLOCK_ROWS]
    y_ref = ref_batch_norm(block, mean, var, gamma, beta, -1, 1e-3)
    check_y(y_block, block, mean, var, gamma, beta, -1, 1e-3, y_ref, np.dtype(np.float16))
    _assert_periodic(y, y_block)
    # rows around element 2**31 and the last rows, against the oracle directly
    r31 = 2**31 // CHANNELS
    for rows in (slice(r31 - 3, r31 + 3), slice(ROWS - 7, ROWS)):
        xs = x[rows]
        check_y(y[rows], xs, mean, var, gamma, beta, -1, 1e-3,
                ref_batch_norm(xs, mean, var, gamma, beta, -1, 1e-3), np.dtype(np.float16))

    # training forward on the same data, written into y (no third 4.3 GB array)
    t0 = time.perf_counter()
    y2, m2, v2 = bn_cy.batch_norm_train(x, gamma, beta, out=y)
    TIMES["batch_norm_train float16"] = "%d elements: %.2f s" % (x.size, time.perf_counter() - t0)
    assert y2 is y
    # the statistics of the whole array: weights of the block's rows (full copies + a part)
    full, part = divmod(ROWS, BLOCK_ROWS)
    w = np.full(BLOCK_ROWS, float(full))
    w[:part] += 1
    rm, rv = ref_moments(block, -1, w)
    check_stats(m2, v2, block, 1, ref=(rm, rv))
    y_ref = ref_batch_norm(block, rm, rv, gamma, beta, -1, 1e-3)
    check_y(y[:BLOCK_ROWS], block, rm, rv, gamma, beta, -1, 1e-3, y_ref, np.dtype(np.float16))
    _assert_periodic(y, y[:BLOCK_ROWS])


def _assert_periodic(y, y_block):
    ref_bits = y_block.view(np.uint16)
    for r in range(0, y.shape[0], BLOCK_ROWS):
        n = min(BLOCK_ROWS, y.shape[0] - r)
        if not np.array_equal(y[r:r + n].view(np.uint16), ref_bits[:n]):
            bad = np.argwhere(y[r:r + n].view(np.uint16) != ref_bits[:n])[0]
            raise AssertionError("output rows %d.. differ from the first block at %s"
                                 % (r, (r + bad[0], bad[1])))
