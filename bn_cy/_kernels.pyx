# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin wrappers over the C kernels of src_c/bn_cy.h.

The callers (bn_cy.ops; bn_cy.layer for its common training call) have already validated
arguments: arrays of a supported dtype in native byte order, a non-negative axis, float32/float64
per-channel vectors of the right length, a mask of the compute dtype shaped like x without the
feature axis. The exceptions are `train_update` and the `*_plain` entries at the end, which
recognize the calls they take themselves (and return None for anything else, which the caller
then validates or computes another way). What happens here:

* the layout is resolved into the canonical (outer, chan, inner) view, either in the array's own
  dimension order or in reversed order (an F-ordered array is C-ordered reversed); an array whose
  non-feature dimensions collapse in neither order is copied once;
* an output that cannot be viewed the same way, or that partially overlaps an input, is computed
  into a temporary and copied into place;
* the GIL is released around every kernel call, and status codes become exceptions.
"""

import threading

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cnp.import_array()

cdef enum Kind:
    KIND_F32 = 0
    KIND_F64 = 1
    KIND_F16 = 2
    KIND_BF16 = 3


cdef int _kind(cnp.ndarray a) except -1:
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return KIND_F32
    if t == cnp.NPY_FLOAT64:
        return KIND_F64
    if t == cnp.NPY_FLOAT16:
        return KIND_F16
    if a.dtype.name == "bfloat16":
        return KIND_BF16
    raise TypeError("unsupported dtype for a kernel: %s" % a.dtype)


cdef int _check(int status) except -1:
    if status == BNCY_OK:
        return 0
    if status == BNCY_ERR_NOMEM:
        raise MemoryError("bn_cy: a kernel workspace could not be allocated")
    raise RuntimeError("bn_cy: internal error in a kernel (status %d)" % status)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------

cdef bint _collapse(cnp.npy_intp *shape, cnp.npy_intp *strides, cnp.npy_intp itemsize,
                    int start, int stop, int step, int64_t *size, int64_t *stride):
    """Collapse dims start, start+step, ... (not stop) into one strided dim, C order within."""
    cdef int64_t n = 1
    cdef int d = start, prev = -1
    while d != stop:
        if shape[d] == 0:
            size[0] = 0
            stride[0] = 0
            return True
        if shape[d] != 1:
            if prev >= 0 and strides[prev] != strides[d] * shape[d]:
                return False
            n *= shape[d]
            prev = d
        d += step
    size[0] = n
    stride[0] = 0
    if prev >= 0:
        if strides[prev] % itemsize != 0:
            return False
        stride[0] = strides[prev] // itemsize
    return True


cdef bint _view(cnp.ndarray a, int axis, bint rev, bncy_shape *sh, bncy_strides *st):
    """The (outer, chan, inner) view of `a` in its own (rev=False) or reversed dim order."""
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    cdef cnp.npy_intp isz = cnp.PyArray_ITEMSIZE(a)
    cdef int d
    if cnp.PyArray_SIZE(a) == 0:  # nothing is read or written: any strides will do
        sh.chan = shape[axis]
        sh.outer = sh.inner = 1
        for d in range(nd):
            if d < axis:
                sh.outer *= shape[d]
            elif d > axis:
                sh.inner *= shape[d]
        st.outer = st.chan = st.inner = 0
        return True
    if not cnp.PyArray_ISALIGNED(a) or strides[axis] % isz != 0:
        return False
    sh.chan = shape[axis]
    st.chan = strides[axis] // isz
    if not rev:
        return (_collapse(shape, strides, isz, 0, axis, 1, &sh.outer, &st.outer)
                and _collapse(shape, strides, isz, axis + 1, nd, 1, &sh.inner, &st.inner))
    return (_collapse(shape, strides, isz, nd - 1, axis, -1, &sh.outer, &st.outer)
            and _collapse(shape, strides, isz, axis - 1, -1, -1, &sh.inner, &st.inner))


cdef bint _fast(bncy_shape sh, bncy_strides st):
    """True when one of the two kernel families reads this view with unit stride."""
    if sh.chan <= 1 or sh.outer * sh.inner <= 1:
        return True
    if sh.inner > 1:
        return st.inner == 1 or st.inner == 0  # zero stride: a broadcast run, reduced in O(1)
    return st.chan == 1


cdef bint _choose_reversed(cnp.ndarray x, int axis):
    cdef bncy_shape sh
    cdef bncy_strides st
    cdef bint fwd = _view(x, axis, False, &sh, &st)
    if fwd and _fast(sh, st):
        return False
    if _view(x, axis, True, &sh, &st):
        return _fast(sh, st) or not fwd
    return False


cdef cnp.ndarray _input(cnp.ndarray a, int axis, bint rev, bncy_shape *sh, bncy_strides *st):
    """`a` itself when its view in this order collapses, else a copy that does."""
    if _view(a, axis, rev, sh, st):
        return a
    a = np.asfortranarray(a) if rev else np.ascontiguousarray(a)
    if not _view(a, axis, rev, sh, st):
        raise RuntimeError("bn_cy: internal error, a contiguous copy has no canonical view")
    return a


cdef bint _same_layout(cnp.ndarray a, cnp.ndarray b):
    cdef int d
    if cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[d] > 1 and cnp.PyArray_STRIDES(a)[d] != cnp.PyArray_STRIDES(b)[d]:
            return False
    return True


cdef bint _may_overlap(cnp.ndarray a, cnp.ndarray b):
    """Whether a and b may share memory: their byte extents overlap (then NumPy decides)."""
    cdef char *alo
    cdef char *ahi
    cdef char *blo
    cdef char *bhi
    if cnp.PyArray_SIZE(a) == 0 or cnp.PyArray_SIZE(b) == 0:
        return False
    _extent(a, &alo, &ahi)
    _extent(b, &blo, &bhi)
    if ahi <= blo or bhi <= alo:
        return False
    return bool(np.may_share_memory(a, b))


cdef void _extent(cnp.ndarray a, char **lo, char **hi):
    cdef char *p = <char *>cnp.PyArray_DATA(a)
    cdef cnp.npy_intp span
    cdef int d
    lo[0] = p
    hi[0] = p + cnp.PyArray_ITEMSIZE(a)
    for d in range(cnp.PyArray_NDIM(a)):
        span = (cnp.PyArray_DIMS(a)[d] - 1) * cnp.PyArray_STRIDES(a)[d]
        if span < 0:
            lo[0] += span
        else:
            hi[0] += span


cdef cnp.ndarray _output(object out, cnp.ndarray like, int axis, bint rev, tuple reads,
                         bncy_strides *st):
    """The array the kernel writes: `out`, a new array, or a temporary to copy into `out`."""
    cdef bncy_shape sh
    cdef cnp.ndarray o
    cdef bint clash = False
    if out is not None:
        o = <cnp.ndarray>out
        if _view(o, axis, rev, &sh, st):
            for r in reads:
                if not _same_layout(o, <cnp.ndarray>r) and _may_overlap(o, <cnp.ndarray>r):
                    clash = True
                    break
            if not clash:
                return o
    o = _empty_like_layout(like, rev)
    _view(o, axis, rev, &sh, st)
    return o


cdef cnp.ndarray _empty_like_layout(cnp.ndarray like, bint fortran):
    """A new array of like's shape and dtype, C order (or F order for the reversed view)."""
    cdef int t = cnp.PyArray_TYPE(like)
    if t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 or t == cnp.NPY_FLOAT16:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(like), cnp.PyArray_DIMS(like), t, fortran)
    return np.empty((<object>like).shape, (<object>like).dtype, order="F" if fortran else "C")


