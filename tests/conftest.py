"""Shared helpers for bn_cy's tests: dtypes, memory layouts, tolerances, hypothesis profiles.

The helpers are plain functions (tests import them with ``from conftest import ...``); tests/
has no ``__init__.py``, so pytest puts this directory on sys.path, as it does for ``reference``.

Hypothesis profiles: "ci" (the default; the whole ops suite stays within a few minutes on two
cores) and "long" (thousands of examples), chosen with ``BN_CY_HYPOTHESIS_PROFILE=long``.
"""

import os

import numpy as np
import pytest

from reference import BFLOAT16, FLOAT_DTYPES, as_f64, normalize_axis, ref_moments, stats_dtype

# --------------------------------------------------------------------------------------------
# hypothesis (a test dependency; without it only the property tests are unavailable)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    settings = None
if settings is not None:
    _COMMON = dict(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    settings.register_profile("ci", max_examples=300, **_COMMON)
    settings.register_profile("long", max_examples=5000, **_COMMON)
    settings.load_profile(os.environ.get("BN_CY_HYPOTHESIS_PROFILE") or "ci")

# --------------------------------------------------------------------------------------------
# dtypes

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

#: every floating dtype bn_cy supports here (bfloat16 only when ml_dtypes is importable)
DTYPES = FLOAT_DTYPES
#: bool and integer inputs are accepted and computed as float32
NONFLOAT_DTYPES = tuple(np.dtype(d) for d in (np.bool_, np.int8, np.uint8, np.int32, np.int64))


def dtype_params():
    """pytest.param list over DTYPES with readable ids."""
    return [pytest.param(d, id=d.name) for d in DTYPES]


# --------------------------------------------------------------------------------------------
# tolerances
#
# A compared value v gets an absolute tolerance built from the magnitudes that enter it, so one
# number per dtype serves every scale. REL: error relative to those magnitudes (the rounding of the
# output dtype plus float32/float64 arithmetic). The error allowed in (x - mean) has two parts:
# MEAN_REL * |mean| (float32 data must keep the mean to ~1e-10 relative, else the contract's 1e-5
# at offset 1e5 fails) and SPREAD_REL * max|x - mean| (float32-level sums of deviations are fine:
# at offset 0 they cost ~1e-7 of y against the contract's 1e-6). 16-bit data computes in float32.

REL = {F64: 1e-11, F32: 2e-6, F16: 2e-3}
MEAN_REL = {F64: 1e-13, F32: 1e-10, F16: 2.4e-7}
SPREAD_REL = {F64: 1e-13, F32: 6e-8, F16: 2.4e-7}
if BFLOAT16 is not None:
    REL[BFLOAT16] = 1.6e-2
    MEAN_REL[BFLOAT16] = 2.4e-7
    SPREAD_REL[BFLOAT16] = 2.4e-7


def rel_tol(dtype):
    dtype = np.dtype(dtype)
    return REL.get(dtype, REL[F32])


def mean_err(dtype, mean, spread):
    """Allowed error of the mean as the kernel uses it in (x - mean), per channel."""
    dtype = np.dtype(dtype)
    return (MEAN_REL.get(dtype, MEAN_REL[F32]) * np.abs(mean)
            + SPREAD_REL.get(dtype, SPREAD_REL[F32]) * spread)


def tiny(dtype):
    """Smallest normal number of an output dtype: the floor of any absolute tolerance. Below it,
    values are subnormal and every rounding costs a fixed absolute amount, so results that
    differ only in the order of operations can differ by many subnormal steps there."""
    dtype = np.dtype(dtype)
    if dtype == BFLOAT16:
        return float(np.finfo(np.float32).tiny)
    return float(np.finfo(dtype).tiny)


def _bcast(col, ndim, axis):
    """Per-channel vector -> shape broadcastable against an ndim array with channels on axis."""
    shape = [1] * ndim
    shape[normalize_axis(axis, ndim)] = -1
    return np.asarray(col, dtype=np.float64).reshape(shape)


def _param(p, c, default):
    return np.full(c, float(default)) if p is None else as_f64(p).reshape(c)


def _spread(x64, mean, axis):
    """Per channel max |x - mean| over all positions (0 where there are none; NaN ignored)."""
    c = x64.shape[axis]
    d = np.abs(x64 - _bcast(mean, x64.ndim, axis))
    d = np.where(np.isfinite(d), d, 0.0)
    n = d.size // c if c else 0
    moved = np.moveaxis(d, axis, -1).reshape(n, c)
    return moved.max(axis=0) if n else np.zeros(c)


def assert_close(got, ref, atol, what="value"):
    """|got - ref| <= atol elementwise; NaN and +-Inf must sit at the same places."""
    got64 = as_f64(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got64.shape == ref.shape, f"{what}: shape {got64.shape} != {ref.shape}"
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), ref.shape)
    nan_got, nan_ref = np.isnan(got64), np.isnan(ref)
    if not np.array_equal(nan_got, nan_ref):
        idx = np.argwhere(nan_got != nan_ref)[:5].tolist()
        raise AssertionError(f"{what}: NaN positions differ at {idx} "
                             f"(got {got64[nan_got != nan_ref][:5]}, ref {ref[nan_got != nan_ref][:5]})")
    inf = np.isinf(ref) | np.isinf(got64)
    if not np.array_equal(got64[inf], ref[inf]):
        raise AssertionError(f"{what}: Inf mismatch: got {got64[inf][:5]}, ref {ref[inf][:5]}")
    fin = ~(nan_ref | inf)
    err = np.abs(got64 - ref)
    bad = fin & (got64 != ref) & ~(err <= atol)  # an exact result passes even a NaN bound
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.size} elements out of tolerance; first at {i}: "
            f"got {got64[i]!r}, ref {ref[i]!r}, err {err[i]:.3g} > atol {atol[i]:.3g}; "
            f"max err/atol {np.max(err[fin] / np.maximum(atol[fin], 1e-300)):.3g}"
        )


