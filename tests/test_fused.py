"""The fused passes for channels-first (planes) layouts against the separate ones.

batch_norm_train and batch_norm_backward on planes of 8 KiB or more take one block of channels at
a time (the reduction, then the elementwise pass, while the block's inputs are still in cache);
shorter planes take the separate passes. The
synchronized paths keep whole-array passes: moments_partial then batch_norm with the gathered
statistics, grad_sums then grad_input with the gathered sums. Both must give the same bits, so a
synchronized call on one process equals a local one, whatever the thread count.
"""

import numpy as np
import pytest

import bn_cy
from bn_cy import _kernels

CASES = [
    # planes of 16 KiB (float32): fused, several channels per block (one thread for the
    # training forward of float32, every thread count for the backward)
    pytest.param((4, 48, 64, 64), 1, id="nchw-long"),
    pytest.param((8, 64, 28, 28), 1, id="nchw"),  # planes of 3 KiB: separate passes
    pytest.param((64, 96, 128), 1, id="nct"),  # short planes: separate passes
    pytest.param((4, 7, 33), 1, id="small-odd"),
    pytest.param((2, 300, 17), 1, id="many-channels"),
    pytest.param((3, 5, 2, 9), 1, id="tiny-4d"),
    pytest.param((16, 6, 1100), 1, id="few-channels"),
    pytest.param((5, 40, 6, 6), 0, id="axis0"),
]


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _two_pass(dy, x, axis, w, mean, var, gamma, eps, training, wtotal, n_threads):
    sdy, sdyx = _kernels.grad_sums(dy, x, axis, mean, n_threads)
    dx = _kernels.grad_input(dy, x, axis, None, w, mean, var, gamma, eps, training, wtotal, sdy,
                             sdyx, n_threads)
    return dx, sdy, sdyx / np.sqrt(var + eps)


