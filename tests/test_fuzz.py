"""Fuzzing the public surface with hypothesis: every call matches the oracle or raises
TypeError/ValueError, and never modifies an input.

Functional ops: each example draws one "case" -- a shape (0-size dims included, now and then one
big enough for parallel regions), a feature axis (negative, NumPy ints), a dtype (valid,
byte-swapped, bool/int, or invalid: complex, object, str, bytes, longdouble, datetime, void), a
memory layout (C, F, slices, negative strides, transposes, broadcast views, read-only, nested
lists), values with NaN/Inf/huge (1e38 in float32/bfloat16, 6e4 in float16, 1e150 in
float64)/denormal entries, a mask (bool/int/float weights, extreme scales, all zero, lists),
per-channel parameters (arrays of any real dtype, lists, NaN/Inf entries), epsilon (0 included),
n_threads and an out= array (C/F, or x itself) -- then breaks zero, one or two arguments on
purpose (axis, dtypes, lengths, shapes, mask values, epsilon, n_threads, out= shape/dtype/
read-only/byte order/list, dy), and calls every op on it: moments, batch_norm_train,
batch_norm, batch_norm_backward in both modes, each repeated with n_threads=1, which must give
the same bits. An op whose arguments are all valid must match the float64 oracle
(tests/reference.py) within conftest's tolerances; an op given a broken argument must raise the
exception the contract names (either one when two arguments are broken). Nothing else may
happen: no other exception, no modified input (``out`` excepted), no write into an ``out`` of a
failing call. Warnings bn_cy emits are counted and printed (BN_CY_FUZZ_STRICT_WARNINGS=1 fails
on them).

Layer: random constructor arguments (valid, or one broken), then 1-4 steps of training /
inference calls (masks by either rule, lists, integer and 16-bit inputs, every dtype policy,
renorm) each followed by backward, or a broken call / backward that must raise and leave the
weights as they were; outputs, dx, gradients and weights are compared with
tests/layer_reference.py (a float64 model of Keras's layer).

How results are compared where plain tolerances cannot apply:
* "tainted" channels -- a non-finite value of x with a positive weight, a non-finite parameter,
  or 1/sqrt(variance + epsilon) not finite: the oracle's exact NaN-versus-Inf pattern depends on
  the order of operations, so there the check is by class: where the oracle is finite bn_cy must
  be finite and close, where it is not, bn_cy must not be either;
* results beyond the output dtype's range must come back as +-Inf (within a few ulps of the
  largest value either is accepted);
* "range-limited" channels -- statistics whose sum of squared deviations exceeds the compute
  dtype (float32 for 16/32-bit data), or (epsilon = 0) squared deviations below its smallest
  normal, and backward intermediates beyond it: the variance may be Inf there and y / dx are not
  checked (they are counted and printed);
* results in the subnormal range get an absolute floor of a few subnormal steps scaled by the
  gamma/sqrt(var + eps) and positions that multiply their rounding.

Profiles: by default the fuzz tests run 1500 + 1200 + 1000 examples (about 25,000 calls, about
a minute on two cores; at least 10,000 calls are required). ``BN_CY_FUZZ_EXAMPLES=N`` sets the
examples per test instead (e.g. 20000 for a long run of roughly fifteen minutes on two cores, as
the long profile); the final test then expects proportionally many calls. The number of
examples and calls is printed in the terminal summary. Each run draws new examples
(``BN_CY_FUZZ_DERANDOMIZE=1`` fixes them); a failure prints hypothesis's reproduction blob.
"""

import os
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_cy
from conftest import (
    LAYOUTS,
    apply_layout,
    assert_unchanged,
    check_backward,
    check_stats,
    check_y,
    rel_tol,
    snapshot,
    tiny,
)
from reference import (
    BFLOAT16,
    FLOAT_DTYPES,
    as_f64,
    mask_shape,
    output_dtype,
    ref_batch_norm,
    ref_batch_norm_backward,
    ref_moments,
    stats_dtype,
)

# --------------------------------------------------------------------------------------------
# profile and counters

#: examples per fuzz test by default; the three tests make ~10 calls per example on average
DEFAULT_EXAMPLES = {"valid": 1500, "invalid": 1200, "layer": 1000}
_ENV_EXAMPLES = os.environ.get("BN_CY_FUZZ_EXAMPLES", "").strip()
#: calls the whole module must make when run in full with the default profile
MIN_CALLS = 10_000


def n_examples(kind):
    return int(_ENV_EXAMPLES) if _ENV_EXAMPLES else DEFAULT_EXAMPLES[kind]


def required_calls():
    """MIN_CALLS, scaled to the profile (BN_CY_FUZZ_EXAMPLES)."""
    default_total = sum(DEFAULT_EXAMPLES.values())
    total = sum(n_examples(k) for k in DEFAULT_EXAMPLES)
    return int(MIN_CALLS * total / default_total)


STATS = {"examples": 0, "calls": 0, "errors": 0, "seconds": 0.0, "range_limited": 0}
#: warnings bn_cy emitted during fuzzed calls: message -> count (printed in the summary;
#: BN_CY_FUZZ_STRICT_WARNINGS=1 makes the final test fail on any)
WARNINGS = {}


def _fuzz_settings(kind):
    return settings(
        max_examples=n_examples(kind),
        # BN_CY_FUZZ_DERANDOMIZE=1: the same examples every run (a reproducible CI profile);
        # by default every run draws new ones, and hypothesis prints a failure's blob
        derandomize=os.environ.get("BN_CY_FUZZ_DERANDOMIZE") == "1",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        print_blob=True,
    )


class _SummaryPlugin:
    def pytest_terminal_summary(self, terminalreporter):
        if STATS["examples"]:
            terminalreporter.write_line(
                "bn_cy fuzz: %d examples, %d calls (%d raised TypeError/ValueError as required) "
                "in %.1f s; %d results with channels beyond the compute dtype's range unchecked"
                % (STATS["examples"], STATS["calls"], STATS["errors"], STATS["seconds"],
                   STATS["range_limited"]))
            for key, n in sorted(WARNINGS.items()):
                terminalreporter.write_line("bn_cy fuzz: warning x%d: %s" % (n, key))


@pytest.fixture(scope="module", autouse=True)
def _fuzz_summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("bn_cy_fuzz_summary"):
        pm.register(_SummaryPlugin(), "bn_cy_fuzz_summary")
    yield


@pytest.fixture(autouse=True)
def _timed():
    t0 = time.perf_counter()
    yield
    STATS["seconds"] += time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# one call

_ACCEPTED = (TypeError, ValueError)


def fuzz_call(expected, fn, *args, **kwargs):
    """Call fn; `expected` is None (must succeed) or a tuple of exception classes (must raise one
    of them). Any warning raised inside bn_cy is an error too."""
    STATS["calls"] += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*args, **kwargs)
        except _ACCEPTED as exc:
            if expected is None:
                raise AssertionError("valid call raised %s: %s"
                                     % (type(exc).__name__, exc)) from exc
            if not isinstance(exc, expected):
                raise AssertionError("raised %s (%s), expected %s" % (
                    type(exc).__name__, exc, "/".join(e.__name__ for e in expected))) from exc
            STATS["errors"] += 1
            return exc
        except BaseException as exc:
            raise AssertionError("raised %s (%s): only TypeError/ValueError may escape"
                                 % (type(exc).__name__, exc)) from exc
        finally:
            for w in caught:
                key = "%s: %s (%s:%d)" % (w.category.__name__, w.message,
                                         os.path.basename(w.filename), w.lineno)
                WARNINGS[key] = WARNINGS.get(key, 0) + 1
    if expected is not None:
        raise AssertionError("no exception; expected %s" % "/".join(e.__name__ for e in expected))
    return result


# --------------------------------------------------------------------------------------------
# values

SIZE_CAP = 6000
DIMS = [0, 1, 1, 2, 2, 3, 4, 5, 7, 8]
BIG_DIMS = [17, 64, 129, 1031, 4099]
LARGE_SHAPES = [(40000, 3), (3, 40001), (64, 33, 20), (8, 16, 17, 19), (70001,), (2, 20000, 2)]
VALID_DTYPES = FLOAT_DTYPES + tuple(np.dtype(d) for d in (
    np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64))
SWAPPED_DTYPES = tuple(np.dtype(d) for d in (">f4", ">f8", ">f2", ">i4", "<f4", "<f8"))


def _native(dt):
    return np.dtype(dt).newbyteorder("=")


def huge_value(dt):
    """A large finite value of the dtype (whose square the float64 oracle still holds)."""
    dt = _native(dt)
    if dt == np.float16:
        return 6.0e4
    if dt == np.float32 or dt == BFLOAT16:
        return 1.0e38
    return 1.0e150


def denormal_value(dt):
    dt = _native(dt)
    if dt == BFLOAT16:
        return float(np.finfo(np.float32).smallest_subnormal) * 2**16 * 3
    return float(np.finfo(dt).smallest_subnormal) * 3


def base_values(rng, shape, dt, kind, offset, scale):
    dt_n = _native(dt)
    if dt_n.kind == "b":
        v = rng.random(shape) < 0.5
    elif dt_n.kind in "iu":
        info = np.iinfo(dt_n)
        if kind == "extreme":
            v = rng.choice(np.array([info.min, info.max, 0, 1], dtype=dt_n), shape)
        else:
            lo = 0 if dt_n.kind == "u" else -50
            v = rng.integers(lo, 51, size=shape).astype(dt_n)
    elif kind == "const":
        v = np.full(shape, offset + 0.75 * scale)
    elif kind == "ints":
        v = offset + scale * rng.integers(-2, 3, size=shape)
    else:
        v = offset + scale * rng.standard_normal(shape)
    return np.asarray(v).astype(dt)