cdef cnp.ndarray _vec_empty(Py_ssize_t n):
    """A new float64 vector (per-channel results of the kernels)."""
    cdef cnp.npy_intp d = n
    return cnp.PyArray_EMPTY(1, &d, cnp.NPY_FLOAT64, 0)


cdef object _narrow(cnp.ndarray v, bint keep64):
    """Per-channel float64 results as returned to users: float64 for float64 data, else float32."""
    if keep64:
        return v
    cdef cnp.npy_intp n = cnp.PyArray_DIMS(v)[0], i
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT32, 0)
    cdef const double *s = <const double *>cnp.PyArray_DATA(v)
    cdef float *d = <float *>cnp.PyArray_DATA(out)
    for i in range(n):
        d[i] = <float>s[i]
    return out


cdef double *_scratch(Py_ssize_t n) except NULL:
    """malloc'd room for n doubles (the caller frees it)."""
    cdef double *buf = <double *>malloc((n + 1) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    return buf


cdef object _f32_vector(const double *src, Py_ssize_t n):
    cdef cnp.npy_intp d = n, i
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &d, cnp.NPY_FLOAT32, 0)
    cdef float *o = <float *>cnp.PyArray_DATA(out)
    for i in range(n):
        o[i] = <float>src[i]
    return out


cdef object _finish(object out, cnp.ndarray written):
    if out is None:
        return written
    if written is not out:
        np.copyto(out, written)
    return out


cdef const void *_mask_ptr(object mask, bint rev, list keep) except? NULL:
    cdef cnp.ndarray m
    if mask is None:
        return NULL
    m = <cnp.ndarray>mask
    if rev:
        m = m.T
    m = np.ascontiguousarray(m)
    keep.append(m)
    return cnp.PyArray_DATA(m)


cdef const double *_vec(object v, list keep, double *room=NULL, bint kept=False) except? NULL:
    """A per-channel vector as float64 data: the array's own when it is contiguous float64, a
    converted copy for contiguous float32 -- into `room` (the caller's, of the vector's length)
    when given (with `kept`, room kept from the last call, written only when some value differs
    from what it holds: see _Room), else a new array held in `keep` until the call ends."""
    if v is None:
        return NULL
    cdef cnp.ndarray a = <cnp.ndarray>v
    cdef cnp.ndarray d
    cdef cnp.npy_intp n, i
    cdef const float *s
    cdef uint64_t *o
    cdef double value
    cdef uint64_t bits, differ
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64 and cnp.PyArray_ISCARRAY_RO(a):
        return <const double *>cnp.PyArray_DATA(a)
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 and cnp.PyArray_ISCARRAY_RO(a) \
            and cnp.PyArray_ISNOTSWAPPED(a):
        n = cnp.PyArray_SIZE(a)
        if room == NULL:
            d = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)
            keep.append(d)
            room = <double *>cnp.PyArray_DATA(d)
        s = <const float *>cnp.PyArray_DATA(a)
        differ = 1
        if kept:
            o = <uint64_t *>room
            differ = 0
            for i in range(n):  # branch-free (it vectorizes); -0.0 and NaNs count
                value = s[i]
                memcpy(&bits, &value, sizeof(bits))
                differ |= o[i] ^ bits
        if differ:
            for i in range(n):
                room[i] = s[i]
        return room
    d = np.ascontiguousarray(v, dtype=np.float64)
    keep.append(d)
    return <const double *>cnp.PyArray_DATA(d)


