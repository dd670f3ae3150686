"""Example-based tests of bn_cy's functional ops against the float64 oracle (tests/reference.py)."""

import concurrent.futures
import threading
import time

import numpy as np
import pytest

import bn_cy
from conftest import (
    F32,
    F64,
    LAYOUTS,
    NONFLOAT_DTYPES,
    apply_layout,
    assert_unchanged,
    check_backward,
    check_stats,
    check_y,
    dtype_params,
    random_values,
    rel_tol,
    snapshot,
)
from reference import (
    as_f64,
    mask_shape,
    ml_dtypes,
    output_dtype,
    ref_batch_norm,
    ref_batch_norm_backward,
    ref_batch_norm_train,
    ref_moments,
    stats_dtype,
)

SHAPES = [(7,), (6, 5), (4, 3, 5), (3, 4, 2, 5), (2, 3, 2, 3, 4)]
AXIS_CASES = [
    pytest.param(shape, axis, id=f"{'x'.join(map(str, shape))}-ax{axis}")
    for shape in SHAPES
    for axis in range(-len(shape), len(shape))
]


def channel_params(rng, c):
    """float64 gamma/beta with both signs; beta exactly representable in every dtype."""
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.integers(-8, 9, c) / 4.0
    return gamma, beta


def stats_for(rng, c, dtype):
    """Plausible (mean, var) to normalize with, in the stats dtype of `dtype`."""
    sdt = stats_dtype(dtype)
    return rng.normal(0, 1, c).astype(sdt), rng.uniform(0.2, 3.0, c).astype(sdt)


def assert_near(got, expected):
    """Equal up to a few ulps of the result dtype (different memory layouts may take kernel
    paths that round differently; the contract promises bitwise equality only across threads)."""
    dt = np.asarray(expected).dtype
    eps = float(ml_dtypes.finfo(dt).eps) if ml_dtypes is not None else float(np.finfo(dt).eps)
    e = as_f64(expected)
    scale = max(1.0, float(np.nanmax(np.abs(e), initial=0.0)))
    np.testing.assert_allclose(as_f64(got), e, rtol=8 * eps, atol=8 * eps * scale)


# ------------------------------------------------------------------------------------------
# every axis of ranks 1..5, every dtype


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", AXIS_CASES)
def test_moments_every_axis(rng, dtype, shape, axis):
    x = random_values(rng, shape, dtype, offset=3.0, scale=2.0)
    before = snapshot(x)
    mean, var = bn_cy.moments(x, axis=axis)
    check_stats(mean, var, x, axis)
    assert_unchanged(before, [x])


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", AXIS_CASES)
def test_batch_norm_every_axis(rng, dtype, shape, axis):
    x = random_values(rng, shape, dtype)
    c = shape[axis]
    mean, var = stats_for(rng, c, dtype)
    gamma, beta = channel_params(rng, c)
    before = snapshot(x, mean, var, gamma, beta)
    y = bn_cy.batch_norm(x, mean, var, gamma, beta, axis=axis, epsilon=1e-3)
    assert_unchanged(before, [x, mean, var, gamma, beta])
    y_ref = ref_batch_norm(x, mean, var, gamma, beta, axis, 1e-3)
    check_y(y, x, mean, var, gamma, beta, axis, 1e-3, y_ref, output_dtype(dtype))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", AXIS_CASES)
def test_batch_norm_train_every_axis(rng, dtype, shape, axis):
    x = random_values(rng, shape, dtype, offset=-1.0, scale=3.0)
    gamma, beta = channel_params(rng, shape[axis])
    before = snapshot(x, gamma, beta)
    y, mean, var = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=1e-3)
    assert_unchanged(before, [x, gamma, beta])
    check_stats(mean, var, x, axis)
    y_ref, _, _ = ref_batch_norm_train(x, gamma, beta, axis, 1e-3)
    rm, rv = ref_moments(x, axis)
    check_y(y, x, rm, rv, gamma, beta, axis, 1e-3, y_ref, output_dtype(dtype))


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", AXIS_CASES)
def test_backward_every_axis(rng, dtype, shape, axis, training):
    x = random_values(rng, shape, dtype, offset=0.5)
    dy = random_values(rng, shape, dtype)
    gamma, _ = channel_params(rng, shape[axis])
    if training:
        _, mean, var = bn_cy.batch_norm_train(x, gamma, axis=axis)
    else:
        mean, var = stats_for(rng, shape[axis], dtype)
    before = snapshot(dy, x, mean, var, gamma)
    res = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, epsilon=1e-3,
                                    training=training)
    assert_unchanged(before, [dy, x, mean, var, gamma])
    ref = ref_batch_norm_backward(dy, x, mean, var, gamma, axis, 1e-3, None, training)
    check_backward(res, dy, x, mean, var, gamma, axis, 1e-3, None, training, ref,
                   output_dtype(dtype))