def inject(rng, a, specials, dt):
    """Write a few special values into the (C-contiguous, writeable) float array `a`."""
    if a.size == 0 or not specials:
        return a
    flat = a.reshape(-1)
    for s in specials:
        i = rng.integers(flat.size)
        if s == "nan":
            flat[i] = np.nan
        elif s == "inf":
            flat[i] = np.inf
        elif s == "-inf":
            flat[i] = -np.inf
        elif s == "huge":
            flat[i] = huge_value(dt) * rng.choice([-1.0, 1.0])
        elif s == "huge_all":
            flat[:] = huge_value(dt) * rng.choice([-1.0, 1.0], flat.size)
        elif s == "denormal":
            flat[i] = denormal_value(dt) * rng.integers(-3, 4)
        elif s == "denormal_all":
            flat[:] = denormal_value(dt) * rng.integers(-3, 4, flat.size)
    return a


# --------------------------------------------------------------------------------------------
# corruptions: (applies to ops, exception, maker)

OPS = ("moments", "train", "infer", "backward", "backward_infer")
WITH_MASK = ("moments", "train", "backward", "backward_infer")
WITH_PARAMS = ("train", "infer", "backward", "backward_infer")
WITH_STATS = ("infer", "backward", "backward_infer")
WITH_BETA = ("train", "infer")
WITH_OUT = ("train", "infer", "backward", "backward_infer")
BACKWARD = ("backward", "backward_infer")

CORRUPTIONS = {
    # name: (ops, exception)
    "axis_range": (OPS, ValueError),
    "axis_type": (OPS, TypeError),
    "x_dtype": (OPS, TypeError),
    "dy_dtype": (BACKWARD, TypeError),
    "dy_shape": (BACKWARD, ValueError),
    "mean_len": (WITH_STATS, ValueError),
    "variance_len": (WITH_STATS, ValueError),
    "gamma_len": (WITH_PARAMS, ValueError),
    "beta_len": (WITH_BETA, ValueError),
    "mean_dtype": (WITH_STATS, TypeError),
    "gamma_dtype": (WITH_PARAMS, TypeError),
    "mean_none": (WITH_STATS, TypeError),
    "variance_none": (WITH_STATS, TypeError),
    "mask_shape": (WITH_MASK, ValueError),
    "mask_value": (WITH_MASK, ValueError),
    "mask_dtype": (WITH_MASK, TypeError),
    "eps_value": (WITH_PARAMS, ValueError),
    "eps_type": (WITH_PARAMS, TypeError),
    "threads_value": (OPS, ValueError),
    "threads_type": (OPS, TypeError),
    "out_shape": (WITH_OUT, ValueError),
    "out_dtype": (WITH_OUT, ValueError),
    "out_readonly": (WITH_OUT, ValueError),
    "out_list": (WITH_OUT, ValueError),
    "out_swapped": (WITH_OUT, ValueError),
}
#: corruptions that replace x itself (then nothing else is broken)
EXCLUSIVE = {"x_0d": (OPS, ValueError), "x_none": (OPS, TypeError)}

BAD_X_DTYPES = ("complex64", "complex128", "object", "U8", "S8", "longdouble", "datetime64[s]",
                "timedelta64[ms]", "void")


def bad_dtype_array(rng, shape, name):
    if name == "void":
        return np.zeros(shape, dtype=[("a", "f4"), ("b", "i4")])
    if name.startswith(("datetime", "timedelta")):
        return rng.integers(0, 100, size=shape).astype(name)
    base = rng.standard_normal(shape)
    if name == "object":
        return base.astype(object)
    if name in ("U8", "S8"):
        return base.astype("U8").astype(name)
    return base.astype(name)


class Case:
    def __repr__(self):
        keys = ("shape", "axis", "dtype", "layout", "kind", "specials", "dy_specials",
                "mask_kind", "eps", "n_threads", "out_kind", "stats_mode", "corruptions")
        return "Case(%s)" % ", ".join("%s=%r" % (k, getattr(self, k, None)) for k in keys)


@st.composite
def cases(draw, n_corrupt):
    c = Case()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c.rng = rng
    rank = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from(DIMS)) for _ in range(rank)]
    if draw(st.integers(0, 3)) == 0:
        big = draw(st.sampled_from(BIG_DIMS))
        rest = int(np.prod(shape)) if all(shape) else 1
        if big * max(rest, 1) <= SIZE_CAP:
            shape[draw(st.integers(0, rank - 1))] = big
    if draw(st.integers(0, 24)) == 0:
        # now and then an input big enough (>= 32768 elements) for parallel regions
        shape = list(draw(st.sampled_from(LARGE_SHAPES)))
        rank = len(shape)
    c.shape = tuple(shape)
    c.axis = draw(st.integers(-rank, rank - 1))
    if draw(st.integers(0, 5)) == 0:
        c.axis = draw(st.sampled_from([np.int64, np.int32, np.intp]))(c.axis)
    c.dtype = draw(st.sampled_from(VALID_DTYPES + SWAPPED_DTYPES))
    c.layout = draw(st.sampled_from(LAYOUTS + ("readonly", "list")))
    c.kind = draw(st.sampled_from(["normal", "normal", "ints", "const", "extreme"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1.0, 1e3]))
    offset = scale * draw(st.sampled_from([0.0, 0.0, 1.0, -10.0, 1e3]))
    if _native(c.dtype).itemsize == 2 and abs(offset) > 1e3:
        offset = 0.0
    c.specials = []
    if _native(c.dtype).kind == "f" and draw(st.integers(0, 2)) == 0:
        c.specials = draw(st.lists(st.sampled_from(
            ["nan", "inf", "-inf", "huge", "huge", "huge_all", "denormal", "denormal_all"]),
            min_size=1, max_size=3))
    nchan = c.shape[c.axis]

    x = base_values(rng, c.shape, c.dtype, c.kind, offset, scale)
    x = inject(rng, np.array(x), c.specials, c.dtype)
    c.x = _layout(x, c.layout, rng)
    dy_specials = []
    if _native(c.dtype).kind == "f" and draw(st.integers(0, 3)) == 0:
        dy_specials = draw(st.lists(st.sampled_from(["nan", "inf", "huge", "denormal"]),
                                    min_size=1, max_size=2))
    dy_dtype = draw(st.sampled_from([c.dtype, c.dtype, np.float32, np.float64, np.int16]))
    if _native(dy_dtype).kind != "f":
        dy_specials = []
    c.dy_specials = dy_specials
    dy = base_values(rng, c.shape, dy_dtype, "normal", 0.0, 1.0)
    dy = inject(rng, dy, dy_specials, dy_dtype)
    c.dy = _layout(dy, draw(st.sampled_from(LAYOUTS)), rng)

    # mask: none, bool, int or float weights (maybe extreme scales), any layout
    c.mask_kind = draw(st.sampled_from([None, None, "bool", "int", "float", "float_scaled",
                                        "zeros", "list"]))
    c.mask = make_mask(rng, draw, c.mask_kind, mask_shape(c.shape, c.axis))

    # parameters
    c.gamma = make_param(rng, draw, nchan, "gamma")
    c.beta = make_param(rng, draw, nchan, "beta")
    c.eps = draw(st.sampled_from([1e-3, 1e-3, 1e-5, 0.1, 1.0, 0.0, np.float32(1e-3), 0, -0.0]))
    c.n_threads = draw(st.sampled_from([None, None, 1, 2, 3, -1, np.int64(2)]))
    c.stats_mode = draw(st.sampled_from(["oracle", "oracle", "random", "special"]))
    c.out_kind = draw(st.sampled_from([None, None, None, "C", "F", "x"]))

    c.corruptions = []
    if n_corrupt:
        if draw(st.integers(0, 12)) == 0:
            c.corruptions = [draw(st.sampled_from(sorted(EXCLUSIVE)))]
        else:
            c.corruptions = draw(st.lists(st.sampled_from(sorted(CORRUPTIONS)), min_size=1,
                                          max_size=n_corrupt, unique=True))
    c.draw = draw
    return c


def _layout(a, layout, rng):
    if layout == "readonly":
        a = np.array(a)
        a.flags.writeable = False
        return a
    if layout == "list":
        if a.size > 500 or 0 in a.shape or _native(a.dtype) == BFLOAT16 or not a.dtype.isnative:
            return np.array(a)
        return a.tolist()
    return apply_layout(a, layout, rng)


def make_mask(rng, draw, kind, shape):
    if kind is None:
        return None
    if kind == "bool" or kind == "list":
        m = rng.random(shape) < draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
        if kind == "list":
            return m.tolist() if 0 < m.size <= 500 else m
    elif kind == "zeros":
        m = np.zeros(shape, draw(st.sampled_from([np.bool_, np.float32, np.int8])))
    elif kind == "int":
        dt = draw(st.sampled_from([np.int8, np.uint8, np.int32, np.int64, np.uint16]))
        m = rng.integers(0, 4, shape).astype(dt)
    else:
        dt = draw(st.sampled_from([np.float16, np.float32, np.float64] +
                                  ([BFLOAT16] if BFLOAT16 is not None else [])))
        m = rng.choice([0.0, 0.25, 1.0, 2.0, 3.5], shape)
        if kind == "float_scaled":
            dt = np.float64
            m = m * draw(st.sampled_from([1e-300, 1e-40, 1e40, 1e300, 2.0**-1074 * 4]))
        m = m.astype(dt)
    return apply_layout(m, draw(st.sampled_from(LAYOUTS)), rng)