cdef bint _ema_operand(cnp.ndarray a, int t, cnp.npy_intp n, bint write):
    """Whether `a` is a contiguous 1-D vector of native byte order, of type t and n values
    (and writeable, if `write`): what _ema takes."""
    return (cnp.PyArray_TYPE(a) == t and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_SIZE(a) == n
            and (cnp.PyArray_ISCARRAY(a) if write else cnp.PyArray_ISCARRAY_RO(a))
            and cnp.PyArray_ISNOTSWAPPED(a))


cdef void _ema(cnp.ndarray moving, cnp.ndarray batch, double momentum, double rest):
    """moving = moving * momentum + batch * rest in place: both _ema_operand of one float32 or
    float64 type and length."""
    cdef int64_t n = cnp.PyArray_SIZE(moving)
    if cnp.PyArray_TYPE(moving) == cnp.NPY_FLOAT32:
        bncy_ema_f32(<float *>cnp.PyArray_DATA(moving), <const float *>cnp.PyArray_DATA(batch),
                     n, <float>momentum, <float>rest)
    else:
        bncy_ema_f64(<double *>cnp.PyArray_DATA(moving),
                     <const double *>cnp.PyArray_DATA(batch), n, momentum, rest)


def ema_update(cnp.ndarray moving, cnp.ndarray batch, double momentum, double rest):
    """moving = moving * momentum + batch * rest, in place, in moving's dtype. Returns False
    (and does nothing) unless both are contiguous 1-D native float32, or float64, of one
    length."""
    cdef int t = cnp.PyArray_TYPE(moving)
    cdef cnp.npy_intp n = cnp.PyArray_SIZE(moving)
    if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or not _ema_operand(moving, t, n, True) \
            or not _ema_operand(batch, t, n, False):
        return False
    _ema(moving, batch, momentum, rest)
    return True


# float32 statistics of up to ROOM_CHANNELS channels are computed in room on the stack; wider
# ones in one malloc'd block per call (the C stack stays small either way; one block, not an
# array per vector: at a thousand channels those cost a microsecond or more).
cdef enum:
    ROOM_CHANNELS = 256


# The float64 copies of float32 per-channel vectors (gamma, beta, the statistics of an inference)
# are made into room that persists from call to call: one block per Python thread, taken for
# the length of a call (a call made meanwhile on the same thread gets a block of its own), with
# only the values that changed since the last call written. The kernels' threads read these
# vectors; a line the calling thread wrote since their last read has to come from its core,
# an unchanged one is still in their caches. On the first machine, writing the four vectors of
# a 1024-channel inference anew made the 17 us call 23 us. Calls the kernels run on one thread
# (_threads_share) convert into room on the stack or one malloc'd block as before: taking the
# kept block costs a few tenths of a microsecond, a fifth of a tiny call.
_room_local = threading.local()


cdef enum:
    PARALLEL_MIN = 32768  # the kernels' BNCY_PARALLEL_MIN: fewer elements run on one thread


cdef inline bint _threads_share(cnp.ndarray x, int n_threads):
    """Whether the kernels may run a call on x on more than one thread."""
    return n_threads > 1 and cnp.PyArray_SIZE(x) >= PARALLEL_MIN


cdef class _Room:
    """The kept room (see above) taken for one call that _threads_share: `data` holds `slots`
    vectors of `channels` float64 values, one after the other; give_back() returns it."""
    cdef cnp.ndarray block
    cdef double *data

    def __cinit__(self, cnp.npy_intp slots, cnp.npy_intp channels):
        cdef cnp.npy_intp n = slots * channels
        cdef object block = getattr(_room_local, "block", None)
        if block is not None and cnp.PyArray_SIZE(<cnp.ndarray>block) >= n:
            _room_local.block = None
        else:
            block = np.zeros(max(n, 4 * ROOM_CHANNELS), np.float64)
        self.block = <cnp.ndarray>block
        self.data = <double *>cnp.PyArray_DATA(self.block)

    cdef void give_back(self):
        _room_local.block = self.block


cdef double *_vec_base(_Room room, double *stack, int slots, cnp.npy_intp channels,
                       double **heap) except NULL:
    """Where a call puts its converted vectors: the kept room when it has one, else the caller's
    stack room (of `slots` x ROOM_CHANNELS), else a new block (*heap; the caller frees it)."""
    if room is not None:
        return room.data
    if channels <= ROOM_CHANNELS:
        return stack
    heap[0] = _scratch(slots * channels)
    return heap[0]


cdef object _moments(cnp.ndarray x, int axis, object mask, int n_threads):
    cdef bncy_shape sh
    cdef bncy_strides xs
    cdef bint rev = _choose_reversed(x, axis)
    cdef list keep = []
    cdef double room[2 * ROOM_CHANNELS]
    x = _input(x, axis, rev, &sh, &xs)
    cdef const void *w = _mask_ptr(mask, rev, keep)
    cdef int kind = _kind(x), status
    cdef bint keep64 = kind == KIND_F64
    # float64 statistics: the returned arrays; others: room (or scratch) narrowed at the end
    cdef bint small = sh.chan <= ROOM_CHANNELS
    cdef cnp.ndarray mean = _vec_empty(sh.chan) if keep64 else None
    cdef cnp.ndarray var = _vec_empty(sh.chan) if keep64 else None
    cdef double *pm = <double *>cnp.PyArray_DATA(mean) if keep64 else (
        &room[0] if small else _scratch(2 * sh.chan))
    cdef double *pv = <double *>cnp.PyArray_DATA(var) if keep64 else pm + sh.chan
    cdef const void *px = cnp.PyArray_DATA(x)
    try:
        with nogil:
            status = _moments_call(kind, px, xs, sh, w, pm, pv, n_threads)
        _check(status)
        if keep64:
            return mean, var
        return _f32_vector(pm, sh.chan), _f32_vector(pv, sh.chan)
    finally:
        if not keep64 and not small:
            free(pm)


