"""Functional batch-normalization operations over NumPy arrays.

This module validates arguments, applies the dtype policy and resolves the thread count; the
arithmetic happens in the C kernels behind :mod:`bn_cy._kernels`, which only this module calls.

Conventions shared by every operation:

* ``axis`` is the feature axis that is *kept* (as in ``keras.layers.BatchNormalization``);
  statistics reduce over every other axis. Any rank >= 1, negative axes allowed.
* float32, float64, float16 and bfloat16 (``ml_dtypes``) inputs keep their dtype; 16-bit data are
  computed in float32 and rounded once. bool and integer inputs are converted to float32.
  Statistics and parameter gradients come back as float32 for 16/32-bit inputs, float64 for float64.
* ``mask`` has the shape of ``x`` without the feature axis; its values are non-negative weights
  (bool counts as 0/1). Masked-out positions do not enter the statistics, but are normalized.
* ``n_threads``: None uses :func:`get_num_threads`; a negative value counts back from the number
  of cores (-1 = all). Results are bitwise identical for every thread count.
"""

import math
import operator
import os
import platform
import threading

import numpy as np

from . import _kernels

__all__ = [
    "moments",
    "batch_norm",
    "batch_norm_train",
    "batch_norm_backward",
    "set_num_threads",
    "get_num_threads",
    "openmp_enabled",
    "build_info",
]

# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------

# An empty OMP_NUM_THREADS counts as unset. GNU libgomp ignores it, but LLVM's libomp aborts the
# process when it initializes; drop it before the first OpenMP call can read it.
if os.environ.get("OMP_NUM_THREADS") is not None and not os.environ["OMP_NUM_THREADS"].strip():
    del os.environ["OMP_NUM_THREADS"]

_thread_lock = threading.Lock()


def _core_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# GNU libgomp cannot run a parallel region in a child forked after the parent ran one (the
# child waits forever for the parent's pool threads, which do not exist there). So a forked
# child of a process that used threads computes serially: same results, no hang. The state
# (the set_num_threads value, whether threads ran, whether this is such a child) is kept by
# the extension, which resolves n_threads=None of the common calls itself.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_kernels.after_fork_in_child)


def _default_threads():
    # set_num_threads' value, else OpenMP's (OMP_NUM_THREADS, threadpoolctl's limit), else 1
    return _kernels.default_threads()


_MAX_THREADS = 2**31 - 1  # OpenMP counts threads in a C int


def _resolve_threads(n_threads, name="n_threads"):
    if n_threads is None:
        return _default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise TypeError("%s must be an int or None, got %s" % (name, type(n_threads).__name__))
    n = int(n_threads)
    if n == 0:
        raise ValueError("%s must be a positive or negative int, not 0" % name)
    if n > _MAX_THREADS:
        raise ValueError("%s must be at most %d, got %d" % (name, _MAX_THREADS, n))
    if n < 0:
        n = max(1, _core_count() + 1 + n)
    return n


def _threads_for_call(n_threads):
    """The thread count of one kernel call (1 in a forked child, see above)."""
    if n_threads is None:
        return _kernels.default_call_threads()
    return _kernels.call_threads(_resolve_threads(n_threads))  # validated even in a child


def set_num_threads(n):
    """Set the default thread count of every bn_cy call; return the previous setting.

    ``n=None`` returns to the default (OpenMP's: ``OMP_NUM_THREADS`` or the core count, and
    whatever ``threadpoolctl`` imposes). Negative values count back from the core count.
    """
    value = None if n is None else _resolve_threads(n, "n")
    with _thread_lock:
        previous = get_num_threads()
        _kernels.set_default_threads(0 if value is None else value)
    return previous


def get_num_threads():
    """The thread count a call with ``n_threads=None`` uses now."""
    return _default_threads()


def openmp_enabled():
    """True when the compiled kernels were built with OpenMP (else they run serially)."""
    return _kernels.openmp_enabled()