def make_param(rng, draw, nchan, name):
    kind = draw(st.sampled_from([None, "rand", "rand", "list", "f32", "int", "special", "zero"]))
    if kind is None:
        return None
    if name == "gamma":
        v = rng.uniform(-2, 2, nchan)
    else:
        v = rng.normal(0, 2, nchan)
    if kind == "list":
        return v.tolist()
    if kind == "f32":
        return v.astype(draw(st.sampled_from([np.float32, np.float16, ">f8"])))
    if kind == "int":
        return np.round(v).astype(np.int32)
    if kind == "zero":
        return np.zeros(nchan)
    if kind == "special" and nchan:
        v[rng.integers(nchan)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return v


# --------------------------------------------------------------------------------------------
# applying corruptions

def corrupt(c):
    """Apply c.corruptions; fills c.expected[op] with None or a tuple of exception classes."""
    draw, rng = c.draw, c.rng
    expected = {op: set() for op in OPS}
    axis0 = c.axis  # shapes of masks and parameters follow the valid axis
    c.out_override = None
    nd = len(c.shape)
    nchan = c.shape[c.axis]
    for name in c.corruptions:
        ops, exc = (EXCLUSIVE if name in EXCLUSIVE else CORRUPTIONS)[name]
        for op in ops:
            expected[op].add(exc)
        if name == "x_0d":
            c.x = np.array(draw(st.sampled_from([1.5, 0.0, np.nan])))
            c.dy, c.mask = np.array(1.0), None
        elif name == "x_none":
            c.x = None
        elif name == "axis_range":
            c.axis = draw(st.sampled_from([nd, nd + 1, -nd - 1, 2**40, -(2**63)]))
        elif name == "axis_type":
            c.axis = draw(st.sampled_from([1.0, "0", None, True, np.float64(0), [0], (0,)]))
        elif name == "x_dtype":
            c.x = bad_dtype_array(rng, c.shape, draw(st.sampled_from(BAD_X_DTYPES)))
        elif name == "dy_dtype":
            c.dy = bad_dtype_array(rng, c.shape, draw(st.sampled_from(BAD_X_DTYPES)))
        elif name == "dy_shape":
            c.dy = draw(st.sampled_from([
                np.ones(c.shape + (1,)), np.ones(c.shape[:-1]), np.ones((1,) + c.shape),
                np.ones(tuple(d + 1 for d in c.shape))]))
        elif name.startswith("out_"):
            c.out_override = name
        elif name.endswith("_len"):
            pname = name[:-4]
            bad = draw(st.sampled_from(["plus", "minus", "2d", "scalar", "empty2d"]))
            n = nchan + 1 if bad == "plus" or (bad == "minus" and nchan == 0) else nchan - 1
            value = {"plus": lambda: np.ones(n), "minus": lambda: np.ones(n),
                     "2d": lambda: np.ones((1, nchan)), "scalar": lambda: 1.0,
                     "empty2d": lambda: np.ones((nchan, 0))}[bad]()
            setattr(c, {"mean": "bad_mean", "variance": "bad_variance"}.get(pname, pname), value)
        elif name.endswith("_dtype") and name != "mask_dtype":
            pname = name[:-6]
            value = bad_dtype_array(rng, (nchan,), draw(st.sampled_from(
                ["complex64", "object", "U8", "datetime64[s]"])))
            setattr(c, {"mean": "bad_mean"}.get(pname, pname), value)
        elif name == "mean_none":
            c.bad_mean = "none"
        elif name == "variance_none":
            c.bad_variance = "none"
        elif name == "mask_shape":
            ms = list(mask_shape(c.shape, axis0))
            choice = draw(st.integers(0, 3))
            if choice == 0 and ms:
                ms[draw(st.integers(0, len(ms) - 1))] += 1
            elif choice == 1:
                ms = list(c.shape)  # shaped like x
            elif choice == 2 and ms:
                ms = ms[:-1]
            else:
                ms.append(2)
            c.mask = np.ones(ms, bool)
        elif name == "mask_value":
            ms = mask_shape(c.shape, axis0)
            m = np.ones(ms) if c.mask is None else np.array(c.mask, dtype=np.float64, order="C")
            if m.size == 0:
                m = np.ones(ms)
            bad = draw(st.sampled_from([-1.0, -0.5, -1e-300, "nan", "inf", -np.inf, "int"]))
            if m.size == 0:
                # no position to hold a bad value: an empty mask is valid, so break its shape
                c.mask = np.ones(tuple(ms) + (1,))
            elif bad == "int":
                m = m.astype(np.int16)
                m.flat[rng.integers(m.size)] = -1
                c.mask = m
            else:
                m.flat[rng.integers(m.size)] = float(bad)
                c.mask = m.astype(np.float32) if bad in ("nan", "inf") else m
        elif name == "mask_dtype":
            c.mask = bad_dtype_array(rng, mask_shape(c.shape, axis0),
                                     draw(st.sampled_from(["complex128", "object", "U8"])))
        elif name == "eps_value":
            c.eps = draw(st.sampled_from([-1e-3, -1e-300, float("nan"), float("inf"),
                                          np.float32("-inf")]))
        elif name == "eps_type":
            c.eps = draw(st.sampled_from([None, "abc", 1e-3j, [1e-3], np.ones(2)]))
        elif name == "threads_value":
            c.n_threads = 0
        elif name == "threads_type":
            c.n_threads = draw(st.sampled_from([1.5, "2", True, [2], 2.0, np.float32(1)]))
    c.expected = {op: (tuple(sorted(e, key=lambda k: k.__name__)) if e else None)
                  for op, e in expected.items()}
    # x_0d / x_none replace x; two errors of one argument class count as either
    return c


def make_out(c, op, x_arr):
    """The out= argument of an op (None, a fresh array, x itself, or a corrupted one)."""
    shape = c.shape
    odt = output_dtype(x_arr.dtype) if _valid_x(x_arr) else np.dtype(np.float32)
    bad = getattr(c, "out_override", None)
    if bad == "out_shape":
        return np.zeros(shape + (1,) if c.rng.random() < 0.5 else tuple(d + 1 for d in shape), odt)
    if bad == "out_dtype":
        other = np.float64 if odt != np.float64 else np.float32
        return np.zeros(shape, [other, np.int32, np.complex64][c.rng.integers(3)])
    if bad == "out_readonly":
        o = np.zeros(shape, odt)
        o.flags.writeable = False
        return o
    if bad == "out_list":
        return np.zeros(shape, odt).tolist()
    if bad == "out_swapped":
        return np.zeros(shape, odt.newbyteorder(">" if odt.byteorder != ">" else "<"))
    if c.out_kind is None:
        return None
    if c.out_kind == "x":
        return "x"
    return np.zeros(shape, odt, order=c.out_kind)


def alias_copy(c, x_arr):
    """A copy of x with x's memory layout (and writeability), to be passed as x and out."""
    if not isinstance(x_arr, np.ndarray) or x_arr.ndim == 0:
        return None if x_arr is None else np.array(x_arr, copy=True)
    if c.layout in ("broadcast",) or not x_arr.flags.writeable:
        return x_arr  # read-only: the call must fail and cannot write
    if c.layout in ("readonly", "list"):
        return np.array(x_arr, copy=True)
    return apply_layout(np.array(x_arr), c.layout, np.random.default_rng(0))


def _valid_x(x):
    return isinstance(x, np.ndarray) and (x.dtype.kind in "biu"
                                          or _native(x.dtype) in FLOAT_DTYPES)


# --------------------------------------------------------------------------------------------
# oracle comparisons


def oracle_weights(mask):
    """Mask weights for the float64 oracle: scaled so the largest is 1 (scaling does not change
    weighted statistics; it keeps w*x finite for extreme weights)."""
    if mask is None:
        return None
    w = np.asarray(mask).astype(np.float64)
    top = w.max() if w.size else 0.0
    return w / top if top > 0 else w


def tainted_stats_channels(x, axis, w):
    """Channels whose weighted positions hold a non-finite value of x."""
    x64 = np.moveaxis(as_f64(x), axis, -1)
    bad = ~np.isfinite(x64)
    if w is not None:
        bad &= (np.asarray(w) > 0)[..., None]
    nchan = x64.shape[-1]
    return bad.reshape(-1, nchan).any(axis=0) if x64.size else np.zeros(nchan, bool)


def nonfinite_channels(a, axis):
    a64 = np.moveaxis(as_f64(a), axis, -1)
    nchan = a64.shape[-1]
    if not a64.size:
        return np.zeros(nchan, bool)
    return (~np.isfinite(a64)).reshape(-1, nchan).any(axis=0)


def clean_x(x, axis, w):
    """x (float64) with non-finite values at zero-weight positions set to 0 (the contract: masked
    positions do not enter the statistics; the oracle would multiply 0 * inf)."""
    x64 = as_f64(x).copy()
    if w is not None:
        wb = np.expand_dims(np.asarray(w) > 0, axis)
        x64 = np.where(~np.isfinite(x64) & ~wb, 0.0, x64)
    return x64


def fit_overflow(ref, got, dtype):
    """The oracle value as it must come back in `dtype`: beyond the largest finite value it is
    +-Inf; within a few ulps of it either result is accepted (left to the caller as `got`)."""
    dtype = np.dtype(dtype)
    top = float(_finfo(dtype).max)
    ref = np.array(ref, dtype=np.float64)
    slack = 8 * rel_tol(dtype)
    near = np.isfinite(ref) & (np.abs(ref) > top * (1 - slack)) & (np.abs(ref) < top * (1 + slack))
    over = np.isfinite(ref) & (np.abs(ref) >= top * (1 + slack))
    ref[over] = np.copysign(np.inf, ref[over])
    g = as_f64(got)
    ok_near = near & (np.isinf(g) | (np.abs(g) > top * (1 - slack))) & (np.sign(g) == np.sign(ref))
    ref[ok_near] = g[ok_near]
    return ref


def _finfo(dtype):
    if dtype == BFLOAT16:
        import ml_dtypes

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def snap_subnormal(got, ref, dtype, amp=1.0):
    """`got` with results near the subnormal range taken as the oracle's when close to it.

    conftest's absolute floor is one subnormal step; but each product or difference that lands
    in the subnormal range rounds by up to half a step, and the kernels then scale by
    gamma/sqrt(var + eps) and sum over positions. `amp` is (positions + 1) * max|gamma * inv|;
    the floor is 4 * amp subnormal steps, at most 4 times the smallest normal value."""
    dtype = np.dtype(dtype)
    g = as_f64(got).copy()
    r = np.asarray(ref, dtype=np.float64)
    fi = _finfo(dtype)
    floor = min(4 * tiny(dtype) * max(amp, 1.0), 4 * float(fi.smallest_normal))
    with np.errstate(invalid="ignore"):
        near = np.isfinite(r) & (np.abs(g - r) <= floor)
    g[near] = r[near]
    return g.astype(np.dtype(dtype)) if np.dtype(dtype) != np.float64 else g


def subnormal_amp(x64, ax, var, gamma, eps, mean=None):
    """(positions + 1) * max|gamma * inv|, times (1 + max|xhat|)**2 when `mean` is given (the
    backward's xhat * sum(dy * xhat) term scales a subnormal dy that much)."""
    nchan = x64.shape[ax]
    n = x64.size // nchan if nchan else 0
    with np.errstate(all="ignore"):
        v = np.ones(nchan) if var is None else np.asarray(var, np.float64)
        g = np.ones(nchan) if gamma is None else np.abs(np.asarray(gamma, np.float64))
        inv = 1.0 / np.sqrt(v + eps)
        gi = g * inv
        xh = 0.0
        if mean is not None and x64.size:
            xhat = np.abs((x64 - _bcast_ch(mean, x64.ndim, ax)) * _bcast_ch(inv, x64.ndim, ax))
            xhat = xhat[np.isfinite(xhat)]
            xh = xhat.max() if xhat.size else 0.0
    gi = gi[np.isfinite(gi)]
    return (n + 1) * (1.0 + (gi.max() if gi.size else 0.0)) * (1.0 + xh) ** 2


def take(a, idx, axis):
    return None if a is None else np.take(np.asarray(a), idx, axis=axis)


def pcol(p, idx):
    return None if p is None else np.asarray(p, dtype=np.float64)[idx] if np.ndim(p) else p


def check_class(got, ref, dtype, what, scale=0.0):
    """Tainted channels: finite where the oracle is finite (and close: within a few roundings of
    `scale`, the magnitude of the terms that enter each value), non-finite elsewhere."""
    g, r = as_f64(got), np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, (what, g.shape, r.shape)
    fg, fr = np.isfinite(g), np.isfinite(r)
    if not np.array_equal(fg, fr):
        i = tuple(np.argwhere(fg != fr)[0])
        raise AssertionError("%s: finite/non-finite differs at %s: got %r, oracle %r"
                             % (what, i, g[i], r[i]))
    if fr.any():
        with np.errstate(invalid="ignore"):
            tol = 8 * rel_tol(dtype) * (np.abs(r) + scale) + 4 * tiny(dtype)
        bad = fr & ~(np.abs(g - r) <= tol)
        assert not bad.any(), "%s: got %r, oracle %r" % (what, g[bad][:5], r[bad][:5])


def param_taint(nchan, eps, *params, var=None):
    t = np.zeros(nchan, bool)
    for p in params:
        if p is not None:
            t |= ~np.isfinite(np.asarray(p, dtype=np.float64))
    if var is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            inv = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + float(eps))
        t |= ~np.isfinite(inv)
    return t