def moments(cnp.ndarray x, int axis, object mask, int n_threads):
    """Per-channel weighted mean and population variance (float64 for float64 x, else float32)."""
    return _moments(x, axis, mask, n_threads)


cdef int _moments_call(int kind, const void *px, bncy_strides xs, bncy_shape sh, const void *w,
                       double *pm, double *pv, int n_threads) nogil:
    cdef int status
    if True:
        if kind == KIND_F32:
            status = bncy_moments_f32(<const float *>px, xs, sh, <const float *>w, pm, pv, n_threads)
        elif kind == KIND_F64:
            status = bncy_moments_f64(<const double *>px, xs, sh, <const double *>w, pm, pv,
                                      n_threads)
        elif kind == KIND_F16:
            status = bncy_moments_f16(<const bncy_half *>px, xs, sh, <const float *>w, pm, pv,
                                      n_threads)
        else:
            status = bncy_moments_bf16(<const bncy_bfloat16 *>px, xs, sh, <const float *>w, pm,
                                       pv, n_threads)
    return status


cdef object _batch_norm(cnp.ndarray x, int axis, object out, object mean, object var,
                        object gamma, object beta, double eps, int n_threads):
    cdef bncy_shape sh
    cdef bncy_strides xs, ys
    cdef list keep = []
    cdef bint rev = _choose_reversed(x, axis)
    x = _input(x, axis, rev, &sh, &xs)
    cdef cnp.ndarray y = _output(out, x, axis, rev, (x,), &ys)
    cdef double stack[4 * ROOM_CHANNELS]
    cdef _Room room = _Room(4, sh.chan) if _threads_share(x, n_threads) else None
    cdef double *heap = NULL
    cdef double *base
    cdef bint kept = room is not None
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef const double *pm
    cdef const double *pv
    cdef const double *pg
    cdef const double *pb
    cdef int kind = _kind(x), status
    base = _vec_base(room, &stack[0], 4, sh.chan, &heap)
    try:
        pm = _vec(mean, keep, base, kept)
        pv = _vec(var, keep, base + sh.chan, kept)
        pg = _vec(gamma, keep, base + 2 * sh.chan, kept)
        pb = _vec(beta, keep, base + 3 * sh.chan, kept)
        with nogil:
            if kind == KIND_F32:
                status = bncy_batch_norm_f32(<const float *>px, xs, <float *>py, ys, sh, pm, pv,
                                             pg, pb, eps, n_threads)
            elif kind == KIND_F64:
                status = bncy_batch_norm_f64(<const double *>px, xs, <double *>py, ys, sh, pm,
                                             pv, pg, pb, eps, n_threads)
            elif kind == KIND_F16:
                status = bncy_batch_norm_f16(<const bncy_half *>px, xs, <bncy_half *>py, ys, sh,
                                             pm, pv, pg, pb, eps, n_threads)
            else:
                status = bncy_batch_norm_bf16(<const bncy_bfloat16 *>px, xs,
                                              <bncy_bfloat16 *>py, ys, sh, pm, pv, pg, pb, eps,
                                              n_threads)
        _check(status)
    finally:
        if kept:
            room.give_back()
        free(heap)
    return _finish(out, y)


def batch_norm(cnp.ndarray x, int axis, object out, object mean, object var, object gamma,
               object beta, double eps, int n_threads):
    """Inference normalization into `out` (or a new array); returns the result."""
    return _batch_norm(x, axis, out, mean, var, gamma, beta, eps, n_threads)


cdef object _batch_norm_train(cnp.ndarray x, int axis, object out, object mask, object gamma,
                              object beta, double eps, int n_threads):
    cdef bncy_shape sh
    cdef bncy_strides xs, ys
    cdef bint rev = _choose_reversed(x, axis)
    cdef list keep = []
    cdef double room[4 * ROOM_CHANNELS]
    x = _input(x, axis, rev, &sh, &xs)
    cdef cnp.ndarray y = _output(out, x, axis, rev, (x,), &ys)
    cdef const void *w = _mask_ptr(mask, rev, keep)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef int kind = _kind(x), status
    cdef bint keep64 = kind == KIND_F64
    # float64 statistics: the returned arrays; others: room (or scratch) narrowed at the end
    cdef cnp.ndarray mean = _vec_empty(sh.chan) if keep64 else None
    cdef cnp.ndarray var = _vec_empty(sh.chan) if keep64 else None
    cdef double *heap = NULL if sh.chan <= ROOM_CHANNELS else _scratch(4 * sh.chan)
    cdef double *base = &room[0] if heap == NULL else heap
    cdef double *pm = <double *>cnp.PyArray_DATA(mean) if keep64 else base
    cdef double *pv = <double *>cnp.PyArray_DATA(var) if keep64 else pm + sh.chan
    cdef const double *pg
    cdef const double *pb
    cdef _Room vectors = _Room(2, sh.chan) if _threads_share(x, n_threads) else None
    cdef bint kept = vectors is not None
    # gamma and beta: the kept room, or the two slots after the statistics'
    cdef double *gb = vectors.data if kept else base + 2 * sh.chan
    try:
        pg = _vec(gamma, keep, gb, kept)
        pb = _vec(beta, keep, gb + sh.chan, kept)
        with nogil:
            status = _train_call(kind, px, xs, py, ys, sh, w, pg, pb, eps, pm, pv, n_threads)
        _check(status)
        if keep64:
            return _finish(out, y), mean, var
        return _finish(out, y), _f32_vector(pm, sh.chan), _f32_vector(pv, sh.chan)
    finally:
        if kept:
            vectors.give_back()
        free(heap)