def check_stats(mean, var, x, axis, mask=None, ref=None):
    """mean/variance (as returned by bn_cy) against the oracle: dtype, shape, values."""
    x = np.asarray(x)
    c = x.shape[axis]
    sdt = stats_dtype(x.dtype)
    for name, v in (("mean", mean), ("variance", var)):
        assert isinstance(v, np.ndarray), f"{name} is {type(v)}"
        assert v.dtype == sdt, f"{name} dtype {v.dtype}, expected {sdt}"
        assert v.shape == (c,), f"{name} shape {v.shape}, expected {(c,)}"
    rm, rv = ref_moments(x, axis, mask) if ref is None else ref
    spread = _spread(as_f64(x), np.nan_to_num(rm), axis)
    if sdt == F64:
        rt, ct, ct2 = 1e-13, 1e-13, 1e-13
    else:
        rt, ct, ct2 = 2.4e-7, 1e-6, 1e-10
    am = np.abs(np.nan_to_num(rm))
    assert_close(mean, rm, rt * am + ct * spread + tiny(sdt), "mean")
    assert_close(var, rv, rt * np.abs(np.nan_to_num(rv)) + ct * spread**2 + ct2 * am * spread
                 + tiny(sdt), "variance")
    fv = as_f64(var)
    assert not np.any(fv < 0), f"negative variance {fv[fv < 0]}"