# --------------------------------------------------------------------------------------------
# running one case

def _ax(c):
    return int(c.axis) % len(c.shape)


def run_case(c):
    STATS["examples"] += 1
    corrupt(c)
    x_arr = c.x if isinstance(c.x, np.ndarray) or c.x is None else np.asarray(c.x)
    args = [c.x, c.dy, c.mask, c.gamma, c.beta]
    before = snapshot(*[a if isinstance(a, np.ndarray) else None for a in args])
    lists_before = [a if not isinstance(a, list) else repr(a) for a in args]

    mean, var = stats_for_backward(c, x_arr)
    results = {}
    for op in OPS:
        results[op] = run_op(c, op, x_arr, mean, var)
    assert_unchanged(before, [a if isinstance(a, np.ndarray) else None for a in args])
    assert [a if not isinstance(a, list) else repr(a) for a in args] == lists_before
    if results["moments"] is not None:  # x, axis, mask and n_threads are valid
        verify(c, x_arr, mean, var, results)


def stats_for_backward(c, x_arr):
    """Per-channel mean/variance for batch_norm and batch_norm_backward (maybe corrupted)."""
    if not _valid_x(x_arr) or x_arr.ndim == 0:
        nchan = 3
    else:
        nchan = x_arr.shape[int(c.axis) % x_arr.ndim] if _is_index(c.axis, x_arr.ndim) else 3
    rng = c.rng
    sdt = stats_dtype(x_arr.dtype) if _valid_x(x_arr) else np.dtype(np.float64)
    if (c.stats_mode == "oracle" and _valid_x(x_arr) and x_arr.ndim
            and _is_index(c.axis, x_arr.ndim) and not c.corruptions):
        w = oracle_weights(c.mask)
        with np.errstate(all="ignore"):
            m, v = ref_moments(clean_x(x_arr, _ax(c), w), c.axis, w)
            m, v = m.astype(sdt), v.astype(sdt)
    else:
        m = rng.normal(0, 3, nchan).astype(sdt)
        v = rng.uniform(0.0, 4.0, nchan).astype(sdt)
        if c.stats_mode == "special" and nchan:
            which = rng.integers(3)
            val = rng.choice([np.nan, np.inf, -np.inf, -0.5, 0.0])
            (m if which == 0 else v)[rng.integers(nchan)] = val
    m = getattr(c, "bad_mean", m)
    v = getattr(c, "bad_variance", v)
    return (None if isinstance(m, str) else m), (None if isinstance(v, str) else v)


def _is_index(axis, nd):
    try:
        a = int(axis) if not isinstance(axis, (bool, float, np.floating, str, list, tuple)) \
            and axis is not None else None
    except TypeError:
        return False
    return a is not None and -nd <= a < nd


def run_op(c, op, x_arr, mean, var):
    out = make_out(c, op, x_arr) if op in WITH_OUT else None
    alias = isinstance(out, str)
    if alias:  # out=x: the in-place form, on a copy of x in the same memory layout
        x_in = alias_copy(c, x_arr)
        out = x_in
        x_saved = snapshot(x_in)
    else:
        x_in = c.x
    exp = c.expected[op]
    if alias and not (_valid_x(x_arr) and x_arr.ndim and x_arr.dtype == output_dtype(x_arr.dtype)
                      and x_arr.flags.writeable):
        # x itself cannot be out (its dtype converts, or it is read-only / a broadcast view)
        exp = tuple(sorted(set(exp or ()) | {ValueError}, key=lambda k: k.__name__))
    kw = dict(n_threads=c.n_threads)
    if op == "moments":
        fn, a = bn_cy.moments, (x_in, c.axis)
        kw.update(mask=c.mask)
    elif op == "train":
        fn, a = bn_cy.batch_norm_train, (x_in, c.gamma, c.beta)
        kw.update(axis=c.axis, epsilon=c.eps, mask=c.mask, out=out)
    elif op == "infer":
        fn, a = bn_cy.batch_norm, (x_in, mean, var, c.gamma, c.beta)
        kw.update(axis=c.axis, epsilon=c.eps, out=out)
    else:
        fn, a = bn_cy.batch_norm_backward, (c.dy, x_in, mean, var, c.gamma)
        kw.update(axis=c.axis, epsilon=c.eps, mask=c.mask, training=op == "backward", out=out)
    res = fuzz_call(exp, fn, *a, **kw)
    if exp is not None:
        if alias:
            assert_unchanged(x_saved, [x_in])
        if isinstance(out, np.ndarray) and out is not x_in and out.flags.writeable \
                and out.dtype.kind != "O":
            assert not np.any(out.astype(np.float64) if out.dtype.kind != "c" else out), \
                "an invalid call wrote into out"
        return None
    first = res[0] if isinstance(res, tuple) else res
    if out is not None:
        assert first is out, "%s did not return out" % op
    if c.n_threads != 1:
        # the same call with one thread: bitwise identical
        x1 = alias_copy(c, x_arr) if alias else x_in
        kw1 = dict(kw, n_threads=1)
        if "out" in kw1 and kw1["out"] is not None:
            # the same output layout (NaN signs may differ between layouts' code paths; the
            # contract's bitwise promise is about thread counts)
            kw1["out"] = x1 if alias else np.zeros_like(kw1["out"])
        a1 = tuple(x1 if v is x_in else v for v in a)
        res1 = fuzz_call(None, fn, *a1, **kw1)
        for p, q in zip(res if isinstance(res, tuple) else (res,),
                        res1 if isinstance(res1, tuple) else (res1,)):
            assert p.dtype == q.dtype and p.shape == q.shape
            assert same_bits_but_nan(p, q), \
                "%s: n_threads=%r and n_threads=1 differ" % (op, c.n_threads)
    return res