def build_info():
    """Facts about this build and the machine, as a dict."""
    from . import __version__

    return {
        "version": __version__,
        "compiler": _kernels.compiler(),
        "openmp": _kernels.openmp_enabled(),
        "simd": _kernels.simd_level(),
        "simd_compiled": _kernels.simd_compiled(),
        # one last-level cache as the CPU describes it (0: unknown); the kernels' choice of
        # streaming stores depends on it
        "last_level_cache_bytes": _kernels.llc_bytes(),
        # BN_CY_STREAM_MIN_BYTES as the kernels read it: the output size from which they
        # stream, or None (unset or not a number >= 0: the rule from the cache size applies)
        "stream_min_bytes": _kernels.stream_min_bytes(),
        "num_threads": get_num_threads(),
        "cores": _core_count(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_KERNEL_TYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def _is_bfloat16(dtype):
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def _array_like(v, name):
    """np.asarray(v), with an error naming the argument when v is not array-like (for example a
    ragged nested list)."""
    try:
        return np.asarray(v)
    except (TypeError, ValueError) as exc:
        raise TypeError("%s must be array-like: %s" % (name, exc)) from None


def _as_data(x, name):
    """`x` as an ndarray the kernels accept (maybe converted), and whether it is new."""
    if not isinstance(x, np.ndarray):
        x = _array_like(x, name)
    dt = x.dtype
    if not dt.isnative and dt.kind == "f":
        dt = dt.newbyteorder("=")
        x = x.astype(dt)  # byte-swapped data: one converted copy
    if dt in _KERNEL_TYPES or _is_bfloat16(dt):
        return x
    if dt.kind in "biu":
        return x.astype(np.float32)
    if dt.kind == "f":  # e.g. longdouble: no kernel computes in it
        raise TypeError(
            "%s has dtype %s; bn_cy computes in float16, bfloat16, float32 or float64" % (name, dt)
        )
    raise TypeError(
        "%s must be a real floating, integer or bool array, got dtype %s" % (name, dt)
    )


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _compute_dtype(dt):
    return _F64 if dt.type is np.float64 else _F32


def _check_axis(axis, ndim, name="axis"):
    if ndim == 0:
        raise ValueError("x must have at least one dimension (got a 0-d array)")
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError("%s must be an int, got %s" % (name, type(axis).__name__)) from None
    if isinstance(axis, bool):
        raise TypeError("%s must be an int, got bool" % name)
    if not -ndim <= a < ndim:
        raise ValueError("%s=%d is out of range for an input of rank %d" % (name, a, ndim))
    return a % ndim


def _check_epsilon(epsilon):
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise TypeError("epsilon must be a real number, got %r" % (epsilon,)) from None
    if not math.isfinite(eps) or eps < 0:
        raise ValueError("epsilon must be finite and >= 0, got %r" % (epsilon,))
    return eps


def _channel_vector(v, channels, name):
    """A per-channel parameter as a vector of length `channels` the kernels read: a float32 or
    float64 ndarray as it is (the kernels read float32 as float64 exactly), anything else as a
    contiguous float64 copy."""
    if v is None:
        return None
    if type(v) is np.ndarray and (v.dtype is _F64 or v.dtype is _F32) and v.shape == (channels,):
        return v  # the common case, without a copy
    a = _array_like(v, name)
    if a.dtype.kind not in "biuf" and not _is_bfloat16(a.dtype):
        raise TypeError("%s must be a real numeric array, got dtype %s" % (name, a.dtype))
    if a.shape != (channels,):
        raise ValueError(
            "%s must have shape (%d,) to match x.shape[axis], got shape %s"
            % (name, channels, a.shape)
        )
    return np.ascontiguousarray(a, dtype=np.float64)


def _mask_weights(mask, x, axis, cdtype, rescale=True):
    """The mask as weights of the compute dtype, shaped like x without the feature axis."""
    if mask is None:
        return None
    m = _array_like(mask, "mask")
    expected = x.shape[:axis] + x.shape[axis + 1:]
    if m.shape != expected:
        raise ValueError(
            "mask must have shape %s (x.shape without the feature axis %d), got %s"
            % (expected, axis, m.shape)
        )
    if m.dtype.kind not in "biuf" and not _is_bfloat16(m.dtype):
        raise TypeError("mask must be a bool or real numeric array, got dtype %s" % m.dtype)
    if m.dtype.kind in "bu":
        return m.astype(cdtype)  # always a new array: the caller's mask is never touched
    w = m.astype(np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("mask weights must be finite")
    if np.any(w < 0):
        raise ValueError("mask weights must be >= 0")
    if rescale and w.size:
        # Weights only matter relative to each other. Extreme ones are scaled by a power of two
        # (exactly) so the largest lies in [0.5, 1) and none overflows or needlessly underflows
        # in float32. (Not for synchronized calls: every rank must weigh alike.)
        top = w.max()
        if top > 0 and not 2.0**-60 <= top <= 2.0**60:
            w = np.ldexp(w, -int(np.frexp(top)[1]))
    return w.astype(cdtype, copy=False)


def _sync_comm(synchronized, comm):
    """The communicator of a synchronized call, or None for a local one."""
    if comm is None and not synchronized:
        return None
    from . import distributed

    return distributed.resolve_comm(comm)


def _finalize(wsum, mean, m2):
    """mean/variance from merged partials (NaN where a channel has no weight)."""
    has = wsum > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(has, m2 / np.where(has, wsum, 1.0), np.nan)
    return np.where(has, mean, np.nan), var


def _synced_stats(x, ax, w, nt, comm):
    from . import distributed

    wsum, mean, m2 = _kernels.moments_partial(x, ax, w, nt)
    return _finalize(*distributed.merge_partials(comm, wsum, mean, m2))


def _check_out(out, shape, dtype):
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise ValueError("out must be a NumPy array, got %s" % type(out).__name__)
    if out.shape != shape:
        raise ValueError("out must have shape %s, got %s" % (shape, out.shape))
    if out.dtype != dtype:
        raise ValueError("out must have dtype %s, got %s" % (dtype, out.dtype))
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if not out.dtype.isnative:
        raise ValueError("out must be in native byte order")
    return out


def _stats(mean64, var64, dt):
    """float64 statistics computed in Python (synchronized calls) typed like the kernels'."""
    if dt.type is np.float64:
        return mean64, var64
    return mean64.astype(_F32), var64.astype(_F32)


# ---------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------


def moments(x, axis=-1, *, mask=None, n_threads=None, synchronized=False, comm=None):
    """Per-channel mean and population variance of `x` over every axis but `axis`.

    Returns ``(mean, variance)``, each of shape ``(x.shape[axis],)``: float64 for float64 input,
    float32 otherwise. Channels with no (unmasked) element give NaN.

    With ``synchronized=True`` (or a `comm`), the statistics are those of the batch formed by
    every rank's `x` of the MPI communicator `comm` (default ``MPI.COMM_WORLD``); see
    :mod:`bn_cy.distributed`.
    """
    if mask is None and comm is None and synchronized is False:
        r = _kernels.moments_plain(x, axis, n_threads)  # the common call, or None
        if r is not None:
            return r
    x = _as_data(x, "x")
    ax = _check_axis(axis, x.ndim)
    comm = _sync_comm(synchronized, comm)
    w = _mask_weights(mask, x, ax, _compute_dtype(x.dtype), rescale=comm is None)
    nt = _threads_for_call(n_threads)
    if comm is not None:
        return _stats(*_synced_stats(x, ax, w, nt, comm), x.dtype)
    return _kernels.moments(x, ax, w, nt)


def batch_norm(x, mean, variance, gamma=None, beta=None, *, axis=-1, epsilon=1e-3, out=None,
               n_threads=None):
    """Inference normalization: ``gamma * (x - mean) / sqrt(variance + epsilon) + beta``.

    `mean`, `variance`, `gamma`, `beta` have one value per channel (``x.shape[axis]``); gamma
    None means 1, beta None means 0. Returns an array of x's dtype (float32 for bool/int input),
    written into `out` when given (which may be `x` itself).
    """
    r = _kernels.batch_norm_plain(x, mean, variance, gamma, beta, axis, epsilon, out, n_threads)
    if r is not None:  # the common call, checked as below
        return r
    x = _as_data(x, "x")
    ax = _check_axis(axis, x.ndim)
    c = x.shape[ax]
    m = _channel_vector(mean, c, "mean")
    v = _channel_vector(variance, c, "variance")
    if m is None:
        raise TypeError("mean must be an array of per-channel means, not None")
    if v is None:
        raise TypeError("variance must be an array of per-channel variances, not None")
    g = _channel_vector(gamma, c, "gamma")
    b = _channel_vector(beta, c, "beta")
    eps = _check_epsilon(epsilon)
    out = _check_out(out, x.shape, x.dtype)
    nt = _threads_for_call(n_threads)
    return _kernels.batch_norm(x, ax, out, m, v, g, b, eps, nt)


def batch_norm_train(x, gamma=None, beta=None, *, axis=-1, epsilon=1e-3, mask=None, out=None,
                     n_threads=None, synchronized=False, comm=None):
    """Training forward: normalize `x` with its own batch statistics.

    Returns ``(y, mean, variance)``: the batch mean and population variance are those of
    :func:`moments` (weighted by `mask`), and y is normalized with them at every position,
    masked or not. x is read twice and y written once.

    ``synchronized=True`` (or a `comm`): the statistics are those of the global batch of every
    rank of the MPI communicator (one collective per call).
    """
    if mask is None and comm is None and synchronized is False:
        r = _kernels.batch_norm_train_plain(x, gamma, beta, axis, epsilon, out, n_threads)
        if r is not None:  # the common call, checked as below
            return r
    x = _as_data(x, "x")
    ax = _check_axis(axis, x.ndim)
    c = x.shape[ax]
    g = _channel_vector(gamma, c, "gamma")
    b = _channel_vector(beta, c, "beta")
    eps = _check_epsilon(epsilon)
    comm = _sync_comm(synchronized, comm)
    w = _mask_weights(mask, x, ax, _compute_dtype(x.dtype), rescale=comm is None)
    out = _check_out(out, x.shape, x.dtype)
    nt = _threads_for_call(n_threads)
    if comm is not None:
        mean, var = _synced_stats(x, ax, w, nt, comm)
        y = _kernels.batch_norm(x, ax, out, mean, var, g, b, eps, nt)
        return (y,) + _stats(mean, var, x.dtype)
    return _kernels.batch_norm_train(x, ax, out, w, g, b, eps, nt)


def batch_norm_backward(dy, x, mean, variance, gamma=None, *, axis=-1, epsilon=1e-3, mask=None,
                        training=True, out=None, n_threads=None, synchronized=False, comm=None):
    """Gradients of batch normalization: returns ``(dx, dgamma, dbeta)``.

    With ``training=True``, `mean` and `variance` are the batch statistics the forward pass used
    (from :func:`batch_norm_train`, same `mask`), and dx includes their dependence on x. With
    ``training=False`` they are constants (moving statistics) and ``dx = dy * gamma /
    sqrt(variance + epsilon)``. ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)`` over every
    position; dgamma is returned even when gamma is None.

    ``synchronized=True`` (or a `comm`) with ``training=True``: mean/variance are the global
    statistics of a synchronized forward, and sum(dy), sum(dy*xhat) and the total weight are
    gathered over the ranks, so dx equals the single-process dx on the concatenated batch.
    dgamma and dbeta stay this rank's contributions (their sum over ranks is the global gradient,
    ready for a data-parallel all-reduce of parameter gradients).
    """
    if mask is None and comm is None and synchronized is False:
        r = _kernels.batch_norm_backward_plain(dy, x, mean, variance, gamma, axis, epsilon,
                                               training, out, n_threads)
        if r is not None:  # the common call, checked as below
            return r
    x = _as_data(x, "x")
    dy = _as_data(dy, "dy")
    ax = _check_axis(axis, x.ndim)
    if dy.shape != x.shape:
        raise ValueError("dy must have the shape of x %s, got %s" % (x.shape, dy.shape))
    if dy.dtype != x.dtype:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range dy becomes +-Inf
            dy = dy.astype(x.dtype)
    c = x.shape[ax]
    m = _channel_vector(mean, c, "mean")
    v = _channel_vector(variance, c, "variance")
    if m is None:
        raise TypeError("mean must be an array of per-channel means, not None")
    if v is None:
        raise TypeError("variance must be an array of per-channel variances, not None")
    g = _channel_vector(gamma, c, "gamma")
    eps = _check_epsilon(epsilon)
    comm = _sync_comm(synchronized, comm) if training else None
    w = _mask_weights(mask, x, ax, _compute_dtype(x.dtype), rescale=comm is None)
    if not training:
        w = None  # validated, but constant statistics do not depend on the mask
    out = _check_out(out, x.shape, x.dtype)
    nt = _threads_for_call(n_threads)
    if comm is not None:
        from . import distributed

        sdy, sdyx = _kernels.grad_sums(dy, x, ax, m, nt)
        local_w = float(w.sum(dtype=np.float64)) if w is not None else float(x.size // max(c, 1))
        wtot, sdy_all, sdyx_all = distributed.sum_grad_sums(comm, local_w, sdy, sdyx)
        dx = _kernels.grad_input(dy, x, ax, out, w, m, v, g, eps, True, wtot, sdy_all, sdyx_all, nt)
        with np.errstate(invalid="ignore"):
            dgamma = sdyx / np.sqrt(v.astype(np.float64) + eps) if x.size else np.zeros(c)
        return (dx,) + _stats(dgamma, sdy, x.dtype)
    return _kernels.batch_norm_backward(dy, x, ax, out, w, m, v, g, eps, bool(training), nt)
