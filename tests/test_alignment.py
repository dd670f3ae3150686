"""The elementwise passes start their vector loops at an aligned output element (a peel, and for
contiguous rows a walk shifted by the peel with rotated per-channel constants, and for short planes
back to back one flat walk whose vectors may straddle two planes), and write outputs
beyond the caches with streaming stores. Whatever the offset of the input and output buffers,
and whether the output was streamed, the results must be bitwise those of aligned buffers, and
match the float64 oracle."""

import hashlib

import numpy as np
import pytest

import bn_cy
from conftest import run_python
from reference import ref_batch_norm, ref_batch_norm_backward

CASES = [
    ((40, 64), -1),        # flat rows, C * 4 bytes a multiple of 64
    ((6, 7, 48), -1),      # flat rows with an inner run
    ((33, 16), -1),        # one cache line per row (float32)
    ((50, 24), -1),        # rows not a whole number of lines: no shifted walk
    ((3, 5, 300), 1),      # planes longer than the peel threshold
    ((2, 3, 1000), 1),
    ((5, 7, 48), 1),       # short planes back to back: one flat run, vectors straddling planes
    ((4, 3, 16), 1),       # planes of one float32 vector
    ((3, 6, 37), 1),       # planes not a whole number of vectors
    ((2, 3, 12), 1),       # planes shorter than a float32 vector: per plane
    ((4, 600, 48), 1),     # short planes, many channels: the separate passes
    ((2, 256, 2070), 1),   # planes of 8 KiB and more (float32), channels enough for the fused
                           # per-block passes
]


def at_offset(a, k):
    """A copy of `a` whose data start k elements after a 64-byte boundary."""
    n = a.size
    buf = np.empty(n + 64, a.dtype)
    start = (-buf.ctypes.data % 64) // a.itemsize + k
    view = buf[start:start + n].reshape(a.shape)
    view[...] = a
    return view


def outputs_at_offsets(shape, axis, dtype):
    """{(input offset, output offset): bytes of (y, training y, dx, inference dx)}, and the inputs."""
    rng = np.random.default_rng(11)
    x0 = (5.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy0 = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    gamma = rng.uniform(0.5, 2.0, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    mean, var = bn_cy.moments(x0, axis)
    lanes = 64 // np.dtype(dtype).itemsize
    results = {}
    for kx in (0, 3):
        for ky in range(lanes):
            x, dy = at_offset(x0, kx), at_offset(dy0, kx)
            y = at_offset(np.zeros_like(x0), ky)
            bn_cy.batch_norm(x, mean, var, gamma, beta, axis=axis, out=y)
            yt = at_offset(np.zeros_like(x0), ky)
            bn_cy.batch_norm_train(x, gamma, beta, axis=axis, out=yt)
            dx = at_offset(np.zeros_like(x0), ky)
            bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, out=dx)
            di = at_offset(np.zeros_like(x0), ky)
            bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, training=False, out=di)
            results[kx, ky] = (y.tobytes(), yt.tobytes(), dx.tobytes(), di.tobytes())
    return results, (x0, dy0, mean, var, gamma, beta)


def digest(results):
    h = hashlib.sha256()
    for key in sorted(results):
        for b in results[key]:
            h.update(b)
    return h.hexdigest()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_outputs_do_not_depend_on_buffer_alignment(shape, axis, dtype):
    results, (x0, dy0, mean, var, gamma, beta) = outputs_at_offsets(shape, axis, dtype)
    first = results[0, 0]
    for key, got in results.items():
        assert got == first, key
    y = np.frombuffer(first[0], dtype).reshape(shape)
    dx = np.frombuffer(first[2], dtype).reshape(shape)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    y_ref = ref_batch_norm(x0, mean, var, gamma, beta, axis=axis, eps=1e-3)
    dx_ref = ref_batch_norm_backward(dy0, x0, mean, var, gamma, axis=axis, eps=1e-3)[0]
    assert np.max(np.abs(y - y_ref)) <= tol * 10
    assert np.max(np.abs(dx - dx_ref)) <= tol * 10