def same_bits_but_nan(p, q):
    """Bitwise equal, except that any NaN equals any NaN: the sign of a NaN produced from two
    NaN operands depends on operand order, which the kernels' SIMD code paths choose by the
    alignment of the buffers, not by the thread count."""
    p, q = np.ascontiguousarray(p), np.ascontiguousarray(q)
    if p.tobytes() == q.tobytes():
        return True
    u = np.dtype("u%d" % p.dtype.itemsize)
    differ = p.view(u) != q.view(u)
    both_nan = np.isnan(as_f64(p)) & np.isnan(as_f64(q))
    return not np.any(differ & ~both_nan)


def verify(c, x_arr, mean, var, results):
    ax = _ax(c)
    x64 = as_f64(x_arr)
    nchan = x64.shape[ax]
    odt = output_dtype(x_arr.dtype)
    sdt = stats_dtype(x_arr.dtype)
    w = oracle_weights(c.mask)
    xc = clean_x(x_arr, ax, w)
    # parameters and epsilon are only read for ops that accepted them (then they are valid)
    eps = _try(lambda: float(c.eps))
    gamma = _try(lambda: None if c.gamma is None else np.asarray(c.gamma, dtype=np.float64))
    beta = _try(lambda: None if c.beta is None else np.asarray(c.beta, dtype=np.float64))
    with np.errstate(all="ignore"):
        rm, rv = ref_moments(xc, ax, w)
    taint_x = tainted_stats_channels(x_arr, ax, w)
    idx_all = np.arange(nchan)

    # moments and the statistics of batch_norm_train
    for op in ("moments", "train"):
        res = results[op]
        if res is None:
            continue
        m_got, v_got = (res if op == "moments" else res[1:])
        for name, v in (("mean", m_got), ("variance", v_got)):
            assert v.dtype == sdt and v.shape == (nchan,), (op, name, v.dtype, v.shape)
        ok = ~taint_x
        ii = idx_all[ok]
        if ii.size:
            ref = (fit_overflow(rm[ii], m_got[ii], sdt), fit_overflow(rv[ii], v_got[ii], sdt))
            # a variance whose sum of squares overflows the compute dtype may come back as Inf
            limited = range_limited_forward(x64, ax, rv, w, odt)[ii]
            limited &= as_f64(v_got[ii]) == np.inf
            STATS["range_limited"] += int(limited.any())
            ref[1][limited] = np.inf
            xs = np.take(x_arr if isinstance(x_arr, np.ndarray) else x64, ii, axis=ax)
            check_stats(m_got[ii], v_got[ii], xs, ax, c.mask, ref=ref)
        bad = idx_all[taint_x]
        if bad.size:
            assert not np.any(np.isfinite(as_f64(m_got[bad]))), \
                "%s: mean of a NaN/Inf channel" % op
            assert not np.any(np.isfinite(as_f64(v_got[bad]))), \
                "%s: variance of a NaN/Inf channel" % op

    # y of the training forward (normalized with the oracle's statistics)
    if results["train"] is not None:
        verify_train_y(c, x64, ax, rm, rv, gamma, beta, eps, odt, taint_x, results["train"][0])
    if results["infer"] is not None:
        verify_infer(x64, ax, mean, var, gamma, beta, eps, odt, results["infer"])
    for op in BACKWARD:
        if results[op] is not None:
            verify_backward(c, op, x_arr, x64, ax, mean, var, gamma, eps, w, odt, sdt, results[op])


