"""The ops' fast path (a native float32/float64 ndarray, an int axis, a float epsilon, no mask,
no synchronization) must give bitwise the results of the general path, which the same call takes
when an argument is of another kind (a NumPy integer axis, an integer epsilon, a list)."""

import numpy as np
import pytest

import bn_cy
from bn_cy import ops


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
    x = np.zeros((3, 4), np.float32)
    assert ops._plain(x, -1, 1e-3) == 1
    assert ops._plain(x, 0) == 0
    assert ops._plain(x, np.int64(-1)) is None  # general path
    assert ops._plain(x, True) is None
    assert ops._plain(x, 2) is None  # out of range: the general path raises
    assert ops._plain(x, -1, 1) is None  # int epsilon
    assert ops._plain(x, -1, float("nan")) is None
    assert ops._plain(x, -1, -1.0) is None
    assert ops._plain(x.astype(">f4"), -1) is None
    assert ops._plain(x.astype(np.float16), -1) is None
    assert ops._plain(np.float32(1.0), 0) is None
    assert ops._plain(x.tolist(), -1) is None


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
