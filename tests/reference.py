"""Float64 NumPy oracle for bn_cy's functional operations.

Written from the API contract only, independently of the C kernels: plain NumPy, everything in
float64 computed from the input *values*, two-pass statistics. Every array is moved to the
canonical "rows" view (positions, C) with the feature axis last; weights (the mask) are one column
shared by all channels.

Sums run along the last axis of a C-contiguous (C, n) array, so NumPy uses pairwise summation,
and the mean gets one correction pass (m += sum(w*(x-m))/W). That keeps the oracle's own error
far below every tolerance the tests use, including the float64 accuracy test at offset 1e5.
"""

import numpy as np

try:  # optional: bfloat16 support
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None
    BFLOAT16 = None

FLOAT_DTYPES = tuple(
    np.dtype(d) for d in (np.float16, np.float32, np.float64, BFLOAT16) if d is not None
)


# --------------------------------------------------------------------------------------------
# dtype policy (contract: "dtypes")


def _native(dtype):
    """The dtype in native byte order (byte order is storage, not a different type)."""
    return np.dtype(dtype).newbyteorder("=")


def is_supported_dtype(dtype):
    """bool, integers and the four float types are accepted; anything else is a TypeError."""
    dtype = _native(dtype)
    return dtype.kind in "biu" or dtype in FLOAT_DTYPES


def output_dtype(dtype):
    """dtype of y / dx: floats keep theirs, bool and integers become float32."""
    dtype = _native(dtype)
    return dtype if dtype in FLOAT_DTYPES else np.dtype(np.float32)


def stats_dtype(dtype):
    """dtype of mean/variance/dgamma/dbeta: float64 for float64 input, else float32."""
    return np.dtype(np.float64) if _native(dtype) == np.float64 else np.dtype(np.float32)


def as_f64(a):
    """The float64 values bn_cy computes from (bool/integer go through float32 first)."""
    a = np.asarray(a)
    if a.dtype.kind in "biu":
        a = a.astype(np.float32)
    return a.astype(np.float64)


# --------------------------------------------------------------------------------------------
# layout helpers


def normalize_axis(axis, ndim):
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for ndim {ndim}")
    return axis % ndim


def to_cols(a, axis):
    """(C, n) C-contiguous float64 view of `a`: one row per channel, positions along the row."""
    a = as_f64(a)
    axis = normalize_axis(axis, a.ndim)
    moved = np.moveaxis(a, axis, -1)
    n = int(np.prod(moved.shape[:-1], dtype=np.int64))
    return np.ascontiguousarray(moved.reshape(n, a.shape[axis]).T)


def from_cols(cols, shape, axis):
    """Inverse of to_cols for an array of `shape`."""
    axis = normalize_axis(axis, len(shape))
    moved_shape = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    return np.moveaxis(cols.T.reshape(moved_shape), -1, axis)


def mask_shape(shape, axis):
    """Shape a mask must have: x's shape without the feature axis."""
    axis = normalize_axis(axis, len(shape))
    return tuple(shape[:axis]) + tuple(shape[axis + 1 :])


def weights(mask, n):
    """Float64 weights, shape (1, n), aligned with the columns of to_cols."""
    if mask is None:
        return np.ones((1, n))
    w = np.asarray(mask).astype(np.float64).reshape(1, -1)
    assert w.shape[1] == n
    return w


def per_channel(p, c, default):
    """A (C, 1) float64 column for a per-channel parameter (None -> default)."""
    if p is None:
        return np.full((c, 1), float(default))
    return np.asarray(p).astype(np.float64).reshape(c, 1)


# --------------------------------------------------------------------------------------------
# the four operations


def ref_moments(x, axis=-1, mask=None):
    """Weighted mean and population variance per channel (float64); NaN where W == 0."""
    cols = to_cols(x, axis)
    w = weights(mask, cols.shape[1])
    total = w.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sum(w * cols, axis=1, keepdims=True) / total
        mean = mean + np.sum(w * (cols - mean), axis=1, keepdims=True) / total
        var = np.sum(w * (cols - mean) ** 2, axis=1, keepdims=True) / total
    if not total > 0:
        mean[:] = np.nan
        var[:] = np.nan
    return mean[:, 0], var[:, 0]


