"""The elementwise passes start their vector loops at an aligned output element (a peel, and for
contiguous rows a walk shifted by the peel with rotated per-channel constants). Whatever the
offset of the input and output buffers, the results must be bitwise those of aligned buffers,
and match the float64 oracle."""

import numpy as np
import pytest

import bn_cy
from reference import ref_batch_norm, ref_batch_norm_backward

CASES = [
    ((40, 64), -1),        # flat rows, C * 4 bytes a multiple of 64
    ((6, 7, 48), -1),      # flat rows with an inner run
    ((33, 16), -1),        # one cache line per row (float32)
    ((50, 24), -1),        # rows not a whole number of lines: no shifted walk
    ((3, 5, 300), 1),      # planes longer than the peel threshold
    ((2, 3, 1000), 1),
]


def at_offset(a, k):
    """A copy of `a` whose data start k elements after a 64-byte boundary."""
    n = a.size
    buf = np.empty(n + 64, a.dtype)
    start = (-buf.ctypes.data % 64) // a.itemsize + k
    view = buf[start:start + n].reshape(a.shape)
    view[...] = a
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_outputs_do_not_depend_on_buffer_alignment(shape, axis, dtype):
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
            results[kx, ky] = (y.tobytes(), yt.tobytes(), dx.tobytes())
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