# ------------------------------------------------------------------------------------------
# bool / integer inputs -> float32


@pytest.mark.parametrize("dtype", [pytest.param(d, id=d.name) for d in NONFLOAT_DTYPES])
def test_nonfloat_inputs_compute_in_float32(rng, dtype):
    x = random_values(rng, (40, 3), dtype)
    if dtype.kind == "b":
        x[0, :] = [True, False, True]  # no constant channel by chance
    gamma, beta = channel_params(rng, 3)
    y, mean, var = bn_cy.batch_norm_train(x, gamma, beta)
    assert y.dtype == F32 and mean.dtype == F32 and var.dtype == F32
    check_stats(mean, var, x, -1)
    rm, rv = ref_moments(x, -1)
    check_y(y, x, rm, rv, gamma, beta, -1, 1e-3, ref_batch_norm(x, rm, rv, gamma, beta), F32)

    m2, v2 = bn_cy.moments(x)
    assert m2.dtype == F32 and v2.dtype == F32
    y2 = bn_cy.batch_norm(x, rm, rv, gamma, beta)
    assert y2.dtype == F32
    dy = random_values(rng, x.shape, F32)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, mean, var, gamma)
    assert dx.dtype == F32 and dg.dtype == F32 and db.dtype == F32
    ref = ref_batch_norm_backward(dy, x, mean, var, gamma)
    check_backward((dx, dg, db), dy, x, mean, var, gamma, -1, 1e-3, None, True, ref, F32)


# ------------------------------------------------------------------------------------------
# masks


def make_mask(rng, shape, kind):
    if kind == "bool":
        m = rng.random(shape) < 0.6
    elif kind in ("int8", "uint8", "int64"):
        m = (rng.random(shape) < 0.6).astype(kind)
    elif kind == "weights32":
        m = rng.choice([0.0, 0.25, 0.5, 1.0, 2.0, 3.0], shape).astype(np.float32)
    else:
        m = rng.choice([0.0, 0.25, 0.5, 1.0, 2.0, 3.0], shape).astype(np.float64)
    flat = m.reshape(-1)
    if flat.size:
        flat[0] = 1  # at least one selected position
    return m


MASK_KINDS = ["bool", "int8", "uint8", "int64", "weights32", "weights64"]
MASK_CASES = [((50, 4), -1), ((50, 4), 0), ((3, 4, 5), 1), ((3, 4, 5), -1), ((4, 2, 3, 5), 2), ((6,), 0)]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", MASK_CASES)
def test_masked_ops(rng, shape, axis, dtype, kind):
    x = random_values(rng, shape, dtype, offset=2.0)
    dy = random_values(rng, shape, dtype)
    mask = make_mask(rng, mask_shape(shape, axis), kind)
    gamma, beta = channel_params(rng, shape[axis])
    before = snapshot(x, dy, mask, gamma, beta)

    mean, var = bn_cy.moments(x, axis=axis, mask=mask)
    check_stats(mean, var, x, axis, mask)

    y, tmean, tvar = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, mask=mask)
    check_stats(tmean, tvar, x, axis, mask)
    rm, rv = ref_moments(x, axis, mask)
    y_ref = ref_batch_norm(x, rm, rv, gamma, beta, axis, 1e-3)
    check_y(y, x, rm, rv, gamma, beta, axis, 1e-3, y_ref, output_dtype(dtype))

    res = bn_cy.batch_norm_backward(dy, x, tmean, tvar, gamma, axis=axis, mask=mask)
    ref = ref_batch_norm_backward(dy, x, tmean, tvar, gamma, axis, 1e-3, mask, True)
    check_backward(res, dy, x, tmean, tvar, gamma, axis, 1e-3, mask, True, ref, output_dtype(dtype))
    assert_unchanged(before, [x, dy, mask, gamma, beta])


