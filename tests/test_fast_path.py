"""The ops' fast path (a native float32/float64 ndarray, an int axis, a float epsilon, no mask,
no synchronization) must give bitwise the results of the general path, which the same call takes
when an argument is of another kind (a NumPy integer axis, an integer epsilon, a list)."""

import numpy as np
import pytest

import bn_cy
from bn_cy import _kernels


def _arrays(dtype, shape=(6, 5, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    c = shape[-1]
    return x, rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)


def _same(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.dtype == q.dtype and p.shape == q.shape
        assert np.ascontiguousarray(p).tobytes() == np.ascontiguousarray(q).tobytes()


def test_plain_recognizes_only_the_common_kinds():
    """The extension's plain entries compute the common calls and return None for anything
    else, which the ops then validate (and convert, or reject) themselves."""
    x = np.zeros((3, 4), np.float32)
    g = np.ones(4, np.float32)
    train = _kernels.batch_norm_train_plain
    assert train(x, g, None, -1, 1e-3, None, None) is not None
    assert train(x, None, g[:3].astype(np.float64), -2, 0.0, np.empty_like(x), 1) is not None
    assert train(x.astype(np.float64), None, None, 1, 1e-3, None, 2) is not None
    for args in [
        (x, None, None, np.int64(-1), 1e-3, None, None),  # NumPy integer axis
        (x, None, None, True, 1e-3, None, None),  # bool axis
        (x, None, None, 2, 1e-3, None, None),  # out of range: the ops raise
        (x, None, None, -3, 1e-3, None, None),
        (x, None, None, -1, 1, None, None),  # int epsilon
        (x, None, None, -1, float("nan"), None, None),
        (x, None, None, -1, float("inf"), None, None),
        (x, None, None, -1, -1.0, None, None),
        (x.astype(">f4"), None, None, -1, 1e-3, None, None),
        (x.astype(np.float16), None, None, -1, 1e-3, None, None),
        (np.float32(1.0), None, None, 0, 1e-3, None, None),
        (x.tolist(), None, None, -1, 1e-3, None, None),
        (x, g[:3], None, -1, 1e-3, None, None),  # wrong length
        (x, None, g.reshape(1, 4), -1, 1e-3, None, None),
        (x, None, g.astype(np.float16), -1, 1e-3, None, None),
        (x, None, g.astype(">f4"), -1, 1e-3, None, None),
        (x, list(g), None, -1, 1e-3, None, None),
        (x, None, None, -1, 1e-3, np.empty((3, 4), np.float64), None),  # out dtype
        (x, None, None, -1, 1e-3, np.empty((4, 3), np.float32), None),  # out shape
        (x, None, None, -1, 1e-3, np.empty((3, 4, 1), np.float32), None),
        (x, None, None, -1, 1e-3, np.broadcast_to(np.float32(0), (3, 4)), None),  # read-only
        (x, None, None, -1, 1e-3, [[0.0] * 4] * 3, None),
        (x, None, None, -1, 1e-3, None, 0),
        (x, None, None, -1, 1e-3, None, -1),  # counts back from the cores: the ops resolve it
        (x, None, None, -1, 1e-3, None, np.int64(2)),
        (x, None, None, -1, 1e-3, None, 1.0),
        (x, None, None, -1, 1e-3, None, 10**30),
    ]:
        assert train(*args) is None, args
    mean, var = np.zeros(4, np.float32), np.ones(4)
    infer = _kernels.batch_norm_plain
    assert infer(x, mean, var, None, None, 1, 1e-3, None, None) is not None
    assert infer(x, None, var, None, None, 1, 1e-3, None, None) is None
    assert infer(x, mean, None, None, None, 1, 1e-3, None, None) is None
    assert infer(x, mean[:2], var, None, None, 1, 1e-3, None, None) is None
    assert _kernels.moments_plain(x, 0, None) is not None
    assert _kernels.moments_plain(x, 0, False) is None
    back = _kernels.batch_norm_backward_plain
    assert back(x, x, mean, var, None, -1, 1e-3, True, None, None) is not None
    assert back(np.broadcast_to(x, x.shape), x, mean, var, None, -1, 1e-3, False, None,
                None) is not None  # dy is only read
    assert back(x.astype(np.float64), x, mean, var, None, -1, 1e-3, True, None, None) is None
    assert back(None, x, mean, var, None, -1, 1e-3, True, None, None) is None
    assert back(x, x, mean, var, None, -1, 1e-3, 1, None, None) is None  # int training


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_fast_and_general_paths_agree_bitwise(dtype, axis):
    x, g, b = _arrays(dtype, shape=(6, 5, 4) if axis == -1 else (4, 4, 4))
    mean, var = bn_cy.moments(x, axis=np.int64(axis))
    _same(bn_cy.moments(x, axis=axis), (mean, var))
    _same(bn_cy.batch_norm_train(x, g, b, axis=axis),
          bn_cy.batch_norm_train(x, list(g), list(b), axis=np.int64(axis)))
    _same(bn_cy.batch_norm(x, mean, var, g, b, axis=axis, epsilon=1e-3),
          bn_cy.batch_norm(x, mean.tolist(), var.tolist(), g, b, axis=np.int64(axis),
                           epsilon=np.float64(1e-3)))
    # float32 and float64 parameter vectors give the same results (read exactly as float64)
    _same(bn_cy.batch_norm_train(x, g.astype(np.float32), None, axis=axis),
          bn_cy.batch_norm_train(x, g.astype(np.float32).astype(np.float64), None,
                                 axis=np.int64(axis)))
    y, yo = np.empty_like(x), np.empty_like(x)
    r = bn_cy.batch_norm_train(x, g, b, axis=axis, out=y)
    assert r[0] is y
    _same(r, bn_cy.batch_norm_train(x, g, b, axis=np.int64(axis), out=yo))
    assert bn_cy.batch_norm(x, mean, var, axis=axis, out=yo) is yo
    dy = _arrays(dtype, shape=x.shape, seed=1)[0]
    for training in (True, False):
        _same(bn_cy.batch_norm_backward(dy, x, mean, var, g, axis=axis, training=training),
              bn_cy.batch_norm_backward(dy, x, list(mean), var, g, axis=np.int64(axis),
                                        training=np.bool_(training)))
    # threads given as a NumPy integer take the general path
    _same(bn_cy.batch_norm_train(x, g, b, axis=axis, n_threads=2),
          bn_cy.batch_norm_train(x, g, b, axis=axis, n_threads=np.int64(2)))


def test_fast_path_errors_name_the_argument():
    x, g, _ = _arrays(np.float32)
    with pytest.raises(ValueError, match="gamma must have shape"):
        bn_cy.batch_norm_train(x, g[:-1])
    with pytest.raises(ValueError, match="out must have shape"):
        bn_cy.batch_norm_train(x, out=np.empty((2, 2), np.float32))
    with pytest.raises(ValueError, match="out must have dtype"):
        bn_cy.batch_norm_train(x, out=np.empty(x.shape, np.float64))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        bn_cy.batch_norm(x, np.zeros(4), np.ones(4), out=ro)
    with pytest.raises(TypeError, match="n_threads"):
        bn_cy.moments(x, n_threads=1.5)


def test_output_overlapping_an_input_is_computed_aside():
    """An out= that partially overlaps x (not the same layout) gets a temporary: the result is
    that of the non-overlapping call."""
    base = np.random.default_rng(3).standard_normal(40).astype(np.float32)
    x = base[:32].reshape(8, 4)
    expect = bn_cy.batch_norm_train(x.copy())[0]
    out = base[8:40].reshape(8, 4)  # shifted by two rows: overlaps x
    y = bn_cy.batch_norm_train(x, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("channels", [7, 1024])
def test_float32_vectors_changed_in_place_between_calls_are_seen(channels):
    """float32 per-channel vectors are copied to float64 into room kept from call to call, and
    only rewritten when some value changed: every change must reach the kernels (one value, a
    sign of zero, a NaN, all of them), as must a new vector length. The float64 vectors are the
    kernels' own input, with no room involved. 1024 channels of 300 rows on two threads take the
    kept room; 7 channels (a call run on one thread) the room of the call."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, channels)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mean = rng.standard_normal(channels).astype(np.float32)
    var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)

    def expected():
        return bn_cy.batch_norm(x, mean.astype(np.float64), var.astype(np.float64),
                                gamma.astype(np.float64), beta.astype(np.float64), n_threads=2)

    def check():
        got = bn_cy.batch_norm(x, mean, var, gamma, beta, n_threads=2)
        ref = expected()
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
        y, _, _ = bn_cy.batch_norm_train(x, gamma, beta, n_threads=2)
        y64, _, _ = bn_cy.batch_norm_train(x, gamma.astype(np.float64), beta.astype(np.float64),
                                           n_threads=2)
        assert np.array_equal(y.view(np.uint32), y64.view(np.uint32))
        dx, _, _ = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, n_threads=2)
        dx64, _, _ = bn_cy.batch_norm_backward(dy, x, mean.astype(np.float64),
                                               var.astype(np.float64), gamma.astype(np.float64),
                                               n_threads=2)
        assert np.array_equal(dx.view(np.uint32), dx64.view(np.uint32))

    check()
    check()  # unchanged vectors: the room is reused as it is
    gamma[channels // 2] *= 1.5
    check()
    beta[0] = 0.0
    check()
    beta[0] = -0.0  # equal to 0.0, but another value
    check()
    assert _kernels.batch_norm_plain(x, mean, var, gamma, beta, -1, 1e-3, None, None) is not None
    mean[-1] = np.float32(np.nan)
    check()
    var[:] = var[::-1].copy()
    check()
    # another length, then this one again (the room's slots move with the length)
    bn_cy.batch_norm(x[:, :3], mean[:3], var[:3], gamma[:3], beta[:3])
    check()