def _try(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except (TypeError, ValueError):
        return "invalid"


def compute_max(odt):
    """Largest finite value of the compute dtype (float32 for 16/32-bit data)."""
    return float(np.finfo(np.float64 if odt == np.float64 else np.float32).max)


def range_limited_forward(x64, ax, rv, w, odt, eps=None):
    """Channels whose variance lies beyond the compute dtype's range (float32 for 16/32-bit
    data): it comes back Inf and y is 0 * Inf (beta or NaN); or, with epsilon = 0, whose
    variance is below its smallest normal value (0 or inexact, and y is x/0). y is not checked
    there. (Intermediate sums beyond the range are the kernels' business: where the variance
    fits, it and y must be right.)"""
    cdt = np.float64 if odt == np.float64 else np.float32
    rv = np.asarray(rv, np.float64)
    limited = np.isfinite(rv) & (np.abs(rv) > compute_max(odt) / 2)
    if eps is not None and eps == 0:
        limited |= np.isfinite(rv) & (np.abs(rv) < 16 * float(np.finfo(cdt).tiny))
    return limited


def range_limited_backward(dy64, x64, ax, mean, var, gamma, eps, w, odt):
    """Channels where a term of the backward formula lies beyond the compute dtype's range:
    xhat, dy * xhat, sum(dy), sum(dy * xhat) or xhat * sum(dy * xhat) (the oracle's product
    before the factor gamma * inv, which may be 0) beyond half its largest value, or the
    elementwise dx terms gamma * inv * dy and gamma * inv * xhat_i * sum(dy * xhat) / W (and its
    coefficient) beyond 1/64 of it (the kernels group those products in their own order, so an
    intermediate may exceed the result by a few factors), or overflow to Inf from finite inputs;
    or where the variance is +Inf (a
    forward's variance that overflowed: inv = 0 times a sum is 0 or NaN depending on the order
    of operations). There dx, dgamma and dbeta are not checked. (Partial sums beyond the range
    are the kernels' business: where every term and the result fit, they must be right.)"""
    nchan = x64.shape[ax]
    if x64.size == 0:
        return np.zeros(nchan, bool)
    cmax = compute_max(odt) / 2
    n = x64.size // nchan
    total = n if w is None else float(np.sum(np.asarray(w, dtype=np.float64)))
    total = total if total > 0 else 1.0
    with np.errstate(all="ignore"):
        xm = np.moveaxis(x64, ax, -1).reshape(-1, nchan)
        dm = np.moveaxis(dy64, ax, -1).reshape(-1, nchan)
        inv = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
        g = np.ones(nchan) if gamma is None else np.abs(np.asarray(gamma, np.float64))
        xhat = (xm - np.asarray(mean, np.float64)) * inv
        ax_hat = np.abs(xhat).max(axis=0)
        sdyx = np.abs(np.sum(dm * xhat, axis=0))
        sdy = np.abs(np.sum(dm, axis=0))
        coef = g * inv * sdyx / total
        terms = np.maximum.reduce([ax_hat, np.abs(dm * xhat).max(axis=0), sdyx, sdy,
                                   ax_hat * sdyx])
        products = np.maximum.reduce([np.abs(dm).max(axis=0) * g * inv, coef, coef * ax_hat,
                                      g * inv * sdy / total])
        # a term that overflows to Inf from finite inputs (huge x and dy) is beyond the range too
        finite_in = (np.isfinite(xm).all(axis=0) & np.isfinite(dm).all(axis=0)
                     & np.isfinite(np.asarray(mean, np.float64)) & np.isfinite(inv) & np.isfinite(g))
        overflow = finite_in & ~(np.isfinite(terms) & np.isfinite(products))
    return ((np.isfinite(terms) & (terms > cmax))
            | (np.isfinite(products) & (products > cmax / 32))
            | overflow
            | (np.asarray(var, np.float64) == np.inf))


def verify_train_y(c, x64, ax, rm, rv, gamma, beta, eps, odt, taint_x, y):
    nchan = x64.shape[ax]
    with np.errstate(all="ignore"):
        y_ref = ref_batch_norm(x64, rm, rv, gamma, beta, ax, eps)
    assert y.dtype == odt and y.shape == x64.shape
    taint = taint_x | param_taint(nchan, eps, gamma, beta, var=rv)
    limited = range_limited_forward(x64, ax, rv, oracle_weights(c.mask), odt, eps) & ~taint
    if limited.any():
        STATS["range_limited"] += 1
        keep = np.flatnonzero(~limited)
        x64, y, y_ref, taint = (take(x64, keep, ax), take(y, keep, ax), take(y_ref, keep, ax),
                                taint[keep])
        rm, rv, gamma, beta = pcol(rm, keep), pcol(rv, keep), pcol(gamma, keep), pcol(beta, keep)
    compare_y(y, x64, rm, rv, gamma, beta, ax, eps, y_ref, odt, taint, "train y")
    constant_channels_give_beta(c, x64, ax, y, beta, eps, odt, taint)


def verify_infer(x64, ax, mean, var, gamma, beta, eps, odt, y):
    nchan = x64.shape[ax]
    with np.errstate(all="ignore"):
        y_ref = ref_batch_norm(x64, mean, var, gamma, beta, ax, eps)
    taint = param_taint(nchan, eps, mean, gamma, beta, var=var) | nonfinite_channels(x64, ax)
    compare_y(y, x64, mean, var, gamma, beta, ax, eps, y_ref, odt, taint, "batch_norm y")


def verify_backward(c, op, x_arr, x64, ax, mean, var, gamma, eps, w, odt, sdt, res):
    """dx, dgamma, dbeta of one backward mode; dy is converted to x's (output) dtype first."""
    nchan = x64.shape[ax]
    idx_all = np.arange(nchan)
    with np.errstate(all="ignore"):
        dy_eff = as_f64(np.asarray(c.dy).astype(odt))
    training = op == "backward"
    with np.errstate(all="ignore"):
        ref = ref_batch_norm_backward(dy_eff, x64, mean, var, gamma, ax, eps, w, training)
    ref = (fit_overflow(ref[0], res[0], odt), fit_overflow(ref[1], res[1], sdt),
           fit_overflow(ref[2], res[2], sdt))
    taint = (param_taint(nchan, eps, mean, gamma, var=var) | nonfinite_channels(x64, ax)
             | nonfinite_channels(dy_eff, ax))
    if training and w is not None and not np.sum(w) > 0:
        taint[:] = True  # W == 0: dx is NaN everywhere
    limited = range_limited_backward(dy_eff, x64, ax, mean, var, gamma, eps, w, odt)
    STATS["range_limited"] += int(limited.any())
    ok, bad = idx_all[~taint & ~limited], idx_all[taint & ~limited]
    if ok.size:
        sref = (take(ref[0], ok, ax), ref[1][ok], ref[2][ok])
        amp = subnormal_amp(take(x64, ok, ax), ax, pcol(var, ok), pcol(gamma, ok), eps,
                            pcol(mean, ok))
        sub = (snap_subnormal(take(res[0], ok, ax), sref[0], odt, amp),
               snap_subnormal(res[1][ok], sref[1], sdt, amp),
               snap_subnormal(res[2][ok], sref[2], sdt, amp))
        check_backward(sub, take(dy_eff, ok, ax), take(x64, ok, ax), pcol(mean, ok),
                       pcol(var, ok), pcol(gamma, ok), ax, eps, w, training, sref, odt)
    if bad.size:
        xs, dys = take(x64, bad, ax), take(dy_eff, bad, ax)
        s_dx, s_dg, s_db = backward_scales(dys, xs, ax, pcol(mean, bad), pcol(var, bad),
                                           pcol(gamma, bad), eps)
        check_class(take(res[0], bad, ax), take(ref[0], bad, ax), odt, op + " dx", s_dx)
        check_class(res[1][bad], ref[1][bad], sdt, op + " dgamma", s_dg)
        check_class(res[2][bad], ref[2][bad], sdt, op + " dbeta", s_db)


def compare_y(y, x64, mean, var, gamma, beta, ax, eps, y_ref, odt, taint, what):
    nchan = x64.shape[ax]
    idx = np.arange(nchan)
    ok, bad = idx[~taint], idx[taint]
    if ok.size:
        ref = fit_overflow(take(y_ref, ok, ax), take(y, ok, ax), odt)
        amp = subnormal_amp(take(x64, ok, ax), ax, pcol(var, ok), pcol(gamma, ok), eps)
        ys = snap_subnormal(take(y, ok, ax), ref, odt, amp)
        check_y(ys, take(x64, ok, ax), pcol(mean, ok), pcol(var, ok), pcol(gamma, ok),
                pcol(beta, ok), ax, eps, ref, odt)
    if bad.size:
        ys = take(y, bad, ax)
        xs = take(x64, bad, ax)
        with np.errstate(all="ignore"):
            terms = np.abs(ref_batch_norm(xs, pcol(mean, bad), pcol(var, bad), pcol(gamma, bad),
                                          None, ax, eps))
            b = _bcast_ch(np.abs(pcol(beta, bad)) if beta is not None else 0.0, xs.ndim, ax)
        scale = np.where(np.isfinite(terms), terms, 0.0) + np.where(np.isfinite(b), b, 0.0)
        check_class(ys, fit_overflow(take(y_ref, bad, ax), ys, odt), odt, what, scale)


def _bcast_ch(v, ndim, ax):
    v = np.asarray(v, dtype=np.float64)
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[ax] = -1
    return v.reshape(shape)


def _finite_or_0(a):
    return np.where(np.isfinite(a), a, 0.0)


def backward_scales(dy64, x64, ax, mean, var, gamma, eps):
    """Per-element magnitude of the terms of dx, and per-channel ones of dgamma and dbeta
    (non-finite terms left out)."""
    red = tuple(i for i in range(x64.ndim) if i != ax)
    with np.errstate(all="ignore"):
        inv = _bcast_ch(1.0 / np.sqrt(np.asarray(var, np.float64) + eps), x64.ndim, ax)
        g = 1.0 if gamma is None else _bcast_ch(np.abs(np.asarray(gamma, np.float64)),
                                                x64.ndim, ax)
        xhat = np.abs(_finite_or_0((x64 - _bcast_ch(mean, x64.ndim, ax)) * inv))
        ady = np.abs(_finite_or_0(dy64))
        s_db = ady.sum(axis=red)
        s_dg = (ady * xhat).sum(axis=red)
        s_dx = _finite_or_0(g * inv) * (ady + _bcast_ch(s_db, x64.ndim, ax)
                                        + xhat * _bcast_ch(s_dg, x64.ndim, ax))
    return _finite_or_0(s_dx), _finite_or_0(s_dg), _finite_or_0(s_db)


def constant_channels_give_beta(c, x64, ax, y, beta, eps, odt, taint):
    """Contract: a constant channel normalizes to exactly beta (with epsilon > 0)."""
    if eps <= 0 or x64.size == 0 or c.mask_kind in ("zeros",):
        return
    if c.mask is not None and not np.asarray(c.mask).astype(np.float64).sum() > 0:
        return
    cols = np.moveaxis(x64, ax, -1).reshape(-1, x64.shape[ax])
    const = np.all(cols == cols[:1], axis=0) & ~taint
    if not const.any():
        return
    ycols = np.moveaxis(as_f64(y), ax, -1).reshape(-1, x64.shape[ax])
    b = np.zeros(x64.shape[ax]) if beta is None else beta
    want1 = b.astype(odt).astype(np.float64)
    want2 = b.astype(np.float32).astype(odt).astype(np.float64)
    for j in np.flatnonzero(const):
        assert np.all((ycols[:, j] == want1[j]) | (ycols[:, j] == want2[j])), \
            "constant channel %d: y %r, beta %r" % (j, ycols[:3, j], b[j])


# --------------------------------------------------------------------------------------------
# the fuzz tests


@_fuzz_settings("valid")
@given(cases(n_corrupt=0))
def test_fuzz_valid_calls(case):
    """Valid arguments (odd values, layouts, dtypes, masks, out=) -> the oracle's answer."""
    run_case(case)


@_fuzz_settings("invalid")
@given(cases(n_corrupt=2))
def test_fuzz_invalid_arguments(case):
    """One or two broken arguments -> the contract's exception, nothing modified."""
    run_case(case)


# --------------------------------------------------------------------------------------------
# the layer: random constructor arguments (valid and broken), then a few steps of calls and
# backward passes (valid and broken), against tests/layer_reference.py (float64 Keras model)

LAYER_TOL = {"float32": 3e-5, "float64": 1e-10, "float16": 2e-2, "bfloat16": 6e-2}


class LayerCase:
    def __repr__(self):
        keys = ("kwargs", "ctor_error", "shape", "in_dtype", "steps")
        return "LayerCase(%s)" % ", ".join("%s=%r" % (k, getattr(self, k, None)) for k in keys)


@st.composite
def layer_cases(draw):
    c = LayerCase()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c.rng = rng
    rank = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from([1, 2, 3, 4, 5, 8])) for _ in range(rank)]
    if draw(st.integers(0, 4)) == 0 and rank > 1:
        shape[0] = draw(st.sampled_from([0, 64, 300]))
    c.shape = tuple(shape)
    kw = {}
    kw["axis"] = draw(st.integers(-rank, rank - 1))
    kw["momentum"] = draw(st.sampled_from([0.99, 0.9, 0.0, 1.0, 0.5]))
    kw["epsilon"] = draw(st.sampled_from([1e-3, 1e-5, 0.1]))
    kw["center"] = draw(st.booleans())
    kw["scale"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        kw["renorm"] = True
        kw["renorm_clipping"] = draw(st.sampled_from([None, {}, {"rmax": 3.0, "rmin": 1 / 3,
                                                                 "dmax": 5.0}, {"dmax": 0.0}]))
        kw["renorm_momentum"] = draw(st.sampled_from([0.99, 0.5]))
    kw["dtype"] = draw(st.sampled_from(["float32", "float32", "float64", "mixed_float16",
                                        "mixed_bfloat16", None]))
    kw["trainable"] = draw(st.sampled_from([True, True, False]))
    if draw(st.booleans()):
        kw["gamma_initializer"] = draw(st.sampled_from(["ones", "zeros", "random_uniform"]))
        kw["moving_variance_initializer"] = draw(st.sampled_from(["ones", "random_uniform"]))
    c.ctor_error = None
    if draw(st.integers(0, 5)) == 0:
        key, value = draw(st.sampled_from([
            ("axis", 1.5), ("axis", "0"), ("momentum", 1.5), ("momentum", -0.1),
            ("momentum", float("nan")), ("momentum", "0.9"), ("epsilon", 0.0),
            ("epsilon", -1.0), ("epsilon", float("inf")), ("epsilon", None), ("center", 1),
            ("scale", None), ("renorm", "yes"), ("trainable", 0),
            ("renorm_clipping", {"rmax": 1.0, "rmin": 2.0}), ("renorm_clipping", {"bad": 1}),
            ("renorm_clipping", [1.0]), ("renorm_momentum", 2.0), ("dtype", "int8"),
            ("dtype", 3.5), ("gamma_initializer", "no_such"), ("beta_regularizer", "no_such"),
            ("gamma_constraint", 7), ("name", 5)]))
        kw[key] = value
        c.ctor_error = key
    c.kwargs = kw
    c.in_dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16,
                                       np.int16, np.bool_] + ([BFLOAT16] if BFLOAT16 else [])))
    c.steps = [draw(st.sampled_from(["train", "train", "infer", "train_mask", "bad_mask",
                                     "bad_x", "bad_dy", "list_input"]))
               for _ in range(draw(st.integers(1, 4)))]
    c.offset = draw(st.sampled_from([0.0, 2.0, -30.0]))
    return c


