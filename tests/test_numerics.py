"""Accuracy against float64 math on the same input values (the contract's accuracy table).

float32, x = offset + N(0, 1), 4096 values per channel, epsilon 1e-3: max abs error of y
<= 1e-6 at offset 0 and <= 1e-5 up to offset 1e5, in the rows layout ((4096, 16), axis=-1) and
the planes layouts ((16, 16, 256), (1, 16, 4096) and (1, 600, 512), axis=1). Plus: statistics accuracy, variance never negative,
float64 accuracy, and 16-bit outputs rounded once from float32 arithmetic.
"""

import numpy as np
import pytest

import bn_cy
from conftest import dtype_params
from reference import (
    BFLOAT16,
    ml_dtypes,
    ref_batch_norm,
    ref_batch_norm_backward,
    ref_batch_norm_train,
    ref_moments,
)

OFFSETS = [0.0, 1e2, 1e3, 1e4, 1e5]
LAYOUTS = {
    "rows": ((4096, 16), -1),
    "planes": ((16, 16, 256), 1),
}
# planes longer than the short-plane tiles (a different statistics loop), and one sample of
# many short planes (its statistics split by blocks of channels); one outer index, so not in the
# ordered-data test, whose trends run along the first dim
ALL_LAYOUTS = dict(LAYOUTS, planes_long=((1, 16, 4096), 1), planes_one_sample=((1, 600, 512), 1))
EPS = 1e-3


def sample(layout, offset, dtype, seed=0):
    shape, axis = ALL_LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    return (offset + rng.standard_normal(shape)).astype(dtype), axis


def assert_mean_f32(mean, m_ref, v_ref):
    """A float32 mean: the float64 value rounded (one ulp), plus float32-level error relative
    to the data's spread (what sums of deviations in float32 cost; y stays far inside its
    target). At large offsets the ulp term dominates, which forces double-precision means."""
    bound = np.spacing(np.abs(m_ref).astype(np.float32)) + np.finfo(np.float32).eps * np.sqrt(v_ref)
    err = np.abs(mean - m_ref)
    assert np.all(err <= bound), (err.max(), bound[np.argmax(err / bound)])


def max_err(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)))