def test_bool_mask_selects_positions(rng):
    """A 0/1 mask gives the statistics of the selected rows; the others are still normalized."""
    x = rng.standard_normal((30, 3))
    mask = np.zeros(30, bool)
    mask[[1, 4, 5, 17, 29]] = True
    mean, var = bn_cy.moments(x, mask=mask)
    np.testing.assert_allclose(mean, x[mask].mean(0), rtol=1e-14)
    np.testing.assert_allclose(var, x[mask].var(0), rtol=1e-13)
    y, _, _ = bn_cy.batch_norm_train(x, mask=mask)
    np.testing.assert_allclose(y, (x - x[mask].mean(0)) / np.sqrt(x[mask].var(0) + 1e-3), rtol=1e-12)
    for kind in (np.int8, np.int64, np.float32, np.float64):
        m2, v2 = bn_cy.moments(x, mask=mask.astype(kind))
        np.testing.assert_array_equal(m2, mean)
        np.testing.assert_array_equal(v2, var)


def test_integer_weights_equal_repetition(rng):
    """Weight k counts a position k times."""
    x = rng.standard_normal((12, 4))
    w = rng.integers(0, 4, 12)
    w[0] = 1
    mean, var = bn_cy.moments(x, mask=w)
    rep = np.repeat(x, w, axis=0)
    np.testing.assert_allclose(mean, rep.mean(0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(var, rep.var(0), rtol=1e-12)


@pytest.mark.parametrize("scale", [2.0**-100, 2.0**100, 1e-60, 1e60])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_mask_weights_are_scale_invariant(rng, dtype, scale):
    """Statistics depend on the weights only through w / W: any finite positive scale is valid."""
    x = (rng.standard_normal((200, 3)) + 1).astype(dtype)
    w = rng.choice([0.0, 0.5, 1.0, 2.0, 3.5], 200)
    w[0] = 1.0
    m0, v0 = bn_cy.moments(x, mask=w)
    m1, v1 = bn_cy.moments(x, mask=w * scale)
    rtol = 1e-6 if dtype == F32 else 1e-13
    np.testing.assert_allclose(m1, m0, rtol=rtol)
    np.testing.assert_allclose(v1, v0, rtol=rtol)
    y0, _, _ = bn_cy.batch_norm_train(x, mask=w)
    y1, _, _ = bn_cy.batch_norm_train(x, mask=w * scale)
    np.testing.assert_allclose(y1, y0, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("dtype", dtype_params())
def test_all_zero_mask_gives_nan(rng, dtype):
    x = random_values(rng, (10, 3), dtype)
    mask = np.zeros(10, bool)
    mean, var = bn_cy.moments(x, mask=mask)
    assert np.isnan(mean).all() and np.isnan(var).all()
    y, tm, tv = bn_cy.batch_norm_train(x, mask=mask)
    assert np.isnan(as_f64(y)).all() and np.isnan(tm).all() and np.isnan(tv).all()
    dy = random_values(rng, (10, 3), dtype)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, tm, tv, mask=mask)
    assert np.isnan(as_f64(dx)).all()
    ref = ref_batch_norm_backward(dy, x, tm, tv, None, -1, 1e-3, mask, True)
    check_backward((dx, dg, db), dy, x, tm, tv, None, -1, 1e-3, mask, True, ref, output_dtype(dtype))


def test_mask_for_rank1_is_scalar(rng):
    x = rng.standard_normal(5)
    mean, var = bn_cy.moments(x, axis=0, mask=np.array(True))
    np.testing.assert_array_equal(mean, x)
    np.testing.assert_array_equal(var, np.zeros(5))
    mean, var = bn_cy.moments(x, axis=0, mask=np.array(0.0))
    assert np.isnan(mean).all() and np.isnan(var).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_layouts(rng, layout):
    x = rng.standard_normal((5, 6, 7))
    mask = apply_layout(make_mask(rng, (5, 7), "weights64"), layout, rng)
    before = snapshot(mask)
    mean, var = bn_cy.moments(x, axis=1, mask=mask)
    check_stats(mean, var, x, 1, mask)
    assert_unchanged(before, [mask])


# ------------------------------------------------------------------------------------------
# out=


def _call(op, x, out=None):
    """Run one op with fixed extra arguments; returns (the array out= receives, the rest)."""
    c = x.shape[-1]
    gamma = np.linspace(0.5, 1.5, c)
    beta = np.linspace(-1.0, 1.0, c)
    if op == "batch_norm":
        return bn_cy.batch_norm(x, np.full(c, 0.25), np.full(c, 2.0), gamma, beta, out=out), ()
    if op == "batch_norm_train":
        y, m, v = bn_cy.batch_norm_train(x, gamma, beta, out=out)
        return y, (m, v)
    dy = np.cos(np.arange(x.size)).reshape(x.shape).astype(x.dtype)
    _, m, v = bn_cy.batch_norm_train(x, gamma, beta)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, m, v, gamma, out=out)
    return dx, (dg, db)


OUT_OPS = ["batch_norm", "batch_norm_train", "batch_norm_backward"]


@pytest.mark.parametrize("order", ["C", "F", "strided"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("op", OUT_OPS)
def test_out_given(rng, op, dtype, order):
    x = random_values(rng, (9, 4, 6), dtype)
    expected_arr, expected_rest = _call(op, x)
    if order == "strided":
        out = np.zeros((18, 4, 6), dtype)[::2]
    else:
        out = np.zeros(x.shape, dtype, order=order)
    got_arr, got_rest = _call(op, x, out=out)
    assert got_arr is out
    assert_near(out, expected_arr)
    for a, b in zip(got_rest, expected_rest):
        assert_near(a, b)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_train"])
def test_out_is_x_in_place(rng, op, dtype):
    x = random_values(rng, (33, 5), dtype)
    expected_arr, _ = _call(op, x.copy())
    got_arr, _ = _call(op, x, out=x)
    assert got_arr is x
    np.testing.assert_array_equal(as_f64(x), as_f64(expected_arr))


def test_backward_out_is_dy_in_place(rng):
    x = rng.standard_normal((40, 3))
    dy = rng.standard_normal((40, 3))
    _, m, v = bn_cy.batch_norm_train(x)
    expected = bn_cy.batch_norm_backward(dy.copy(), x, m, v)
    got = bn_cy.batch_norm_backward(dy, x, m, v, out=dy)
    assert got[0] is dy
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.dtype(np.int32), np.dtype(np.bool_)], ids=["int32", "bool"])
def test_out_for_nonfloat_input_is_float32(rng, dtype):
    x = random_values(rng, (20, 3), dtype)
    out = np.empty((20, 3), np.float32)
    y, _, _ = bn_cy.batch_norm_train(x, out=out)
    assert y is out
    np.testing.assert_array_equal(out, bn_cy.batch_norm_train(x)[0])


def test_out_in_place_on_view(rng):
    """In place on a non-contiguous view; the rest of the buffer is untouched."""
    buf = rng.standard_normal((20, 8))
    orig = buf.copy()
    view = buf[::2, 1::2]
    expected, _, _ = bn_cy.batch_norm_train(view)
    y, _, _ = bn_cy.batch_norm_train(view, out=view)
    assert y is view
    assert_near(view, expected)
    untouched = np.ones(buf.shape, bool)
    untouched[::2, 1::2] = False
    np.testing.assert_array_equal(buf[untouched], orig[untouched])


# ------------------------------------------------------------------------------------------
# gamma / beta / parameters


@pytest.mark.parametrize("dtype", dtype_params())
def test_gamma_beta_none(rng, dtype):
    x = random_values(rng, (25, 4), dtype, offset=1.0)
    y, m, v = bn_cy.batch_norm_train(x)
    rm, rv = ref_moments(x, -1)
    check_y(y, x, rm, rv, None, None, -1, 1e-3, ref_batch_norm(x, rm, rv), output_dtype(dtype))
    y1, _, _ = bn_cy.batch_norm_train(x, np.ones(4), np.zeros(4))
    tol = rel_tol(output_dtype(dtype))
    np.testing.assert_allclose(as_f64(y), as_f64(y1), rtol=tol, atol=tol)

    yi = bn_cy.batch_norm(x, m, v)
    check_y(yi, x, m, v, None, None, -1, 1e-3, ref_batch_norm(x, m, v), output_dtype(dtype))

    dy = random_values(rng, x.shape, dtype)
    res = bn_cy.batch_norm_backward(dy, x, m, v)
    ref = ref_batch_norm_backward(dy, x, m, v)
    check_backward(res, dy, x, m, v, None, -1, 1e-3, None, True, ref, output_dtype(dtype))
    assert res[1].shape == (4,), "dgamma is returned even when gamma is None"


def test_parameters_are_array_likes(rng):
    x = rng.standard_normal((10, 3))
    gamma, beta = [1.0, 2.0, 0.5], (0.0, -1, 3)
    y, m, v = bn_cy.batch_norm_train(x, gamma, beta)
    y2, _, _ = bn_cy.batch_norm_train(x, np.array(gamma), np.array(beta, float))
    np.testing.assert_array_equal(y, y2)
    yi = bn_cy.batch_norm(x, list(m), tuple(v), gamma, beta)
    np.testing.assert_array_equal(yi, bn_cy.batch_norm(x, m, v, np.array(gamma), np.array(beta, float)))
    # float32 and float16 parameter arrays are accepted for float64 data
    y3 = bn_cy.batch_norm(x, m.astype(np.float32), v.astype(np.float32), np.float16(gamma))
    np.testing.assert_allclose(y3, ref_batch_norm(x, m.astype(np.float32), v.astype(np.float32), gamma),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-3, 0.5])