def batch_norm_train(cnp.ndarray x, int axis, object out, object mask, object gamma,
                     object beta, double eps, int n_threads):
    """Fused training forward; returns (y, mean, var), statistics as in moments()."""
    return _batch_norm_train(x, axis, out, mask, gamma, beta, eps, n_threads)


def train_update(cnp.ndarray x, int axis, object gamma, object beta, double eps,
                 object moving_mean, object moving_var, double momentum, double rest):
    """The layer's common training call in one step: the fused forward as batch_norm_train runs
    it with the default thread count, then moving = moving * momentum + batch * rest (as
    ema_update) for the mean and the variance. Returns (y, mean, var, a copy of gamma or None).

    Returns None, having done nothing, unless gamma and beta are None or vectors as the plain
    calls take them (float32/float64 ndarrays of native byte order and x.shape[axis] values),
    and both moving arrays are writeable contiguous 1-D ndarrays of native byte order, of the
    statistics' dtype (float64 for float64 x, else float32) and of x.shape[axis] values."""
    cdef int stat = cnp.NPY_FLOAT64 if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT64 else cnp.NPY_FLOAT32
    cdef cnp.npy_intp c = cnp.PyArray_DIMS(x)[axis]
    if not (_plain_vec(gamma, c) and _plain_vec(beta, c)
            and isinstance(moving_mean, cnp.ndarray) and isinstance(moving_var, cnp.ndarray)
            and _ema_operand(<cnp.ndarray>moving_mean, stat, c, True)
            and _ema_operand(<cnp.ndarray>moving_var, stat, c, True)):
        return None
    snapshot = None if gamma is None else cnp.PyArray_NewCopy(<cnp.ndarray>gamma, cnp.NPY_CORDER)
    y, mean, var = _batch_norm_train(x, axis, None, None, gamma, beta, eps,
                                     _call_threads(_threads_default()))
    _ema(<cnp.ndarray>moving_mean, <cnp.ndarray>mean, momentum, rest)
    _ema(<cnp.ndarray>moving_var, <cnp.ndarray>var, momentum, rest)
    return y, mean, var, snapshot


cdef int _train_call(int kind, const void *px, bncy_strides xs, void *py, bncy_strides ys,
                     bncy_shape sh, const void *w, const double *pg, const double *pb, double eps,
                     double *pm, double *pv, int n_threads) nogil:
    cdef int status
    if True:
        if kind == KIND_F32:
            status = bncy_batch_norm_train_f32(<const float *>px, xs, <float *>py, ys, sh,
                                               <const float *>w, pg, pb, eps, pm, pv, n_threads)
        elif kind == KIND_F64:
            status = bncy_batch_norm_train_f64(<const double *>px, xs, <double *>py, ys, sh,
                                               <const double *>w, pg, pb, eps, pm, pv, n_threads)
        elif kind == KIND_F16:
            status = bncy_batch_norm_train_f16(<const bncy_half *>px, xs, <bncy_half *>py, ys, sh,
                                               <const float *>w, pg, pb, eps, pm, pv, n_threads)
        else:
            status = bncy_batch_norm_train_bf16(<const bncy_bfloat16 *>px, xs,
                                                <bncy_bfloat16 *>py, ys, sh, <const float *>w, pg,
                                                pb, eps, pm, pv, n_threads)
    return status


cdef object _batch_norm_backward(cnp.ndarray dy, cnp.ndarray x, int axis, object out,
                                 object mask, object mean, object var, object gamma, double eps,
                                 bint training, int n_threads):
    cdef bncy_shape sh, dsh
    cdef bncy_strides xs, dys, dxs
    cdef bint rev = _choose_reversed(x, axis)
    cdef list keep = []
    x = _input(x, axis, rev, &sh, &xs)
    dy = _input(dy, axis, rev, &dsh, &dys)
    cdef cnp.ndarray dx = _output(out, x, axis, rev, (x, dy), &dxs)
    cdef const void *w = _mask_ptr(mask, rev, keep)
    cdef cnp.ndarray dgamma = _vec_empty(sh.chan)
    cdef cnp.ndarray dbeta = _vec_empty(sh.chan)
    cdef double *pdg = <double *>cnp.PyArray_DATA(dgamma)
    cdef double *pdb = <double *>cnp.PyArray_DATA(dbeta)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef const void *pdy = cnp.PyArray_DATA(dy)
    cdef void *pdx = cnp.PyArray_DATA(dx)
    cdef double stack[3 * ROOM_CHANNELS]
    cdef _Room room = _Room(3, sh.chan) if _threads_share(x, n_threads) else None
    cdef double *heap = NULL
    cdef double *base
    cdef bint kept = room is not None
    cdef const double *pm
    cdef const double *pv
    cdef const double *pg
    cdef int kind = _kind(x), status
    cdef int train = 1 if training else 0
    base = _vec_base(room, &stack[0], 3, sh.chan, &heap)
    try:
        pm = _vec(mean, keep, base, kept)
        pv = _vec(var, keep, base + sh.chan, kept)
        pg = _vec(gamma, keep, base + 2 * sh.chan, kept)
        with nogil:
            if kind == KIND_F32:
                status = bncy_batch_norm_backward_f32(<const float *>pdy, dys,
                                                      <const float *>px, xs, <float *>pdx, dxs,
                                                      sh, <const float *>w, pm, pv, pg, eps,
                                                      train, pdg, pdb, n_threads)
            elif kind == KIND_F64:
                status = bncy_batch_norm_backward_f64(<const double *>pdy, dys,
                                                      <const double *>px, xs, <double *>pdx, dxs,
                                                      sh, <const double *>w, pm, pv, pg, eps,
                                                      train, pdg, pdb, n_threads)
            elif kind == KIND_F16:
                status = bncy_batch_norm_backward_f16(<const bncy_half *>pdy, dys,
                                                      <const bncy_half *>px, xs, <bncy_half *>pdx,
                                                      dxs, sh, <const float *>w, pm, pv, pg, eps,
                                                      train, pdg, pdb, n_threads)
            else:
                status = bncy_batch_norm_backward_bf16(<const bncy_bfloat16 *>pdy, dys,
                                                       <const bncy_bfloat16 *>px, xs,
                                                       <bncy_bfloat16 *>pdx, dxs, sh,
                                                       <const float *>w, pm, pv, pg, eps,
                                                       train, pdg, pdb, n_threads)
        _check(status)
    finally:
        if kept:
            room.give_back()
        free(heap)
    return (_finish(out, dx), _narrow(dgamma, kind == KIND_F64),
            _narrow(dbeta, kind == KIND_F64))