def ref_batch_norm(x, mean, var, gamma=None, beta=None, axis=-1, eps=1e-3):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, float64, shape of x."""
    x = np.asarray(x)
    cols = to_cols(x, axis)
    c = cols.shape[0]
    m = per_channel(mean, c, 0.0)
    v = per_channel(var, c, 1.0)
    g = per_channel(gamma, c, 1.0)
    b = per_channel(beta, c, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        y = g * ((cols - m) / np.sqrt(v + eps)) + b
    return from_cols(y, x.shape, axis)


def ref_batch_norm_train(x, gamma=None, beta=None, axis=-1, eps=1e-3, mask=None):
    """Training forward: batch statistics of x (weighted by mask), then normalize all of x."""
    mean, var = ref_moments(x, axis, mask)
    return ref_batch_norm(x, mean, var, gamma, beta, axis, eps), mean, var


def ref_batch_norm_backward(dy, x, mean, var, gamma=None, axis=-1, eps=1e-3, mask=None,
                            training=True):
    """(dx, dgamma, dbeta) per the contract, float64.

    dbeta = sum(dy), dgamma = sum(dy * xhat) over every position (masked or not);
    training:  dx_i = g*inv*(dy_i - (w_i/W) * (sum dy + xhat_i * sum dy*xhat)), the second term
               exactly 0 where w_i = 0
    inference: dx_i = g*inv*dy_i
    """
    x = np.asarray(x)
    xc = to_cols(x, axis)
    dyc = to_cols(dy, axis)
    c, n = xc.shape
    m = per_channel(mean, c, 0.0)
    g = per_channel(gamma, c, 1.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        inv = 1.0 / np.sqrt(per_channel(var, c, 1.0) + eps)
        d = xc - m
        xhat = d * inv
        sum_dy = np.sum(dyc, axis=1, keepdims=True)
        # sum(dy * xhat): where the deviations are subnormal, xhat is too and has lost digits;
        # the sum is taken over the deviations scaled by 2**k (exact) into the normal range,
        # and scaled back once at the end (k = 0 elsewhere: the plain formula)
        big = np.max(np.abs(d), axis=1, keepdims=True, initial=0.0)
        e = np.frexp(np.where(np.isfinite(big) & (big > 0), big, 1.0))[1]
        k = np.clip(-968 - e, 0, None)
        sum_dy_xhat = np.ldexp(np.sum(dyc * (np.ldexp(d, k) * inv), axis=1, keepdims=True), -k)
        if training:
            w = weights(mask, n)
            frac = w / w.sum()
            # a masked-out position (w = 0) is not in the statistics: its term is exactly 0,
            # even where the statistics' part overflows or is NaN (0 * Inf is not the math)
            dx = g * inv * (dyc - np.where(frac > 0, frac * (sum_dy + xhat * sum_dy_xhat), 0.0))
        else:
            dx = g * inv * dyc
    return from_cols(dx, x.shape, axis), sum_dy_xhat[:, 0], sum_dy[:, 0]


# --------------------------------------------------------------------------------------------
# preconditions: which exception bn_cy must raise (None when the call is valid)


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def expected_error(x, axis=-1, params=None, mask=None, epsilon=1e-3, dy=None):
    """The exception class the contract requires for these arguments, or None.

    params: {name: value} for mean/variance/gamma/beta (None values are skipped).
    """
    x = np.asarray(x)
    if not is_supported_dtype(x.dtype):
        return TypeError
    if x.ndim == 0:
        return ValueError
    if not _is_int(axis):
        return TypeError
    if not -x.ndim <= axis < x.ndim:
        return ValueError
    c = x.shape[axis]
    for value in (params or {}).values():
        if value is not None and np.shape(value) != (c,):
            return ValueError
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != mask_shape(x.shape, axis):
            return ValueError
        if m.dtype.kind not in "biuf":
            return TypeError
        mf = m.astype(np.float64)
        if not (np.all(np.isfinite(mf)) and np.all(mf >= 0)):
            return ValueError
    eps = float(epsilon)
    if not (np.isfinite(eps) and eps >= 0):
        return ValueError
    if dy is not None and np.shape(dy) != x.shape:
        return ValueError
    return None