def test_epsilon(rng, eps):
    x = rng.standard_normal((30, 4)) * 3
    y, m, v = bn_cy.batch_norm_train(x, epsilon=eps)
    np.testing.assert_allclose(y, ref_batch_norm_train(x, eps=eps)[0], rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    res = bn_cy.batch_norm_backward(dy, x, m, v, epsilon=eps)
    ref = ref_batch_norm_backward(dy, x, m, v, eps=eps)
    check_backward(res, dy, x, m, v, None, -1, eps, None, True, ref, F64)


# ------------------------------------------------------------------------------------------
# backward by finite differences (float64)


def _fd_grad(f, a, h=1e-6):
    """Central differences of the scalar f with respect to every element of a (in place)."""
    g = np.zeros(a.shape)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


FD_CASES = [((6, 3), -1, None), ((3, 4, 2), 1, None), ((3, 4, 2), 1, "weights"), ((5, 2, 3), 0, "bool")]


@pytest.mark.parametrize("shape,axis,mask_kind", FD_CASES)
def test_backward_training_finite_differences(rng, shape, axis, mask_kind):
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    c = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    mask = None
    if mask_kind is not None:
        mask = make_mask(rng, mask_shape(shape, axis), "bool" if mask_kind == "bool" else "weights64")

    def loss():
        y, _, _ = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=1e-3, mask=mask)
        return float(np.sum(dy * y))

    _, m, v = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=1e-3, mask=mask)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, m, v, gamma, axis=axis, epsilon=1e-3, mask=mask)
    for name, got, param in (("dx", dx, x), ("dgamma", dg, gamma), ("dbeta", db, beta)):
        num = _fd_grad(loss, param)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-6 * np.abs(num).max(), err_msg=name)