def batch_norm_backward(cnp.ndarray dy, cnp.ndarray x, int axis, object out, object mask,
                        object mean, object var, object gamma, double eps, bint training,
                        int n_threads):
    """Backward pass; returns (dx, dgamma, dbeta), gradients typed as moments() statistics."""
    return _batch_norm_backward(dy, x, axis, out, mask, mean, var, gamma, eps, training,
                                n_threads)


def moments_partial(cnp.ndarray x, int axis, object mask, int n_threads):
    """Per-channel partial statistics (total weight, mean, sum of squared deviations), float64."""
    cdef bncy_shape sh
    cdef bncy_strides xs
    cdef bint rev = _choose_reversed(x, axis)
    cdef list keep = []
    x = _input(x, axis, rev, &sh, &xs)
    cdef const void *w = _mask_ptr(mask, rev, keep)
    cdef cnp.ndarray wsum = _vec_empty(sh.chan)
    cdef cnp.ndarray mean = _vec_empty(sh.chan)
    cdef cnp.ndarray m2 = _vec_empty(sh.chan)
    cdef double *pw = <double *>cnp.PyArray_DATA(wsum)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pm2 = <double *>cnp.PyArray_DATA(m2)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef int kind = _kind(x), status
    with nogil:
        if kind == KIND_F32:
            status = bncy_moments_partial_f32(<const float *>px, xs, sh, <const float *>w, pw, pm,
                                              pm2, n_threads)
        elif kind == KIND_F64:
            status = bncy_moments_partial_f64(<const double *>px, xs, sh, <const double *>w, pw,
                                              pm, pm2, n_threads)
        elif kind == KIND_F16:
            status = bncy_moments_partial_f16(<const bncy_half *>px, xs, sh, <const float *>w, pw,
                                              pm, pm2, n_threads)
        else:
            status = bncy_moments_partial_bf16(<const bncy_bfloat16 *>px, xs, sh,
                                               <const float *>w, pw, pm, pm2, n_threads)
    _check(status)
    return wsum, mean, m2


def grad_sums(cnp.ndarray dy, cnp.ndarray x, int axis, object mean, int n_threads):
    """Backward pass 1: per-channel sum(dy) and sum(dy * (x - mean)), float64."""
    cdef bncy_shape sh, dsh
    cdef bncy_strides xs, dys
    cdef list keep = []
    cdef bint rev = _choose_reversed(x, axis)
    x = _input(x, axis, rev, &sh, &xs)
    dy = _input(dy, axis, rev, &dsh, &dys)
    cdef cnp.ndarray sdy = _vec_empty(sh.chan)
    cdef cnp.ndarray sdyx = _vec_empty(sh.chan)
    cdef double *p1 = <double *>cnp.PyArray_DATA(sdy)
    cdef double *p2 = <double *>cnp.PyArray_DATA(sdyx)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef const void *pdy = cnp.PyArray_DATA(dy)
    cdef const double *pm = _vec(mean, keep)
    cdef int kind = _kind(x), status
    with nogil:
        if kind == KIND_F32:
            status = bncy_grad_sums_f32(<const float *>pdy, dys, <const float *>px, xs, sh, pm,
                                        p1, p2, n_threads)
        elif kind == KIND_F64:
            status = bncy_grad_sums_f64(<const double *>pdy, dys, <const double *>px, xs, sh, pm,
                                        p1, p2, n_threads)
        elif kind == KIND_F16:
            status = bncy_grad_sums_f16(<const bncy_half *>pdy, dys, <const bncy_half *>px, xs,
                                        sh, pm, p1, p2, n_threads)
        else:
            status = bncy_grad_sums_bf16(<const bncy_bfloat16 *>pdy, dys,
                                         <const bncy_bfloat16 *>px, xs, sh, pm, p1, p2, n_threads)
    _check(status)
    return sdy, sdyx