@pytest.mark.parametrize("layout", list(ALL_LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_float32_training_forward_accuracy(layout, offset):
    x, axis = sample(layout, offset, np.float32)
    y, mean, var = bn_cy.batch_norm_train(x, axis=axis, epsilon=EPS)
    y_ref, m_ref, v_ref = ref_batch_norm_train(x, axis=axis, eps=EPS)
    bound = 1e-6 if offset == 0 else 1e-5
    assert max_err(y, y_ref) <= bound, (max_err(y, y_ref), bound)
    # statistics: the float32 results are the float64 values rounded (within one ulp)
    assert_mean_f32(mean, m_ref, v_ref)
    assert np.all(np.abs(var - v_ref) <= 1e-6 * v_ref)
    assert np.all(var >= 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("order", ["ramp", "steps", "sorted", "outliers_first"])
def test_float32_statistics_of_ordered_data(layout, offset, order):
    """Data whose first values are far from the mean of what follows (a ramp along the batch,
    level steps, sorted values, a few outliers first): the kernels' running shifts are then off
    by one to tens of standard deviations, which their centered sums must absorb (or redo)
    without losing the accuracy of the contract."""
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(7)
    n = shape[0]
    if order == "ramp":
        trend = np.linspace(-4.0, 4.0, n)
    elif order == "steps":
        trend = np.repeat([-3.0, 2.5, -1.5, 3.5], n // 4)
    elif order == "outliers_first":
        trend = np.where(np.arange(n) < 8, 60.0, 0.0)
    else:
        trend = np.zeros(n)
    x = rng.standard_normal(shape) + trend.reshape((n,) + (1,) * (len(shape) - 1))
    if order == "sorted":
        x = np.sort(x, axis=0)
    x = (offset + x).astype(np.float32)
    y, mean, var = bn_cy.batch_norm_train(x, axis=axis, epsilon=EPS)
    y_ref, m_ref, v_ref = ref_batch_norm_train(x, axis=axis, eps=EPS)
    # the contract's bound, plus the rounding of y itself where outliers make |y| large
    bound = (1e-6 if offset == 0 else 1e-5) + np.spacing(np.abs(y_ref).astype(np.float32))
    assert np.all(np.abs(y - y_ref) <= bound), np.max(np.abs(y - y_ref) - bound)
    assert_mean_f32(mean, m_ref, v_ref)
    assert np.all(np.abs(var - v_ref) <= 1e-6 * v_ref), np.max(np.abs(var - v_ref) / v_ref)


@pytest.mark.parametrize("layout", list(ALL_LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_float32_moments_and_inference_accuracy(layout, offset):
    x, axis = sample(layout, offset, np.float32, seed=1)
    m_ref, v_ref = ref_moments(x, axis)
    mean, var = bn_cy.moments(x, axis)
    assert_mean_f32(mean, m_ref, v_ref)
    assert np.all(np.abs(var - v_ref) <= 1e-6 * v_ref)
    # inference with float64 statistics: the kernel must not round the mean to float32
    y = bn_cy.batch_norm(x, m_ref, v_ref, axis=axis, epsilon=EPS)
    y_ref = ref_batch_norm(x, m_ref, v_ref, axis=axis, eps=EPS)
    bound = 1e-6 if offset == 0 else 1e-5
    assert max_err(y, y_ref) <= bound, (max_err(y, y_ref), bound)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_float32_masked_forward_accuracy(layout, offset):
    x, axis = sample(layout, offset, np.float32, seed=2)
    shape = x.shape
    ms = shape[:axis % x.ndim] + shape[axis % x.ndim + 1:]
    mask = np.random.default_rng(5).random(ms) < 0.7
    y, mean, var = bn_cy.batch_norm_train(x, axis=axis, mask=mask, epsilon=EPS)
    m_ref, v_ref = ref_moments(x, axis, mask)
    y_ref = ref_batch_norm(x, m_ref, v_ref, axis=axis, eps=EPS)
    bound = 1e-6 if offset == 0 else 1e-5
    assert max_err(y, y_ref) <= bound, (max_err(y, y_ref), bound)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_float32_backward_accuracy(layout, offset):
    x, axis = sample(layout, offset, np.float32, seed=3)
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    _, mean, var = bn_cy.batch_norm_train(x, axis=axis, epsilon=EPS)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, mean, var, axis=axis, epsilon=EPS)
    rdx, rdg, rdb = ref_batch_norm_backward(dy, x, mean, var, axis=axis, eps=EPS)
    assert max_err(dx, rdx) <= 1e-5 * np.max(np.abs(rdx)), max_err(dx, rdx)
    n = x.size // x.shape[axis]
    # dgamma/dbeta are sums of n terms of size ~1: compare to their natural scale sqrt(n)
    assert max_err(dg, rdg) <= 1e-5 * np.sqrt(n), max_err(dg, rdg)
    assert max_err(db, rdb) <= 1e-5 * np.sqrt(n), max_err(db, rdb)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_float64_accuracy(layout, offset):
    x, axis = sample(layout, offset, np.float64, seed=6)
    y, mean, var = bn_cy.batch_norm_train(x, axis=axis, epsilon=EPS)
    y_ref, m_ref, v_ref = ref_batch_norm_train(x, axis=axis, eps=EPS)
    # (x - mean) cannot be better than the rounding of mean itself: a few ulps of the offset
    bound = 1e-12 + 8 * np.spacing(offset)
    assert max_err(y, y_ref) <= bound, (max_err(y, y_ref), bound)
    assert np.all(np.abs(mean - m_ref) <= 4 * np.spacing(np.abs(m_ref)) + 1e-15)
    assert np.all(np.abs(var - v_ref) <= 1e-12 * v_ref)
    dy = np.random.default_rng(7).standard_normal(x.shape)
    dx, _, _ = bn_cy.batch_norm_backward(dy, x, mean, var, axis=axis, epsilon=EPS)
    rdx, _, _ = ref_batch_norm_backward(dy, x, mean, var, axis=axis, eps=EPS)
    assert max_err(dx, rdx) <= (1e-12 + 8 * np.spacing(offset)) * np.max(np.abs(rdx))


def ulp(values, dtype):
    """Spacing of `dtype` numbers at |values| (normal and subnormal range)."""
    info = ml_dtypes.finfo(dtype) if ml_dtypes is not None else np.finfo(dtype)
    _, e = np.frexp(np.abs(np.asarray(values, np.float64)))
    return np.ldexp(1.0, np.maximum(e - 1, int(info.minexp)) - int(info.nmant))


SIXTEEN = [pytest.param(np.dtype(np.float16), id="float16")]
if BFLOAT16 is not None:
    SIXTEEN.append(pytest.param(BFLOAT16, id="bfloat16"))


@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3])
def test_16bit_output_is_rounded_once(dtype, layout, offset):
    x, axis = sample(layout, offset, dtype, seed=8)
    gamma = np.linspace(0.5, 3.0, x.shape[axis])
    beta = np.linspace(-2.0, 2.0, x.shape[axis])
    y, mean, var = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=EPS)
    y_ref, m_ref, v_ref = ref_batch_norm_train(x, gamma, beta, axis=axis, eps=EPS)
    got = y.astype(np.float64)
    # correct rounding of a float32-accurate value: half an ulp plus float32-level error
    allowed = 0.5 * ulp(y_ref, dtype) + 1e-6 * (np.abs(y_ref) + 2.0)
    bad = np.abs(got - y_ref) > allowed
    assert not bad.any(), (got[bad][:5], y_ref[bad][:5])
    assert_mean_f32(mean, m_ref, v_ref)
    assert np.all(np.abs(var - v_ref) <= 1e-6 * v_ref)


# ------------------------------------------------------------------------------------------
# variance never negative, constant channels exact


def _hard_channels(dtype, offset, n=5000):
    """Columns: constant; two adjacent representable values; one outlier; alternating values."""
    v = np.asarray(offset).astype(dtype)
    up = (v.astype(np.float64) + ulp(v, dtype)).astype(dtype)  # the next representable value
    assert up.astype(np.float64) > v.astype(np.float64)
    cols = [np.full(n, v), np.where(np.arange(n) % 7 == 0, up, v), np.full(n, v), np.full(n, v)]
    cols[2][n // 2] = up
    cols[3][::2] = up
    return np.stack(cols, axis=-1).astype(dtype)


HARD_CASES = [
    pytest.param(dtype, offset, id=f"{dtype.name}-{offset:g}")
    for dtype in [p.values[0] for p in dtype_params()]
    for offset in [0.1, 1.0, 3e3, 1e5, -7.7e4]
    if not (dtype.itemsize == 2 and abs(offset) > 6e4)  # beyond the 16-bit range
]


@pytest.mark.parametrize("dtype,offset", HARD_CASES)
def test_variance_never_negative(dtype, offset):
    x = _hard_channels(dtype, offset)
    views = ((-1, x), (0, np.ascontiguousarray(x.T)), (1, x.T.reshape(4, 50, 100).transpose(1, 0, 2)))
    for axis, xx in views:
        mean, var = bn_cy.moments(xx, axis)
        assert np.all(var >= 0), var
        assert var[0] == 0 and mean[0] == np.asarray(x[0, 0]).astype(mean.dtype)
        y, _, tvar = bn_cy.batch_norm_train(xx, axis=axis)
        assert np.all(tvar >= 0)
        assert np.isfinite(y.astype(np.float64)).all()
        mshape = tuple(np.delete(np.array(xx.shape), axis % xx.ndim))
        mask = np.arange(5000).reshape(mshape) % 3 != 0
        _, mvar = bn_cy.moments(xx, axis, mask=mask)
        assert np.all(mvar >= 0)


# ------------------------------------------------------------------------------------------
# the inference scale gamma / sqrt(var + eps) over the whole range of variances


def _wide_variances(n, seed):
    """Variances log-uniform over 1e-300..1e300, then the ones outside that range or special."""
    rng = np.random.default_rng(seed)
    var = 10.0 ** rng.uniform(-300.0, 300.0, n)
    special = [0.0, 5e-324, 1e-310, 2e-300, 1e-3, 1.0, 4.0, 9e299, 1e305, np.inf, np.nan]
    var[: len(special)] = special
    return var


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_inference_scale_over_the_whole_variance_range(layout, epsilon, n_threads):
    """float64 data: y within a few ulps of float64 math for every variance, Inf and NaN where
    the quotient has them (var + eps of 0 gives an infinite scale)."""
    C, rows = 203, 256  # enough rows per thread for the per-thread constants
    rng = np.random.default_rng(11)
    if layout == "rows":
        x, axis = rng.standard_normal((rows, C)), -1
    else:
        x, axis = rng.standard_normal((4, C, rows // 4 + 13)), 1
    var = _wide_variances(C, seed=12)
    mean = rng.standard_normal(C) * 0.1
    gamma, beta = rng.uniform(0.5, 2.0, C), rng.standard_normal(C)
    y = bn_cy.batch_norm(x, mean, var, gamma, beta, axis=axis, epsilon=epsilon,
                         n_threads=n_threads)
    ref = ref_batch_norm(x, mean, var, gamma, beta, axis=axis, eps=epsilon)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    assert np.array_equal(y[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)])
    err = np.abs(y[finite] - ref[finite])
    # the scale to a few ulps; (x - mean) * scale + beta adds a few roundings more
    scale_term = np.abs(ref[finite] - np.broadcast_to(
        beta.reshape((-1, 1) if axis == 1 else (1, -1)), x.shape)[finite])
    bound = 8 * np.finfo(np.float64).eps * (scale_term + np.abs(ref[finite])) + 1e-300
    assert np.all(err <= bound), (err / bound).max()