def _case(shape, axis, dtype, seed):
    """rng, compute dtype, x, gamma and the shape of a mask for one case."""
    rng = np.random.default_rng(seed)
    cdt = np.float64 if dtype == np.float64 else np.float32
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, shape[axis])
    return rng, cdt, x, gamma, shape[:axis] + shape[axis + 1:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", CASES)
def test_fused_equals_two_pass(shape, axis, dtype):
    rng, cdt, x, gamma, positions = _case(shape, axis, dtype, 11)
    dy = rng.standard_normal(shape).astype(dtype)
    mean, var = (np.asarray(a, np.float64) for a in bn_cy.moments(x, axis))
    for training in (True, False):
        for masked in (False, True):
            w = (rng.random(positions) < 0.7).astype(cdt) if masked and training else None
            # 0/1 weights: their total is exact in any summation order
            wtotal = float(w.sum()) if w is not None else float(x.size // shape[axis])
            ref = _two_pass(dy, x, axis, w, mean, var, gamma, 1e-3, training, wtotal, 1)
            for n in (1, 2, 3):
                dx, dg, db = _kernels.batch_norm_backward(dy, x, axis, None, w, mean, var, gamma,
                                                          1e-3, training, n)
                where = f"training={training} masked={masked} n_threads={n}"
                assert np.array_equal(_bits(dx), _bits(ref[0])), "dx " + where
                # dgamma and dbeta come back in the dtype of x
                assert np.array_equal(db, ref[1].astype(db.dtype)), "dbeta " + where
                assert np.array_equal(dg, ref[2].astype(dg.dtype)), "dgamma " + where


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", CASES)
def test_fused_train_equals_separate_passes(shape, axis, dtype):
    rng, cdt, x, gamma, positions = _case(shape, axis, dtype, 13)
    x.flat[::7] = 5  # some repeated values
    beta = rng.uniform(-1, 1, shape[axis])
    for masked in (False, True):
        for g, b in ((gamma, beta), (None, None)):
            w = rng.choice([0.0, 0.5, 1.0, 3.0], positions).astype(cdt) if masked else None
            wsum, mean, m2 = _kernels.moments_partial(x, axis, w, 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                var = np.where(wsum > 0, m2 / wsum, np.nan)
            mean = np.where(wsum > 0, mean, np.nan)
            y_ref = _kernels.batch_norm(x, axis, None, mean, var, g, b, 1e-3, 1)
            for n in (1, 2, 3):
                y, m, v = _kernels.batch_norm_train(x, axis, None, w, g, b, 1e-3, n)
                where = f"masked={masked} affine={g is not None} n_threads={n}"
                assert np.array_equal(_bits(y), _bits(y_ref)), "y " + where
                assert np.array_equal(_bits(m), _bits(mean.astype(m.dtype))), "mean " + where
                assert np.array_equal(_bits(v), _bits(var.astype(v.dtype))), "var " + where


def test_fused_strided_and_negative_strides():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 64, 2100))
    x = base[::-1, :, ::2]  # negative outer stride, strided inner; planes of 1050 (fused)
    dy = np.sin(np.arange(x.size, dtype=np.float64)).reshape(x.shape)[:, ::-1]
    mean, var = (np.asarray(a, np.float64) for a in bn_cy.moments(x, 1))
    gamma = np.linspace(0.5, 2.0, 64)
    ref = _two_pass(dy, x, 1, None, mean, var, gamma, 1e-3, True, float(4 * 1050), 1)
    for n in (1, 2):
        dx, dg, db = _kernels.batch_norm_backward(dy, x, 1, None, None, mean, var, gamma, 1e-3,
                                                  True, n)
        assert np.array_equal(_bits(dx), _bits(ref[0]))
        assert np.array_equal(db, ref[1])
        assert np.array_equal(dg, ref[2])
    wsum, mean, m2 = _kernels.moments_partial(x, 1, None, 1)
    y_ref = _kernels.batch_norm(x, 1, None, mean, m2 / wsum, gamma, None, 1e-3, 1)
    for n in (1, 2):
        y, m, v = _kernels.batch_norm_train(x, 1, None, None, gamma, None, 1e-3, n)
        assert np.array_equal(_bits(y), _bits(y_ref))
        assert np.array_equal(m, mean) and np.array_equal(v, m2 / wsum)


def test_fused_matches_float64_oracle():
    """An independent check of the values (not only of the agreement of the two paths)."""
    rng = np.random.default_rng(2)
    # planes of 16 KiB: fused at 1 and 2 threads
    x = (rng.standard_normal((4, 96, 64, 64)) * 2 + 100).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 96)
    y, mean, var = bn_cy.batch_norm_train(x, gamma, None, axis=1)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=1)
    xd, gd = x.astype(np.float64), dy.astype(np.float64)
    ax = (0, 2, 3)
    m = xd.mean(ax, keepdims=True)
    v = ((xd - m) ** 2).mean(ax, keepdims=True)
    inv = 1.0 / np.sqrt(v + 1e-3)
    xhat = (xd - m) * inv
    g = gamma.reshape(1, -1, 1, 1)
    ref_db = gd.sum(ax)
    ref_dg = (gd * xhat).sum(ax)
    ref_dx = g * inv * (gd - gd.mean(ax, keepdims=True) - xhat * (gd * xhat).mean(ax, keepdims=True))
    assert np.max(np.abs(mean - m.ravel())) <= 1e-6 * 100
    assert np.max(np.abs(var - v.ravel()) / v.ravel()) <= 1e-5
    assert np.max(np.abs(y - g * xhat)) <= 1e-5 * np.abs(g * xhat).max()
    scale = np.abs(g * inv * gd).max()
    assert np.max(np.abs(dx - ref_dx)) <= 1e-5 * scale
    assert np.allclose(db, ref_db, rtol=1e-5, atol=1e-3)
    assert np.allclose(dg, ref_dg, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", [(4, 96, 64, 64), (8, 64, 28, 28), (64, 96, 128)],
                         ids=["nchw-long", "nchw", "nct"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fused_in_place(shape, n_threads):
    """out= the input: a block's reduction is complete before its outputs overwrite it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, m, v = bn_cy.batch_norm_train(x, axis=1, n_threads=n_threads)
    x2 = x.copy()
    y2, m2, v2 = bn_cy.batch_norm_train(x2, axis=1, out=x2, n_threads=n_threads)
    assert np.shares_memory(y2, x2)
    assert np.array_equal(_bits(x2), _bits(y)) and np.array_equal(m2, m) and np.array_equal(v2, v)
    dx, _, _ = bn_cy.batch_norm_backward(dy, x, m, v, axis=1, n_threads=n_threads)
    for target in ("dy", "x"):
        d, xx = dy.copy(), x.copy()
        out = d if target == "dy" else xx
        bn_cy.batch_norm_backward(d, xx, m, v, axis=1, out=out, n_threads=n_threads)
        assert np.array_equal(_bits(out), _bits(dx)), target