def grad_input(cnp.ndarray dy, cnp.ndarray x, int axis, object out, object mask, object mean,
               object var, object gamma, double eps, bint training, double wtotal, object sdy,
               object sdyx, int n_threads):
    """Backward pass 2: dx from the (possibly all-reduced) sums of pass 1."""
    cdef bncy_shape sh, dsh
    cdef bncy_strides xs, dys, dxs
    cdef bint rev = _choose_reversed(x, axis)
    cdef list keep = []
    x = _input(x, axis, rev, &sh, &xs)
    dy = _input(dy, axis, rev, &dsh, &dys)
    cdef cnp.ndarray dx = _output(out, x, axis, rev, (x, dy), &dxs)
    cdef const void *w = _mask_ptr(mask, rev, keep)
    cdef const void *px = cnp.PyArray_DATA(x)
    cdef const void *pdy = cnp.PyArray_DATA(dy)
    cdef void *pdx = cnp.PyArray_DATA(dx)
    cdef const double *pm = _vec(mean, keep)
    cdef const double *pv = _vec(var, keep)
    cdef const double *pg = _vec(gamma, keep)
    cdef const double *p1 = _vec(sdy, keep)
    cdef const double *p2 = _vec(sdyx, keep)
    cdef int kind = _kind(x), status
    cdef int train = 1 if training else 0
    with nogil:
        if kind == KIND_F32:
            status = bncy_grad_input_f32(<const float *>pdy, dys, <const float *>px, xs,
                                         <float *>pdx, dxs, sh, <const float *>w, pm, pv, pg, eps,
                                         train, wtotal, p1, p2, n_threads)
        elif kind == KIND_F64:
            status = bncy_grad_input_f64(<const double *>pdy, dys, <const double *>px, xs,
                                         <double *>pdx, dxs, sh, <const double *>w, pm, pv, pg,
                                         eps, train, wtotal, p1, p2, n_threads)
        elif kind == KIND_F16:
            status = bncy_grad_input_f16(<const bncy_half *>pdy, dys, <const bncy_half *>px, xs,
                                         <bncy_half *>pdx, dxs, sh, <const float *>w, pm, pv, pg,
                                         eps, train, wtotal, p1, p2, n_threads)
        else:
            status = bncy_grad_input_bf16(<const bncy_bfloat16 *>pdy, dys,
                                          <const bncy_bfloat16 *>px, xs, <bncy_bfloat16 *>pdx,
                                          dxs, sh, <const float *>w, pm, pv, pg, eps, train,
                                          wtotal, p1, p2, n_threads)
    _check(status)
    return _finish(out, dx)


# ---------------------------------------------------------------------------------------------
# Thread state. bn_cy.ops owns the policy (set_num_threads, fork safety); the state lives here so
# that the plain calls below resolve n_threads=None without running Python code.
# ---------------------------------------------------------------------------------------------

cdef int _default_threads = 0  # set_num_threads' value; 0: OpenMP's default
cdef bint _threads_started = False  # a call ran a parallel region (or may have)
cdef bint _forked_child = False  # this process is a child forked after that


def set_default_threads(int n):
    global _default_threads
    _default_threads = n if n > 0 else 0


def default_threads():
    """The thread count of a call with n_threads=None."""
    return _threads_default()


def default_call_threads():
    """The thread count of a call about to run with n_threads=None (see _call_threads)."""
    return _call_threads(_threads_default())


def call_threads(int n):
    """The thread count of a call about to run with n (>= 1) threads asked for."""
    return _call_threads(n)


def after_fork_in_child():
    global _forked_child
    if _threads_started:
        _forked_child = True


cdef int _threads_default():
    cdef int n
    if _forked_child:
        return 1
    if _default_threads > 0:
        return _default_threads
    n = bncy_omp_max_threads()
    return n if n > 1 else 1


cdef int _call_threads(int n):
    """n, or 1 in a forked child; a count > 1 is noted as threads started (fork safety)."""
    global _threads_started
    if _forked_child:
        return 1
    if n > 1:
        _threads_started = True
    return n


cdef int _plain_threads(object n_threads) except -1:
    """The thread count of a call given n_threads None or an int in [1, 4096]; 0 otherwise."""
    if n_threads is None:
        return _call_threads(_threads_default())
    if type(n_threads) is int and 1 <= n_threads <= 4096:
        return _call_threads(<int>n_threads)
    return 0


# ---------------------------------------------------------------------------------------------
# Plain calls: the public operations' common case, recognized without running Python code. Each
# returns None unless every argument is of the kind that needs neither conversion nor a closer
# look (then bn_cy.ops validates and converts, with its error messages, and calls the wrappers
# above): x a float32/float64 ndarray of native byte order, an int axis in range, a float epsilon
# in [0, inf), per-channel vectors None or float32/float64 ndarrays of shape (channels,), `out`
# None or an ndarray of x's shape and dtype that is writeable, n_threads None or an int >= 1.
# ---------------------------------------------------------------------------------------------

cdef int _plain_axis(object x, object axis) except -2:
    """The non-negative feature axis of a plain x, or -1."""
    cdef cnp.ndarray a
    cdef int t, nd
    cdef long ax
    if type(x) is not cnp.ndarray or type(axis) is not int:
        return -1
    a = <cnp.ndarray>x
    t = cnp.PyArray_TYPE(a)
    if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or not cnp.PyArray_ISNOTSWAPPED(a):
        return -1
    nd = cnp.PyArray_NDIM(a)
    if not -nd <= axis < nd:
        return -1
    ax = <long>axis
    return <int>(ax + nd if ax < 0 else ax)


cdef bint _plain_eps(object epsilon):
    return type(epsilon) is float and 0.0 <= <double>epsilon <= 1.7976931348623157e308