def test_streamed_outputs_are_bitwise_the_same():
    """With BN_CY_STREAM_MIN_BYTES=0 every output is written with streaming stores (where this
    build and CPU have them): same bytes as the cached stores of this process."""
    here = {}
    for dtype in (np.float32, np.float64):
        for shape, axis in CASES:
            here[np.dtype(dtype).name, shape] = digest(outputs_at_offsets(shape, axis, dtype)[0])
    code = (
        "import numpy as np, test_alignment as t\n"
        "for dtype in (np.float32, np.float64):\n"
        "    for shape, axis in t.CASES:\n"
        "        print(np.dtype(dtype).name, shape, t.digest(t.outputs_at_offsets(shape, axis, dtype)[0]))\n"
    )
    out = run_python(code, {"BN_CY_STREAM_MIN_BYTES": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(here)
    for (name, shape), line in zip(here, lines):
        assert line == "%s %s %s" % (name, shape, here[name, shape]), line


@pytest.mark.parametrize(
    "value,expected",
    [("0", 0.0), (" 1e5 ", 1e5), ("4096", 4096.0), ("inf", float("inf")), ("", None),
     ("abc", None), ("12x", None), ("-3", None), ("nan", None)],
)
def test_stream_threshold_from_the_environment(value, expected):
    """BN_CY_STREAM_MIN_BYTES as the kernels read it: a number of bytes >= 0 (inf: never
    stream); an empty, malformed or negative value is ignored, not read as 0 (which would
    stream every output)."""
    out = run_python(
        "import bn_cy; print(repr(bn_cy.build_info()['stream_min_bytes']))",
        {"BN_CY_STREAM_MIN_BYTES": value},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == repr(expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(5, 7, 48), (3, 6, 37), (1, 4, 16), (2, 300, 20), (6, 2, 9)])
@pytest.mark.parametrize("kx,ky", [(0, 0), (0, 5), (3, 1), (1, 7)])
def test_flat_short_planes_match_the_per_plane_walk(dtype, shape, kx, ky):
    """Short planes back to back are normalized as one flat run; an output whose planes do not
    follow each other (a view into a wider array) takes the per-plane walk: same bytes."""
    rng = np.random.default_rng(5)
    x = at_offset((3.0 + rng.standard_normal(shape)).astype(dtype), kx)
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    y = at_offset(np.zeros(shape, dtype), ky)
    bn_cy.batch_norm(x, mean, var, gamma, beta, axis=1, out=y)
    wide = np.zeros(shape[:2] + (shape[2] + 3,), dtype)
    y_planes = wide[:, :, 1 : 1 + shape[2]]
    bn_cy.batch_norm(x, mean, var, gamma, beta, axis=1, out=y_planes)
    assert y.tobytes() == np.ascontiguousarray(y_planes).tobytes()
    ref = ref_batch_norm(x.astype(np.float64), mean, var, gamma, beta, axis=1, eps=1e-3)
    tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-14}[dtype]
    assert np.max(np.abs(y.astype(np.float64) - ref) / (1 + np.abs(ref))) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(5, 7, 48), (3, 6, 37), (1, 4, 16), (2, 300, 20), (6, 2, 9),
                                   (16, 64, 48), (12, 96, 37)])
@pytest.mark.parametrize("kx,ky", [(0, 0), (0, 5), (3, 1), (1, 7)])
def test_flat_short_planes_dx_match_the_per_plane_walk(dtype, shape, kx, ky):
    """dx of short planes back to back (no mask) is written as one flat run, whose vectors may
    straddle two planes; an output whose planes do not follow each other takes the per-plane
    walk: same bytes, in training and inference mode, at 1 and 2 threads (the last two shapes
    are large enough for two), and the oracle's values."""
    rng = np.random.default_rng(7)
    x = at_offset((3.0 + rng.standard_normal(shape)).astype(dtype), kx)
    dy = at_offset(rng.standard_normal(shape).astype(dtype), kx)
    c = shape[1]
    gamma = rng.uniform(0.5, 2.0, c)
    mean = x.astype(np.float64).mean(axis=(0, 2))
    var = x.astype(np.float64).var(axis=(0, 2))
    tol = {np.float16: 5e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for training in (True, False):
        wide = np.zeros(shape[:2] + (shape[2] + 3,), dtype)
        dx_planes = wide[:, :, 1 : 1 + shape[2]]
        bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=1, training=training,
                                  out=dx_planes)
        for threads in (1, 2):
            dx = at_offset(np.zeros(shape, dtype), ky)
            bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=1, training=training,
                                      out=dx, n_threads=threads)
            assert dx.tobytes() == np.ascontiguousarray(dx_planes).tobytes(), (training, threads)
        ref = ref_batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), mean, var,
                                      gamma, axis=1, eps=1e-3, training=training)[0]
        assert np.max(np.abs(dx.astype(np.float64) - ref) / (1 + np.abs(ref))) <= tol


@pytest.mark.parametrize("dtype,channels", [(np.float32, 256), (np.float32, 96),
                                            (np.float64, 64)])