def y_atol(x, mean, var, gamma, beta, axis, eps, y_ref, out_dtype):
    """Elementwise tolerance for y = gamma*(x-mean)/sqrt(var+eps)+beta in `out_dtype`."""
    x64 = as_f64(x)
    c = x64.shape[axis]
    m = np.nan_to_num(_param(mean, c, 0.0))
    g = np.abs(np.nan_to_num(_param(gamma, c, 1.0)))
    b = np.abs(np.nan_to_num(_param(beta, c, 0.0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.nan_to_num(1.0 / np.sqrt(_param(var, c, 1.0) + eps), posinf=0.0)
    spread = _spread(x64, m, axis)
    per_chan = _bcast(rel_tol(out_dtype) * b + g * inv * mean_err(out_dtype, m, spread), x64.ndim, axis)
    return rel_tol(out_dtype) * np.abs(np.nan_to_num(y_ref)) + per_chan + tiny(out_dtype)


def overflow_bound(dtype):
    """The magnitude from which a real number rounds to +-Inf in `dtype` (round to nearest):
    its largest finite value plus half a step there."""
    dtype = np.dtype(dtype)
    if dtype == BFLOAT16:
        import ml_dtypes

        info = ml_dtypes.finfo(dtype)
    else:
        info = np.finfo(dtype)
    big = float(info.max)
    return big + 0.5 * (big - float(np.nextafter(info.max, info.dtype.type(0))))


def as_rounded(got, ref, atol, dtype):
    """The exact reference `ref` as `dtype` can hold it: where it lies beyond the overflow bound
    by more than its tolerance, the correctly rounded result is +-Inf; within the tolerance of
    the bound, a result rounded either way is right (+-Inf of ref's sign, or finite and within
    atol of ref)."""
    ref = np.array(ref, dtype=np.float64)
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), ref.shape)
    bound = overflow_bound(dtype)
    fin = np.isfinite(ref)
    over = fin & (np.abs(ref) - atol >= bound)
    near = fin & ~over & (np.abs(ref) + atol >= bound)
    got64 = as_f64(got)
    ref[over] = np.sign(ref[over]) * np.inf
    took_inf = near & np.isinf(got64) & (np.sign(got64) == np.sign(ref))
    ref[took_inf] = got64[took_inf]
    return ref


def check_y(y, x, mean, var, gamma, beta, axis, eps, y_ref, out_dtype):
    assert isinstance(y, np.ndarray)
    assert y.dtype == out_dtype, f"y dtype {y.dtype}, expected {out_dtype}"
    assert y.shape == np.shape(x), f"y shape {y.shape}, expected {np.shape(x)}"
    atol = y_atol(x, mean, var, gamma, beta, axis, eps, y_ref, out_dtype)
    assert_close(y, as_rounded(y, y_ref, atol, out_dtype), atol, "y")


def check_backward(result, dy, x, mean, var, gamma, axis, eps, mask, training, ref, out_dtype):
    """(dx, dgamma, dbeta) from bn_cy against the oracle's `ref` triple."""
    dx, dgamma, dbeta = result
    rdx, rdg, rdb = ref
    x64, dy64 = as_f64(x), as_f64(dy)
    c = x64.shape[axis]
    sdt = stats_dtype(out_dtype)
    assert dx.dtype == out_dtype and dx.shape == x64.shape, (dx.dtype, dx.shape)
    for name, v in (("dgamma", dgamma), ("dbeta", dbeta)):
        assert isinstance(v, np.ndarray) and v.dtype == sdt and v.shape == (c,), \
            (name, type(v), getattr(v, "dtype", None), getattr(v, "shape", None))

    m = np.nan_to_num(_param(mean, c, 0.0))
    g = np.abs(np.nan_to_num(_param(gamma, c, 1.0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.nan_to_num(1.0 / np.sqrt(_param(var, c, 1.0) + eps), posinf=0.0)
    spread = _spread(x64, m, axis)
    xhat_err = inv * mean_err(out_dtype, m, spread)
    axhat = np.abs(np.nan_to_num((x64 - _bcast(m, x64.ndim, axis)) * _bcast(inv, x64.ndim, axis)))
    axhat = axhat + _bcast(xhat_err, x64.ndim, axis)
    ady = np.abs(np.nan_to_num(dy64))
    red = tuple(i for i in range(x64.ndim) if i != normalize_axis(axis, x64.ndim))
    s_dy = ady.sum(axis=red)
    s_dyxh = (ady * axhat).sum(axis=red)

    st = rel_tol(sdt)
    assert_close(dbeta, rdb, st * s_dy + tiny(sdt), "dbeta")
    assert_close(dgamma, rdg, st * s_dyxh + tiny(sdt), "dgamma")

    bound = ady
    if training:
        if mask is None:
            w = np.ones(tuple(x64.shape[i] for i in red))
        else:
            w = np.asarray(mask).astype(np.float64)
        total = w.sum()
        frac = np.expand_dims(w / total if total > 0 else np.zeros_like(w), normalize_axis(axis, x64.ndim))
        bound = bound + frac * (_bcast(s_dy, x64.ndim, axis) + axhat * _bcast(s_dyxh, x64.ndim, axis))
    bound = bound * _bcast(g * inv, x64.ndim, axis)
    dt = rel_tol(out_dtype)
    # the reductions are float32 for 16-bit data, so their error enters dx at float32 level
    assert_close(dx, rdx, dt * np.abs(np.nan_to_num(rdx)) + max(dt, st) * bound + tiny(out_dtype), "dx")


# --------------------------------------------------------------------------------------------
# data and layouts

LAYOUTS = ("C", "F", "slice", "negstride", "transpose", "broadcast")


def random_values(rng, shape, dtype, kind="normal", offset=0.0, scale=1.0):
    """Random values of `dtype` and `shape` (C order)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        lo = 0 if dtype.kind == "u" else -5
        return rng.integers(lo, 6, size=shape).astype(dtype)
    if kind == "normal":
        v = offset + scale * rng.standard_normal(shape)
    elif kind == "ints":
        v = offset + scale * rng.integers(-2, 3, size=shape)
    elif kind == "const":
        v = np.full(shape, offset + scale * 0.75)
    else:
        raise ValueError(kind)
    return np.asarray(v).astype(dtype)


def apply_layout(a, layout, rng=None):
    """An array with the values of `a` (except "broadcast") in the given memory layout.

    C, F: contiguous copies; slice: every other element of a larger buffer; negstride: all axes
    reversed views; transpose: a transposed view of a contiguous buffer; broadcast:
    np.broadcast_to of `a` reduced to one entry along some axes (so values change: use the
    returned array).
    """
    a = np.asarray(a)
    nd = a.ndim
    if nd == 0 or layout == "C":
        return np.array(a, order="C", copy=True)
    if layout == "F":
        return np.array(a, order="F", copy=True)
    if layout == "slice":
        buf = np.zeros(tuple(2 * d + 1 for d in a.shape), dtype=a.dtype)
        view = buf[(slice(1, None, 2),) * nd]
        view[...] = a
        return view
    if layout == "negstride":
        rev = (slice(None, None, -1),) * nd
        return np.ascontiguousarray(a[rev])[rev]
    if layout == "transpose":
        perm = np.arange(nd)[::-1] if rng is None else rng.permutation(nd)
        buf = np.ascontiguousarray(np.transpose(a, perm))
        return np.transpose(buf, np.argsort(perm))
    if layout == "broadcast":
        if rng is None:
            dims = {0}
        else:
            dims = {i for i in range(nd) if rng.random() < 0.5} or {int(rng.integers(nd))}
        base = a[tuple(slice(0, 1) if i in dims else slice(None) for i in range(nd))]
        return np.broadcast_to(base, a.shape)
    raise ValueError(layout)


def run_python(code, env_changes, timeout=300):
    """Run `code` in a fresh interpreter with `env_changes` set, tests/ and the bn_cy under test
    on its path (for settings the extension reads once, at its first call). Returns the
    CompletedProcess, output captured as text."""
    import subprocess
    import sys

    import bn_cy

    env = dict(os.environ, **env_changes)
    paths = [os.path.dirname(os.path.abspath(__file__)),
             os.path.dirname(os.path.dirname(os.path.abspath(bn_cy.__file__)))]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(*arrays):
    """Copies of the arrays (None kept) for the inputs-never-modified checks."""
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after):
    """Every argument still holds exactly (bitwise) what its snapshot holds."""
    for i, (b, a) in enumerate(zip(before, after)):
        if b is None:
            assert a is None
            continue
        a = np.asarray(a)
        assert a.dtype == b.dtype and a.shape == b.shape, f"argument {i} changed dtype/shape"
        if b.dtype.kind == "O":
            same = all(p is q for p, q in zip(a.ravel(), b.ravel()))
        else:
            same = np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        assert same, f"argument {i} was modified"


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible and different per test."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_threads():
    """Return bn_cy's global thread setting to "unset" (None: follow OpenMP) after a test."""
    import bn_cy

    bn_cy.set_num_threads(None)
    yield
    bn_cy.set_num_threads(None)