@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((3, 4, 2), 1), ((2, 3, 4), -3)])
def test_backward_inference_finite_differences(rng, shape, axis):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    c = shape[axis]
    mean, var = rng.standard_normal(c), rng.uniform(0.3, 2, c)
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)

    def loss():
        return float(np.sum(dy * bn_cy.batch_norm(x, mean, var, gamma, beta, axis=axis)))

    dx, dg, db = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, training=False)
    for name, got, param in (("dx", dx, x), ("dgamma", dg, gamma), ("dbeta", db, beta)):
        num = _fd_grad(loss, param)
        np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-6 * np.abs(num).max(), err_msg=name)


# ------------------------------------------------------------------------------------------
# PyTorch as a second, independent reference (float64, training mode)


@pytest.mark.parametrize("shape,axis", [((32, 7), -1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((5, 4, 3), 0)])
def test_against_torch(rng, shape, axis):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape) * 1.5 + 0.5
    dy = rng.standard_normal(shape)
    c = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    eps = 1e-3

    y, mean, var = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=eps)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, epsilon=eps)

    # torch wants (N, C, *): channel axis second
    def to_t(a):
        return torch.tensor(np.ascontiguousarray(np.moveaxis(a, axis, 1)))

    xt = to_t(x).requires_grad_(True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    out, save_mean, save_invstd = torch.native_batch_norm(xt, gt, bt, None, None, True, 0.1, eps)
    (out * to_t(dy)).sum().backward()
    back = (lambda t: np.moveaxis(t.detach().numpy(), 1, axis))
    np.testing.assert_allclose(y, back(out), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(mean, save_mean.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(var, 1 / save_invstd.detach().numpy() ** 2 - eps, rtol=1e-10)
    np.testing.assert_allclose(dx, back(xt.grad), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-11)


# ------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", [((5, 0), -1), ((0,), 0), ((2, 0, 3), 1), ((3, 3, 0), -1)])
def test_zero_channels(dtype, shape, axis, strided):
    x = np.zeros(shape, dtype)
    if strided:  # an empty view that keeps the strides of a larger buffer
        x = np.zeros(tuple(2 * d + 1 for d in shape), dtype)[(slice(1, None, 2),) * len(shape)]
        assert x.shape == shape
    sdt = stats_dtype(dtype)
    mean, var = bn_cy.moments(x, axis=axis)
    assert mean.shape == (0,) and var.shape == (0,) and mean.dtype == sdt and var.dtype == sdt
    y, m, v = bn_cy.batch_norm_train(x, axis=axis, mask=np.ones(mask_shape(shape, axis), bool))
    assert y.shape == shape and y.dtype == dtype and m.shape == (0,) and v.dtype == sdt
    y = bn_cy.batch_norm(x, [], [], axis=axis)
    assert y.shape == shape and y.dtype == dtype
    dx, dg, db = bn_cy.batch_norm_backward(x, x, m, v, axis=axis)
    assert dx.shape == shape and dx.dtype == dtype and dg.shape == (0,) and db.shape == (0,)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", [((0, 3), -1), ((2, 3, 0), 1), ((0, 4, 5), 1)])
def test_zero_reduced_positions(dtype, shape, axis):
    x = np.zeros(shape, dtype)
    c = shape[axis]
    mean, var = bn_cy.moments(x, axis=axis)
    assert mean.shape == (c,) and np.isnan(mean).all() and np.isnan(var).all()
    y, m, v = bn_cy.batch_norm_train(x, axis=axis)
    assert y.shape == shape and y.dtype == dtype and np.isnan(m).all() and np.isnan(v).all()
    dx, dg, db = bn_cy.batch_norm_backward(x, x, m, v, axis=axis)
    assert dx.shape == shape and dg.shape == (c,) and db.shape == (c,)
    ref = ref_batch_norm_backward(x, x, m, v, None, axis)
    check_backward((dx, dg, db), x, x, m, v, None, axis, 1e-3, None, True, ref, dtype)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape,axis", [((40, 5), -1), ((4, 5, 6), 1)])
def test_nonfinite_x_stays_in_its_channel(rng, dtype, shape, axis, bad):
    x = random_values(rng, shape, dtype)
    clean_y, clean_m, clean_v = bn_cy.batch_norm_train(x, axis=axis)
    dirty = x.copy()
    idx = [1] * len(shape)
    idx[axis] = 2
    dirty[tuple(idx)] = bad
    y, m, v = bn_cy.batch_norm_train(dirty, axis=axis)
    others = np.arange(shape[axis]) != 2
    assert_near(m[others], clean_m[others])
    assert_near(v[others], clean_v[others])
    assert_near(np.compress(others, y, axis), np.compress(others, clean_y, axis))
    assert not np.isfinite(m[2]) or not np.isfinite(v[2])
    assert not np.isfinite(np.take(as_f64(y), 2, axis)).any()

    mm, vv = bn_cy.moments(dirty, axis=axis)
    assert_near(mm, m)
    assert_near(vv, v)

    dy = random_values(rng, shape, dtype)
    clean = bn_cy.batch_norm_backward(dy, x, clean_m, clean_v, axis=axis)
    got = bn_cy.batch_norm_backward(dy, dirty, m, v, axis=axis)
    assert_near(np.compress(others, got[0], axis), np.compress(others, clean[0], axis))
    assert_near(got[1][others], clean[1][others])
    assert_near(got[2], clean[2])  # dbeta only depends on dy


@pytest.mark.parametrize("param", ["mean", "variance", "gamma", "beta"])
def test_nonfinite_parameter_stays_in_its_channel(rng, param):
    x = rng.standard_normal((30, 4)).astype(np.float32)
    p = dict(mean=np.zeros(4), variance=np.ones(4), gamma=np.ones(4), beta=np.zeros(4))
    clean = bn_cy.batch_norm(x, p["mean"], p["variance"], p["gamma"], p["beta"])
    p[param] = p[param].copy()
    p[param][1] = np.nan
    y = bn_cy.batch_norm(x, p["mean"], p["variance"], p["gamma"], p["beta"])
    assert np.isnan(y[:, 1]).all()
    assert_near(y[:, [0, 2, 3]], clean[:, [0, 2, 3]])


def test_nonfinite_dy_stays_in_its_channel(rng):
    x = rng.standard_normal((30, 4))
    dy = rng.standard_normal((30, 4))
    _, m, v = bn_cy.batch_norm_train(x)
    clean = bn_cy.batch_norm_backward(dy, x, m, v)
    dy[3, 0] = np.nan
    got = bn_cy.batch_norm_backward(dy, x, m, v)
    assert np.isnan(got[0][:, 0]).all() and np.isnan(got[1][0]) and np.isnan(got[2][0])
    for a, b in zip(got, clean):
        assert_near(a[..., 1:], b[..., 1:])


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("value", [0.0, 0.1, -3.7, 1e4, 12345.678])
@pytest.mark.parametrize("shape,axis", [((1000, 3), -1), ((3, 3, 50), 1), ((7, 3), 1)])
def test_constant_channel_gives_exactly_beta(dtype, value, shape, axis):
    x = np.full(shape, value).astype(dtype)
    beta = np.array([0.5, -2.0, 3.25])
    gamma = np.array([1.5, 2.0, -0.75])
    y, m, v = bn_cy.batch_norm_train(x, gamma, beta, axis=axis)
    expected = np.broadcast_to(beta.astype(dtype).reshape([-1 if i == axis % len(shape) else 1
                                                           for i in range(len(shape))]), shape)
    assert np.array_equal(as_f64(y), as_f64(expected)), (value, np.unique(as_f64(y)))
    assert np.array_equal(v, np.zeros(3))
    assert np.array_equal(m, np.full(3, as_f64(x.reshape(-1)[:1])[0]).astype(m.dtype))
    y0, _, _ = bn_cy.batch_norm_train(x, axis=axis)
    assert np.array_equal(as_f64(y0), np.zeros(shape))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((6, 5, 4), 1), ((6, 5, 4), -1), ((6, 5, 4), 0), ((3, 4, 5, 6), 2)])
def test_layouts(rng, layout, dtype, shape, axis):
    x = apply_layout(random_values(rng, shape, dtype, offset=1.0), layout, rng)
    dy = apply_layout(random_values(rng, shape, dtype), layout, rng)
    gamma, beta = channel_params(rng, shape[axis])
    before = snapshot(x, dy)
    y, m, v = bn_cy.batch_norm_train(x, gamma, beta, axis=axis)
    check_stats(m, v, x, axis)
    rm, rv = ref_moments(x, axis)
    check_y(y, x, rm, rv, gamma, beta, axis, 1e-3, ref_batch_norm(x, rm, rv, gamma, beta, axis), dtype)
    # a C-contiguous copy gives the same results (up to rounding)
    y_c, m_c, v_c = bn_cy.batch_norm_train(np.ascontiguousarray(x), gamma, beta, axis=axis)
    np.testing.assert_allclose(m, m_c, rtol=1e-6 if dtype == F32 else 1e-13, atol=1e-7)
    yi = bn_cy.batch_norm(x, m, v, gamma, beta, axis=axis)
    check_y(yi, x, m, v, gamma, beta, axis, 1e-3, ref_batch_norm(x, m, v, gamma, beta, axis), dtype)
    res = bn_cy.batch_norm_backward(dy, x, m, v, gamma, axis=axis)
    ref = ref_batch_norm_backward(dy, x, m, v, gamma, axis)
    check_backward(res, dy, x, m, v, gamma, axis, 1e-3, None, True, ref, dtype)
    assert_unchanged(before, [x, dy])


@pytest.mark.slow
def test_huge_broadcast_view_moments_exact():
    """2**31 + 8 rows through a zero-stride view: 64-bit indexing, exact mean, zero variance."""
    v = np.array([0.1, -12345.5], np.float32)
    x = np.broadcast_to(v, (2**31 + 8, 2))
    mean, var = bn_cy.moments(x, axis=-1)
    assert mean.dtype == np.float32
    np.testing.assert_array_equal(mean, v)
    np.testing.assert_array_equal(var, np.zeros(2, np.float32))


# ------------------------------------------------------------------------------------------
# threads calling in: results bitwise equal to a serial run; the GIL is released


def test_concurrent_python_threads_bitwise(rng):
    arrays = [rng.standard_normal((257, 512)).astype(np.float32) * (i + 1) + i for i in range(4)]
    masks = [rng.random(257) < 0.7 for _ in range(4)]
    serial = [bn_cy.batch_norm_train(a, mask=m) for a, m in zip(arrays, masks)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            results = list(pool.map(lambda am: bn_cy.batch_norm_train(am[0], mask=am[1]),
                                    zip(arrays, masks)))
            for got, exp in zip(results, serial):
                for a, b in zip(got, exp):
                    np.testing.assert_array_equal(a, b)


def _slow_moments_input():
    """An input whose moments take a while on one thread (>= 0.3 s if possible)."""
    best = None
    candidates = [np.broadcast_to(np.array([1.0, 2.0], np.float32), (2**k, 2)) for k in (24, 26, 28, 30)]
    candidates.append(np.ones((2**24, 4), np.float32))  # in case zero-stride runs become O(1)
    for x in candidates:
        t0 = time.perf_counter()
        bn_cy.moments(x, n_threads=1)
        duration = time.perf_counter() - t0
        if best is None or duration > best[1]:
            best = (x, duration)
        if duration > 0.3:
            break
    return best


def test_kernels_release_the_gil():
    """While one thread runs a long kernel, another Python thread keeps running."""
    x, duration = _slow_moments_input()
    assert duration > 0.02, "no input slow enough to observe the GIL"
    gaps, done = [], threading.Event()

    def worker():
        bn_cy.moments(x, n_threads=1)
        done.set()

    th = threading.Thread(target=worker)
    last = time.perf_counter()
    th.start()
    while not done.is_set():
        sum(range(200))
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    th.join()
    assert max(gaps) < duration / 2, (max(gaps), duration)


# ------------------------------------------------------------------------------------------
# memory details: overlapping out=, non-native byte order


@pytest.mark.parametrize("shift", [1, -1])
@pytest.mark.parametrize("op", OUT_OPS)
def test_out_partially_overlapping_x(rng, op, shift):
    """out= sharing memory with x at an offset still gives the out-of-place result."""
    buf = rng.standard_normal((41, 3))
    x = buf[:-1] if shift == 1 else buf[1:]
    out = buf[1:] if shift == 1 else buf[:-1]
    expected, _ = _call(op, x.copy())
    got, _ = _call(op, x, out=out)
    assert got is out
    assert_near(out, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["float32", "float64", "float16"])
def test_byteswapped_inputs(rng, dtype):
    """Non-native byte order is the same data: results equal those of the native array."""
    native = random_values(rng, (30, 4), dtype)
    swapped = native.astype(native.dtype.newbyteorder())
    dy = random_values(rng, (30, 4), dtype)
    dy_swapped = dy.astype(dy.dtype.newbyteorder())
    gamma = np.linspace(0.5, 2.0, 4)
    mask = rng.random(30) < 0.8

    exp = bn_cy.batch_norm_train(native, gamma, mask=mask)
    got = bn_cy.batch_norm_train(swapped, gamma.astype(">f8"), mask=mask.astype(">i4"))
    for a, b in zip(got, exp):
        assert a.dtype.newbyteorder("=") == b.dtype
        np.testing.assert_array_equal(a, b)
    m, v = exp[1], exp[2]
    np.testing.assert_array_equal(bn_cy.moments(swapped)[0], bn_cy.moments(native)[0])
    np.testing.assert_array_equal(bn_cy.batch_norm(swapped, m, v), bn_cy.batch_norm(native, m, v))
    for a, b in zip(bn_cy.batch_norm_backward(dy_swapped, swapped, m, v),
                    bn_cy.batch_norm_backward(dy, native, m, v)):
        np.testing.assert_array_equal(a, b)