def _layer_input(c, shape=None):
    shape = c.shape if shape is None else shape
    dt = np.dtype(c.in_dtype)
    if dt.kind in "biu":
        return base_values(c.rng, shape, dt, "normal", 0.0, 1.0)
    return (c.offset + 1.5 * c.rng.standard_normal(shape)).astype(dt)


def _mask_for(c, ax, keras_rule):
    mshape = c.shape[:-1] if keras_rule else c.shape[:ax] + c.shape[ax + 1:]
    return c.rng.random(mshape) < 0.7


def _ref_weights(layer):
    return {n: np.asarray(w, np.float64) for n, w in zip(layer.weight_names, layer.get_weights())}


def _close(got, ref, tol, what, floor=0.0):
    """|got - ref| <= tol * (|ref| + max|ref| + floor): `floor` is the magnitude of the terms
    that enter the values (which may cancel to 0). In a floating `got`, +-Inf also passes where
    that band reaches beyond the dtype's largest finite value on its side (the value rounds to
    Inf there: a float16 dx of 9e5 is Inf)."""
    dt = np.asarray(got).dtype
    g = as_f64(got)
    r = np.asarray(ref, np.float64)
    assert g.shape == r.shape, (what, g.shape, r.shape)
    fin = np.isfinite(r)
    assert np.array_equal(np.isnan(g), np.isnan(r)), "%s: NaN pattern differs" % what
    if fin.any():
        scale = np.max(np.abs(r[fin])) + floor
        err = np.abs(g[fin] - r[fin])
        band = tol * (np.abs(r[fin]) + scale) + 1e-30
        bad = err > band
        if dt.kind == "f" or (BFLOAT16 is not None and dt == BFLOAT16):
            gf = g[fin]
            bad &= ~(np.isinf(gf) & (np.sign(gf) * r[fin] + band > float(_finfo(dt).max)))
        assert not bad.any(), "%s: got %r, reference %r (tol %g)" % (
            what, g[fin][bad][:4], r[fin][bad][:4], tol)


def run_layer_case(c):
    from layer_reference import ReferenceBN, keras_mask_weights, own_mask_weights

    STATS["examples"] += 1
    kw = c.kwargs
    if c.ctor_error is not None:
        fuzz_call((TypeError, ValueError), bn_cy.BatchNormalization, **kw)
        return
    layer = fuzz_call(None, bn_cy.BatchNormalization, **kw)
    nd = len(c.shape)
    ax = kw["axis"] % nd
    nchan = c.shape[ax]
    policy = kw.get("dtype") or "float32"
    cdt = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(policy, policy)
    cnp = np.dtype(BFLOAT16) if cdt == "bfloat16" else np.dtype(cdt)
    tol = LAYER_TOL[cdt]
    layer.build(c.shape)
    ref = ReferenceBN(nchan, axis=kw["axis"], momentum=kw["momentum"], epsilon=kw["epsilon"],
                      center=kw["center"], scale=kw["scale"], renorm=kw.get("renorm", False),
                      renorm_clipping=kw.get("renorm_clipping"),
                      renorm_momentum=kw.get("renorm_momentum", 0.99), weights=_ref_weights(layer))
    did_forward = False
    # the magnitude of the batch means and standard deviations the moving means were made of:
    # a moving mean that cancels to ~0 over steps keeps an error of ~eps * (|mean| + std)
    # (the batch mean is accurate to a fraction of the batch's std, not of its own value)
    mean_floor = 0.0
    for step in c.steps:
        x = _layer_input(c)
        dy = _layer_input(c).astype(cnp) if np.dtype(c.in_dtype).kind == "f" else \
            c.rng.standard_normal(c.shape).astype(np.float32)
        training = step != "infer"
        mask = None
        if step == "train_mask":
            keras_rule = nd > 1 and (ax == nd - 1 or c.rng.random() < 0.5)
            if nd > 1:
                mask = _mask_for(c, ax, keras_rule)
        before = snapshot(x, dy, mask)
        weights_before = [np.array(w, copy=True) for w in layer.get_weights()]
        if step == "bad_mask":
            bad_mask = np.ones(c.shape + (2,), bool)
            fuzz_call((TypeError, ValueError), layer, x, training=True, mask=bad_mask)
        elif step == "bad_x":
            bad_shape = c.shape[:ax] + (nchan + 1,) + c.shape[ax + 1:]
            fuzz_call((TypeError, ValueError), layer, _layer_input(c, bad_shape), training=True)
        elif step == "bad_dy":
            if not did_forward:
                fuzz_call((TypeError, ValueError), layer.backward, dy)
            else:
                fuzz_call((TypeError, ValueError), layer.backward, np.ones(c.shape + (1,)))
        if step.startswith("bad"):
            assert_unchanged(before, [x, dy, mask])
            for p, q in zip(weights_before, layer.get_weights()):
                assert p.tobytes() == q.tobytes(), "a failing layer call changed the weights"
            continue
        arg = x.tolist() if step == "list_input" and 0 < x.size <= 200 and x.dtype.kind == "f" \
            and np.dtype(c.in_dtype) != BFLOAT16 else x
        y = fuzz_call(None, layer, arg, training=training, mask=mask)
        did_forward = True
        x_eff = np.asarray(arg)
        if x_eff.dtype.kind == "f" or x_eff.dtype == BFLOAT16:
            x_c = x_eff.astype(cnp)
        else:
            x_c = x_eff.astype(np.float32).astype(cnp) if cdt == "float64" else \
                x_eff.astype(np.float32)
        w = None
        if mask is not None:
            w = (keras_mask_weights(mask, c.shape) if mask.shape == c.shape[:-1]
                 else own_mask_weights(mask, c.shape, ax))
        with np.errstate(all="ignore"):
            y_ref = ref.forward(as_f64(x_c), training and kw["trainable"], w)
        assert y.shape == c.shape
        cache = ref.cache
        with np.errstate(all="ignore"):
            if training and kw["trainable"]:
                mean_floor = max(mean_floor, float(np.max(
                    np.abs(_finite_or_0(cache["mean"])) + _finite_or_0(cache["var"]) ** 0.5,
                    initial=0.0)))
            g_inv = _finite_or_0(np.abs(cache["eff_g"] * cache["inv"]))
            y_floor = float(np.max(np.abs(_finite_or_0(y_ref)), initial=0.0)
                            + np.max(g_inv * np.abs(_finite_or_0(cache["var"])) ** 0.5,
                                     initial=0.0))
        if x_eff.dtype.kind in "biu":
            tol = max(tol, LAYER_TOL["float32"])  # integer/bool inputs compute in float32
        _close(y, y_ref, tol, "layer y (%s)" % step, y_floor)
        dx = fuzz_call(None, layer.backward, dy)
        dy_c = as_f64(np.asarray(dy).astype(y.dtype))
        with np.errstate(all="ignore"):
            dx_ref, dg_ref, db_ref = ref.backward(dy_c)
            red = tuple(i for i in range(nd) if i != ax)
            xhat = np.abs(_finite_or_0(cache["xhat"]))
            s_dy = np.abs(dy_c).sum(axis=red)
            s_dyx = (np.abs(dy_c) * xhat).sum(axis=red)
            dx_floor = float(np.max(g_inv, initial=0.0) * (np.max(np.abs(dy_c), initial=0.0)
                             + np.max(s_dy + s_dyx * np.max(xhat, initial=0.0), initial=0.0)))
        # dx has the input's dtype (float32 for integer input): its rounding counts too
        dx_tol = max(tol, LAYER_TOL.get(np.dtype(dx.dtype).name, tol))
        _close(dx, dx_ref, dx_tol, "layer dx (%s)" % step, dx_floor)
        grads = dict(zip(layer.trainable_weight_names, layer.gradients))
        r_abs = 1.0 if cache.get("r") is None else np.abs(cache["r"])
        d_abs = 0.0 if cache.get("d") is None else np.abs(cache["d"])
        if "gamma" in grads:
            _close(grads["gamma"], dg_ref, tol, "layer dgamma",
                   float(np.max(r_abs * s_dyx + d_abs * s_dy, initial=0.0)))
        if "beta" in grads:
            _close(grads["beta"], db_ref, tol, "layer dbeta", float(np.max(s_dy, initial=0.0)))
        for name, got in zip(layer.weight_names, layer.get_weights()):
            # renorm: moving_variance = moving_stddev**2 - epsilon cancels down to ~epsilon
            floor = kw["epsilon"] if kw.get("renorm") else 0.0
            if name in ("moving_mean", "renorm_mean"):
                floor += mean_floor
            _close(got, ref.w[name], max(tol, 3e-5 if cdt != "float64" else tol),
                   "weight %s after %s" % (name, step), floor)
        assert_unchanged(before, [x, dy, mask])