cdef bint _plain_vec(object v, cnp.npy_intp channels):
    cdef cnp.ndarray a
    cdef int t
    if v is None:
        return True
    if type(v) is not cnp.ndarray:
        return False
    a = <cnp.ndarray>v
    t = cnp.PyArray_TYPE(a)
    return ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_ISNOTSWAPPED(a)
            and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIMS(a)[0] == channels)


cdef bint _plain_like(object a, cnp.ndarray x, bint write):
    """Whether `a` is an ndarray of x's shape and dtype (and writeable, if `write`)."""
    cdef cnp.ndarray o
    cdef int d
    if type(a) is not cnp.ndarray:
        return False
    o = <cnp.ndarray>a
    if cnp.PyArray_TYPE(o) != cnp.PyArray_TYPE(x) or not cnp.PyArray_ISNOTSWAPPED(o) \
            or (write and not cnp.PyArray_ISWRITEABLE(o)) \
            or cnp.PyArray_NDIM(o) != cnp.PyArray_NDIM(x):
        return False
    for d in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(o)[d] != cnp.PyArray_DIMS(x)[d]:
            return False
    return True


cdef bint _plain_out(object out, cnp.ndarray x):
    return out is None or _plain_like(out, x, True)


def moments_plain(x, axis, n_threads):
    cdef int ax = _plain_axis(x, axis)
    cdef int nt
    if ax < 0:
        return None
    nt = _plain_threads(n_threads)
    if nt == 0:
        return None
    return _moments(<cnp.ndarray>x, ax, None, nt)


def batch_norm_plain(x, mean, var, gamma, beta, axis, epsilon, out, n_threads):
    cdef int ax = _plain_axis(x, axis)
    cdef int nt
    cdef cnp.npy_intp c
    if ax < 0 or mean is None or var is None or not _plain_eps(epsilon) \
            or not _plain_out(out, <cnp.ndarray>x):
        return None
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[ax]
    if not (_plain_vec(mean, c) and _plain_vec(var, c) and _plain_vec(gamma, c)
            and _plain_vec(beta, c)):
        return None
    nt = _plain_threads(n_threads)
    if nt == 0:
        return None
    return _batch_norm(<cnp.ndarray>x, ax, out, mean, var, gamma, beta, <double>epsilon, nt)


def batch_norm_train_plain(x, gamma, beta, axis, epsilon, out, n_threads):
    cdef int ax = _plain_axis(x, axis)
    cdef int nt
    cdef cnp.npy_intp c
    if ax < 0 or not _plain_eps(epsilon) or not _plain_out(out, <cnp.ndarray>x):
        return None
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[ax]
    if not (_plain_vec(gamma, c) and _plain_vec(beta, c)):
        return None
    nt = _plain_threads(n_threads)
    if nt == 0:
        return None
    return _batch_norm_train(<cnp.ndarray>x, ax, out, None, gamma, beta, <double>epsilon, nt)


def batch_norm_backward_plain(dy, x, mean, var, gamma, axis, epsilon, training, out,
                              n_threads):
    cdef int ax = _plain_axis(x, axis)
    cdef int nt
    cdef cnp.npy_intp c
    if ax < 0 or mean is None or var is None or type(training) is not bool \
            or not _plain_eps(epsilon) or not _plain_out(out, <cnp.ndarray>x) \
            or not _plain_like(dy, <cnp.ndarray>x, False):
        return None
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[ax]
    if not (_plain_vec(mean, c) and _plain_vec(var, c) and _plain_vec(gamma, c)):
        return None
    nt = _plain_threads(n_threads)
    if nt == 0:
        return None
    return _batch_norm_backward(<cnp.ndarray>dy, <cnp.ndarray>x, ax, out, None, mean, var,
                                gamma, <double>epsilon, <bint>training, nt)


# ---------------------------------------------------------------------------------------------
# For the tests
# ---------------------------------------------------------------------------------------------

def moments_in_team(cnp.ndarray x, int axis, int team, int n_threads):
    """For the tests: the moments of float64 `x` (feature axis `axis`) computed by each of
    `team` threads of one OpenMP region, as if called from a caller's own team; returns
    (mean, var), each (team, channels), row t from thread t."""
    cdef bncy_shape sh
    cdef bncy_strides xs
    cdef bint rev = _choose_reversed(x, axis)
    x = _input(np.asarray(x, dtype=np.float64), axis, rev, &sh, &xs)
    cdef cnp.ndarray mean = np.empty((team, sh.chan), dtype=np.float64)
    cdef cnp.ndarray var = np.empty((team, sh.chan), dtype=np.float64)
    cdef int status
    with nogil:
        status = bncy_moments_in_team_f64(<const double *>cnp.PyArray_DATA(x), xs, sh,
                                          <double *>cnp.PyArray_DATA(mean),
                                          <double *>cnp.PyArray_DATA(var), team, n_threads)
    _check(status)
    return mean, var


# ---------------------------------------------------------------------------------------------
# Build and runtime facts
# ---------------------------------------------------------------------------------------------

def openmp_enabled():
    return bool(bncy_openmp_enabled())


def omp_max_threads():
    return bncy_omp_max_threads()


def num_procs():
    return bncy_num_procs()


def simd_level():
    return bncy_simd_level().decode()


def simd_compiled():
    return bncy_simd_compiled().decode().split(",")


def llc_bytes():
    return int(bncy_llc_bytes())


def stream_min_bytes():
    cdef double v = bncy_stream_min_bytes()
    return None if v < 0 else v


def compiler():
    return bncy_compiler().decode()
