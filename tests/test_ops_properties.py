"""Property tests: random shapes, axes, layouts, dtypes, masks and parameters against the oracle.

Each example is either valid, and then bn_cy must match tests/reference.py (values within the
dtype's tolerance, exact dtypes and shapes, inputs untouched), or deliberately broken in one way,
and then the oracle's precondition check and bn_cy must agree on the exception type.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bn_cy
from conftest import (
    DTYPES,
    LAYOUTS,
    apply_layout,
    assert_unchanged,
    check_backward,
    check_stats,
    check_y,
    random_values,
    snapshot,
)
from reference import (
    expected_error,
    mask_shape,
    output_dtype,
    ref_batch_norm,
    ref_batch_norm_backward,
    ref_moments,
    stats_dtype,
)

EXTRA_DTYPES = (np.dtype(np.bool_), np.dtype(np.int16), np.dtype(np.uint8))
SMALL_DIMS = [1, 1, 2, 3, 4, 5, 6, 0]
BIG_DIMS = [33, 257, 1031, 4099]
MAX_SIZE = 40_000


class Case:
    """Everything one example needs; `error` is the corruption applied (None for a valid call)."""

    def __repr__(self):
        fields = {k: getattr(self, k) for k in ("shape", "axis", "dtype", "layout", "eps", "error")}
        return f"Case({fields})"


@st.composite
def cases(draw, op):
    c = Case()
    rank = draw(st.integers(1, 5))
    shape = [draw(st.sampled_from(SMALL_DIMS)) for _ in range(rank)]
    if draw(st.integers(0, 3)) == 0:  # sometimes one long dim, so kernels split their work
        big = draw(st.sampled_from(BIG_DIMS))
        rest = int(np.prod([d for d in shape if d])) if any(shape) else 1
        if big * rest <= MAX_SIZE:
            shape[draw(st.integers(0, rank - 1))] = big
    c.shape = tuple(shape)
    c.axis = draw(st.integers(-rank, rank - 1))
    c.dtype = draw(st.sampled_from(DTYPES + EXTRA_DTYPES))
    c.layout = draw(st.sampled_from(LAYOUTS))
    c.eps = draw(st.sampled_from([1e-3, 1e-5, 0.1, 1.0]))
    kind = draw(st.sampled_from(["normal", "normal", "ints", "const"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    ratio = draw(st.sampled_from([0.0, 1.0, -10.0, 1e3]))
    if c.dtype.itemsize == 2 and abs(ratio * scale) > 1e3:  # stay far from float16's range
        ratio = 0.0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c.rng = rng
    nchan = c.shape[c.axis]

    c.x = apply_layout(random_values(rng, c.shape, c.dtype, kind, ratio * scale, scale), c.layout, rng)
    c.gamma = draw(st.sampled_from([None, "rand"]))
    c.beta = draw(st.sampled_from([None, "rand"]))
    c.gamma = None if c.gamma is None else rng.uniform(-2, 2, nchan)
    c.beta = None if c.beta is None else rng.normal(0, 2, nchan)
    c.mask = None
    if op != "batch_norm" and draw(st.booleans()):
        mkind = draw(st.sampled_from(["bool", "int", "float"]))
        mshape = mask_shape(c.shape, c.axis)
        if mkind == "bool":
            m = rng.random(mshape) < draw(st.sampled_from([0.1, 0.5, 0.9]))
        elif mkind == "int":
            m = rng.integers(0, 3, mshape).astype(draw(st.sampled_from([np.int8, np.uint8, np.int64])))
        else:
            m = rng.choice([0.0, 0.5, 1.0, 2.0, 3.5], mshape).astype(
                draw(st.sampled_from([np.float32, np.float64])))
        c.mask = apply_layout(m, draw(st.sampled_from(LAYOUTS)), rng)
    if op == "batch_norm":
        c.mean = rng.normal(ratio * scale, scale, nchan)
        c.var = rng.uniform(0.1, 2.0, nchan) * scale**2
    c.dy = None
    if op == "backward":
        c.training = draw(st.booleans())
        c.dy = apply_layout(random_values(rng, c.shape, c.dtype), draw(st.sampled_from(LAYOUTS)), rng)
        sdt = stats_dtype(c.dtype)
        if c.training:  # the batch statistics a forward pass returns
            c.stats = tuple(s.astype(sdt) for s in ref_moments(c.x, c.axis, c.mask))
        else:  # moving statistics: constants
            c.stats = (rng.normal(ratio * scale, scale, nchan).astype(sdt),
                       (rng.uniform(0.1, 2.0, nchan) * scale**2).astype(sdt))
    c.use_out = draw(st.sampled_from([None, "C", "F"]))

    errors = [None] * 10 + ["axis", "axis_type", "x_dtype"]
    if op != "moments":
        errors += ["param", "epsilon"]
    if op != "batch_norm":
        errors += ["mask_shape", "mask_value"]
    if op == "backward":
        errors += ["dy_shape"]
    c.error = draw(st.sampled_from(errors))
    corrupt(c, draw, op)
    return c


def corrupt(c, draw, op):
    """Break one argument of the case, as chosen in c.error."""
    rank, nchan = len(c.shape), c.shape[c.axis]
    if c.error == "axis":
        c.axis = draw(st.sampled_from([rank, rank + 2, -rank - 1]))
    elif c.error == "axis_type":
        c.axis = draw(st.sampled_from([1.0, "0", None]))
    elif c.error == "param":
        wrong = c.rng.normal(size=draw(st.sampled_from([nchan + 1, max(nchan - 1, 0) if nchan else 2])))
        if op == "batch_norm":
            setattr(c, draw(st.sampled_from(["mean", "var", "gamma", "beta"])), wrong)
        elif op == "backward" and draw(st.booleans()):
            i = draw(st.integers(0, 1))
            c.stats = (wrong, c.stats[1]) if i == 0 else (c.stats[0], np.abs(wrong))
        else:
            c.gamma = wrong
    elif c.error == "epsilon":
        c.eps = draw(st.sampled_from([-1e-3, float("nan"), float("inf")]))
    elif c.error == "x_dtype":
        c.x = c.x.astype(draw(st.sampled_from([np.complex64, np.longdouble, object])))
    elif c.error == "mask_shape":
        ms = list(mask_shape(c.shape, c.axis))
        if ms and draw(st.booleans()):
            ms[draw(st.integers(0, len(ms) - 1))] += 1
        else:
            ms.append(1)
        c.mask = np.ones(ms, bool)
    elif c.error == "mask_value":
        m = np.array(np.ones(mask_shape(c.shape, c.axis)) if c.mask is None else c.mask, np.float64)
        if m.size:
            m.reshape(-1)[c.rng.integers(m.size)] = draw(st.sampled_from([-1.0, -0.5, np.nan, np.inf]))
        c.mask = m
    elif c.error == "dy_shape":
        c.dy = np.ones(c.shape + (1,), c.dy.dtype) if draw(st.booleans()) else np.ones(c.shape[:-1])


def expected(c, op):
    params = {"gamma": c.gamma, "beta": c.beta}
    if op == "batch_norm":
        params.update(mean=c.mean, variance=c.var)
    if op == "backward":
        params = {"gamma": c.gamma, "mean": c.stats[0], "variance": c.stats[1]}
    return expected_error(c.x, c.axis, params, c.mask, c.eps, c.dy)


def make_out(c):
    if c.use_out is None or c.error is not None:
        return None
    return np.zeros(c.shape, output_dtype(c.x.dtype), order=c.use_out)


def run_checked(c, op, call):
    """Call bn_cy (raising parity or values), with the inputs-unchanged check around it."""
    err = expected(c, op) if c.error is not None else None
    inputs = [c.x, c.mask, c.gamma, c.beta, c.dy]
    before = snapshot(*inputs)
    if err is not None:
        with pytest.raises(err):
            call()
        assert_unchanged(before, inputs)
        return None
    result = call()
    assert_unchanged(before, inputs)
    return result


@given(cases("moments"))
def test_moments_matches_oracle(c):
    res = run_checked(c, "moments", lambda: bn_cy.moments(c.x, c.axis, mask=c.mask))
    if res is not None:
        check_stats(res[0], res[1], c.x, c.axis, c.mask)


@given(cases("train"))
def test_batch_norm_train_matches_oracle(c):
    out = make_out(c)
    res = run_checked(c, "train", lambda: bn_cy.batch_norm_train(
        c.x, c.gamma, c.beta, axis=c.axis, epsilon=c.eps, mask=c.mask, out=out))
    if res is None:
        return
    y, mean, var = res
    if out is not None:
        assert y is out
    check_stats(mean, var, c.x, c.axis, c.mask)
    rm, rv = ref_moments(c.x, c.axis, c.mask)
    y_ref = ref_batch_norm(c.x, rm, rv, c.gamma, c.beta, c.axis, c.eps)
    check_y(y, c.x, rm, rv, c.gamma, c.beta, c.axis, c.eps, y_ref, output_dtype(c.x.dtype))


@given(cases("batch_norm"))
def test_batch_norm_matches_oracle(c):
    out = make_out(c)
    res = run_checked(c, "batch_norm", lambda: bn_cy.batch_norm(
        c.x, c.mean, c.var, c.gamma, c.beta, axis=c.axis, epsilon=c.eps, out=out))
    if res is None:
        return
    if out is not None:
        assert res is out
    y_ref = ref_batch_norm(c.x, c.mean, c.var, c.gamma, c.beta, c.axis, c.eps)
    check_y(res, c.x, c.mean, c.var, c.gamma, c.beta, c.axis, c.eps, y_ref, output_dtype(c.x.dtype))


@given(cases("backward"))
def test_backward_matches_oracle(c):
    mean, var = c.stats
    out = make_out(c)
    res = run_checked(c, "backward", lambda: bn_cy.batch_norm_backward(
        c.dy, c.x, mean, var, c.gamma, axis=c.axis, epsilon=c.eps, mask=c.mask,
        training=c.training, out=out))
    if res is None:
        return
    if out is not None:
        assert res[0] is out
    ref = ref_batch_norm_backward(c.dy, c.x, mean, var, c.gamma, c.axis, c.eps, c.mask, c.training)
    check_backward(res, c.dy, c.x, mean, var, c.gamma, c.axis, c.eps, c.mask, c.training, ref,
                   output_dtype(c.x.dtype))