def test_rows_walked_one_at_a_time_match_the_walk_by_fours(dtype, channels):
    """Short flat rows are normalized four at a time while x and y fill at most a quarter of the
    last-level cache, one at a time beyond it (streamed beyond half of it): the rows of an input
    past a quarter of the cache are bitwise those of its first rows normalized alone (four at a
    time), at 1 and 2 threads, at two offsets of the output, and match the float64 oracle."""
    llc = bn_cy.build_info()["last_level_cache_bytes"] or 32 * 2**20
    item = np.dtype(dtype).itemsize
    # x and y together 3/8 of the cache: past the quarter, short of the half (not streamed)
    rows = max(64, int(llc * 3 / 16) // (channels * item))
    rng = np.random.default_rng(29)
    x = (4.0 + rng.standard_normal((rows, channels))).astype(dtype)
    mean, var = rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)
    gamma, beta = rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)
    for ky in (0, 3):
        head = at_offset(np.zeros((64, channels), dtype), ky)
        bn_cy.batch_norm(x[:64], mean, var, gamma, beta, out=head)
        for threads in (1, 2):
            y = at_offset(np.zeros_like(x), ky)
            bn_cy.batch_norm(x, mean, var, gamma, beta, out=y, n_threads=threads)
            assert y[:64].tobytes() == head.tobytes(), (ky, threads)
            if threads == 1:
                first = y.tobytes()
            else:
                assert y.tobytes() == first, ky
    ref = ref_batch_norm(x.astype(np.float64), mean, var, gamma, beta, axis=-1, eps=1e-3)
    tol = {np.float32: 2e-6, np.float64: 1e-14}[dtype]
    assert np.max(np.abs(y - ref) / (1 + np.abs(ref))) <= tol


@pytest.mark.parametrize("dtype,channels", [(np.float32, 256), (np.float64, 64)])
def test_backward_rows_walked_one_at_a_time_match_the_row_walk(dtype, channels):
    """dx of flat rows is walked four rows at a time while dy, x and dx fill at most a quarter
    of the last-level cache, one at a time beyond it: past the quarter, dx (training and
    inference mode) is bitwise that of the walk row by row into an output whose rows are not
    back to back, at 1 and 2 threads, and matches the float64 oracle."""
    llc = bn_cy.build_info()["last_level_cache_bytes"] or 32 * 2**20
    item = np.dtype(dtype).itemsize
    # dy, x and dx together 3/8 of the cache: past the quarter, short of the half
    rows = max(64, int(llc / 8) // (channels * item))
    rng = np.random.default_rng(31)
    x = (4.0 + rng.standard_normal((rows, channels))).astype(dtype)
    dy = rng.standard_normal((rows, channels)).astype(dtype)
    mean, var = x.mean(axis=0), x.var(axis=0)
    gamma = rng.uniform(0.5, 2.0, channels)
    for training in (True, False):
        wide = np.zeros((rows, channels + 16), dtype)
        by_rows = wide[:, 8:8 + channels]
        bn_cy.batch_norm_backward(dy, x, mean, var, gamma, training=training, out=by_rows)
        for threads in (1, 2):
            dx = np.zeros_like(x)
            bn_cy.batch_norm_backward(dy, x, mean, var, gamma, training=training, out=dx,
                                      n_threads=threads)
            assert dx.tobytes() == np.ascontiguousarray(by_rows).tobytes(), (training, threads)
        ref = ref_batch_norm_backward(dy, x, mean, var, gamma, axis=-1, eps=1e-3,
                                      training=training)[0]
        tol = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
        assert np.max(np.abs(dx - ref) / (1 + np.abs(ref))) <= tol


STATS_CASES = [
    ((300, 1100), -1),      # blocks of channels, the last not a whole block
    ((140, 520), -1),       # a block of 256 and a short one
    ((130, 768), -1),       # whole blocks
    ((16, 9, 700), -1),     # rows with an outer and an inner index
    ((96, 288), -1),        # one block of 18 vectors, rows on whole lines: a head and a tail
    ((200, 64), -1),        # one block of four vectors: too few for the aligned split
    ((70, 40), -1),         # too few channels, rows not on whole lines
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", STATS_CASES)
def test_statistics_do_not_depend_on_input_alignment(shape, axis, dtype):
    """The rows statistics start their wide loop at the first aligned channel (its blocks of
    channels shifted to match) and cover the channels before and after it with overlapping
    vectors: the statistics, and the training output, are bitwise the same at every offset of
    the input in its cache line, and match the float64 oracle."""
    rng = np.random.default_rng(23)
    x0 = (7.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
    lanes = 64 // np.dtype(dtype).itemsize
    seen = set()
    for k in range(lanes):
        x = at_offset(x0, k)
        mean, var = bn_cy.moments(x, axis)
        y, tm, tv = bn_cy.batch_norm_train(x, axis=axis)
        assert tm.tobytes() == mean.tobytes() and tv.tobytes() == var.tobytes(), k
        seen.add((mean.tobytes(), var.tobytes(), y.tobytes()))
    assert len(seen) == 1
    red = tuple(i for i in range(len(shape)) if i != len(shape) + axis)
    x64 = x0.astype(np.float64)
    m_ref, v_ref = x64.mean(axis=red), x64.var(axis=red)
    tol = {np.float16: 1e-6, np.float32: 1e-6, np.float64: 1e-13}[dtype]
    assert np.max(np.abs(mean - m_ref) / (np.abs(m_ref) + np.sqrt(v_ref))) <= tol
    assert np.max(np.abs(var - v_ref) / v_ref) <= tol