@_fuzz_settings("layer")
@given(layer_cases())
def test_fuzz_layer(case):
    """Layer construction, calls and backward -> the float64 Keras model, or TypeError /
    ValueError for broken arguments with the weights left as they were."""
    run_layer_case(case)


# --------------------------------------------------------------------------------------------
# what the fuzzing found, as deterministic cases


def test_found_float32_huge_values_of_both_signs():
    """+-1e38 in float32: the shifted sums overflowed (mean -inf, variance NaN, y 0)."""
    x = (1e38 * np.array([-1, -1, -1, -1, 1, 1, 1], np.float64)).astype(np.float32)[:, None]
    with np.errstate(over="ignore"):
        mean, var = bn_cy.moments(x, 1)
    assert np.isclose(mean[0], np.float32(-1.4285714e37), rtol=1e-6)
    assert var[0] == np.inf  # 9.8e75 does not fit a float32
    x = np.array([[1e38], [-1e38], [0], [1]], np.float32)
    with np.errstate(over="ignore"):
        y = bn_cy.batch_norm_train(x, axis=1)[0]
    np.testing.assert_allclose(y[:2, 0], [np.sqrt(2), -np.sqrt(2)], rtol=1e-6)


def test_found_float64_backward_with_huge_values():
    """float64 x ~ 1e150: training dx must be 0 for two positions (it came out as
    +-0.9 * inv: the term with inv**3 underflowed)."""
    x = np.array([[1e150], [0.3]])
    dy = np.array([[0.7], [-1.1]])
    dx, dgamma, dbeta = bn_cy.batch_norm_backward(dy, x, x.mean(0), x.var(0), axis=1)
    inv = 1 / np.sqrt(x.var(0) + 1e-3)
    assert np.all(np.abs(dx) <= 1e-12 * inv * np.abs(dy).max()), dx


def test_found_float32_backward_sums_overflow_before_scaling():
    """float32 backward: every term dy * xhat (3e37) and the result dgamma (1.2e38) fit a
    float32, but sum(dy * (x - mean)) (1.2e39) does not: dgamma and the training dx came out
    +-Inf (dx is small here: it would be 0 but for epsilon)."""
    from reference import ref_batch_norm_backward

    x = np.array([[-10.0], [10.0]] * 2, np.float32)
    dy = np.array([[-3e37], [3e37]] * 2, np.float32)
    mean, var = np.zeros(1, np.float32), np.full(1, 100.0, np.float32)
    dx, dgamma, dbeta = bn_cy.batch_norm_backward(dy, x, mean, var)
    rdx, rdg, rdb = ref_batch_norm_backward(dy, x, mean, var)
    np.testing.assert_allclose(dgamma, rdg, rtol=1e-5)
    assert dbeta[0] == 0
    # dx = inv*(dy - xhat*sum(dy*xhat)/W) cancels to ~1e-5 of dy*inv: its error is float32
    # rounding of terms of size |dy|*inv
    np.testing.assert_allclose(dx, rdx, atol=1e-6 * 3e37 / 10)


def test_found_float32_backward_coefficient_underflow():
    """float32, variance ~1e38 and a small gamma: gamma * inv**2 (1e-44) is subnormal in
    float32; a coefficient computed that way loses its digits (dx off by 5% of gamma * inv *
    |dy|), though every value involved and the result are normal floats."""
    x = np.array([[1e19, -1e19, 1e19]], np.float32)
    dy = np.array([[-1.0, 14.0, 41.0]], np.float32)
    mean, var = (a.astype(np.float32) for a in ref_moments(x, 0))
    for g in (1e-3, 1e-6):
        gamma = np.array([g])
        dx = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=0)[0]
        ref = ref_batch_norm_backward(dy, x, mean, var, gamma, 0, 1e-3, None, True)[0]
        scale = g / np.sqrt(float(var[0]) + 1e-3) * 41.0
        assert np.all(np.abs(as_f64(dx) - ref) <= 1e-5 * scale), (g, dx, ref)


def test_found_weighted_constant_channel_variance():
    """A constant channel has variance exactly 0 (and y exactly beta), weights or not."""
    cases = ((37, 1000, 1.0), (15, 1000, 1e-40), (0, 40001, 1.0), (2, 40001, 1e-40))
    for seed, n, scale in cases:
        x = np.full((n, 2), 0.7)
        w = np.random.default_rng(seed).random(n) * scale
        mean, var = bn_cy.moments(x, 1, mask=w)
        assert np.all(mean == 0.7) and np.all(var == 0), (n, scale, mean, var)
        y = bn_cy.batch_norm_train(x, None, [0.25, -2.0], mask=w)[0]
        assert np.all(y == [0.25, -2.0])


def test_fuzz_made_enough_calls(request):
    """Runs last in this module: the profile made at least MIN_CALLS calls (when every fuzz test
    of the module ran in this session)."""
    mine = [it for it in request.session.items if it.module is request.module
            and it.name.startswith("test_fuzz_") and it.name != request.node.name]
    names = {it.name for it in mine}
    expected = {n for n in dir(request.module) if n.startswith("test_fuzz_")
                and n != request.node.name}
    print("bn_cy fuzz: %d examples, %d calls" % (STATS["examples"], STATS["calls"]))
    if names != expected:
        pytest.skip("only part of the fuzz module ran (%s)" % sorted(names))
    if os.environ.get("BN_CY_FUZZ_STRICT_WARNINGS") == "1":
        assert not WARNINGS, "bn_cy emitted warnings: %s" % WARNINGS
    assert STATS["calls"] >= required_calls(), \
        "the fuzz profile made %d calls, fewer than %d" % (STATS["calls"], required_calls())


def test_found_masked_position_with_overflowing_statistics_term():
    """A masked-out position is not in the statistics: its dx is gamma * inv * dy exactly, even
    where its own statistics term (xhat * sum(dy * xhat) / W) overflows (0 * Inf must not make
    it NaN). Found by the fuzz suite: x = [-1e150, -1.3e-4], mask = [0, 3]."""
    x = np.array([[[-1e150, -0.00013210486329130188]]])
    dy = np.array([[[-43.0, -49.0]]])
    mean, var = np.array([-0.00013210486329130188]), np.array([0.0])
    mask = np.array([[0, 3]])
    dx = bn_cy.batch_norm_backward(dy, x, mean, var, axis=0, epsilon=1e-5, mask=mask)[0]
    ref = ref_batch_norm_backward(dy, x, mean, var, None, 0, 1e-5, mask, True)[0]
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, ref, rtol=1e-12)


def test_found_moving_mean_cancelling_to_zero():
    """A float32 batch mean is accurate to a fraction of eps * std, not of eps * |mean|: the
    deviations from the shift are rounded in float32. Two steps of momentum 0.5 whose means
    -2/3 and 1/3 cancel in the moving mean leave ~6e-7 there (the float64 answer is 0), which
    the layer check once compared against a tolerance that had no such term. Found by the fuzz
    suite (int16 input of shape (1, 1, 1, 3), renorm, axis=0)."""
    x = np.array([-34, -5, 37], np.float32)
    std = float(np.std(x.astype(np.float64)))
    mean, var = bn_cy.moments(x[:, None], 1)
    assert abs(float(mean[0]) + 2 / 3) <= 2 * np.finfo(np.float32).eps * std
    np.testing.assert_allclose(var, [np.var(x.astype(np.float64))], rtol=1e-6)
    c = LayerCase()
    c.rng, c.shape, c.in_dtype, c.offset = np.random.default_rng(961), (1, 1, 1, 3), np.int16, 0.0
    c.kwargs = {"axis": 0, "momentum": 0.5, "epsilon": 0.001, "center": False, "scale": False,
                "renorm": True, "renorm_clipping": None, "renorm_momentum": 0.99,
                "dtype": "float32", "trainable": True}
    c.ctor_error, c.steps = None, ["train", "train"]
    run_layer_case(c)


def test_found_subnormal_deviations_dgamma():
    """float64 x of subnormals (deviations of a few units of 2**-1074) with a dy of 1e150:
    dgamma = sum(dy * (x - mean)) / sqrt(var + eps) is a normal number, -4.6871e-172. The oracle
    took it as sum(dy * xhat) with xhat subnormal itself, which had lost three digits
    (-4.6936e-172), and failed bn_cy's exact answer. Found by the fuzz suite."""
    from fractions import Fraction

    unit = np.float64(5e-324)
    x = (np.array([-9.0, -6.0, 6.0]) * unit)[:, None]
    dy = np.array([0.36159505490948474, 1e150, 0.94708096312924217])[:, None]
    mean, var = np.array([-3 * unit]), np.array([0.0])
    sd = np.sqrt(1e-3)
    exact = sum(Fraction(float(g)) * (Fraction(float(v)) - Fraction(float(mean[0])))
                for g, v in zip(dy[:, 0], x[:, 0])) / Fraction(float(sd))
    dgamma = bn_cy.batch_norm_backward(dy, x, mean, var, axis=1)[1]
    ref = ref_batch_norm_backward(dy, x, mean, var, None, 1, 1e-3, None, True)[1]
    np.testing.assert_allclose(dgamma, [float(exact)], rtol=1e-15)
    np.testing.assert_allclose(ref, [float(exact)], rtol=1e-15)
