"""The bad-input table of bn_cy's public API, as data: every bad argument, the exact exception it
raises and a phrase its message contains.

tests/test_bad_inputs.py drives every row (and checks that no input or layer state changed), and
docs/bad_inputs.md -- the table the README shows -- is rendered from it:

    python tests/bad_inputs.py > docs/bad_inputs.md

(a test fails when the file and this data disagree). Each row: where (the functions or methods
it applies to), the argument, the bad input in words, the exception class (exactly that class;
bn_cy.layer.ArgumentTypeError is a subclass of both TypeError and ValueError, NoForwardError of
RuntimeError and ValueError), the phrase, and how to make the bad call from valid arguments.
"""

import sys
from collections import namedtuple

import numpy as np

OPS = ("moments", "batch_norm", "batch_norm_train", "batch_norm_backward")
ALL = OPS
PARAMS = OPS[1:]  # ops with epsilon and out=
STATS = ("batch_norm", "batch_norm_backward")  # ops taking mean and variance
MASKED = ("moments", "batch_norm_train", "batch_norm_backward")
C = 4  # channels of the base input


def base_args():
    """Valid arguments: a (6, 5, 4) float32 input, feature axis -1 (C = 4)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, C)).astype(np.float32)
    return dict(
        x=x,
        dy=rng.standard_normal(x.shape).astype(np.float32),
        mean=np.zeros(C, np.float32),
        variance=np.ones(C, np.float32),
        gamma=np.full(C, 1.5),
        beta=np.full(C, 0.5),
        axis=-1,
        epsilon=1e-3,
        mask=np.ones((6, 5), bool),
        out=None,
        n_threads=None,
    )


def op_call(op, a):
    """(function, args, kwargs) of one functional op from the argument dict `a`."""
    import bn_cy

    common = dict(n_threads=a["n_threads"])
    if "comm" in a:
        common["comm"] = a["comm"]
    if op == "moments":
        return bn_cy.moments, (a["x"], a["axis"]), dict(common, mask=a["mask"])
    if op == "batch_norm":
        common.pop("comm", None)
        return bn_cy.batch_norm, (a["x"], a["mean"], a["variance"], a["gamma"], a["beta"]), dict(
            common, axis=a["axis"], epsilon=a["epsilon"], out=a["out"])
    if op == "batch_norm_train":
        return bn_cy.batch_norm_train, (a["x"], a["gamma"], a["beta"]), dict(
            common, axis=a["axis"], epsilon=a["epsilon"], mask=a["mask"], out=a["out"])
    return bn_cy.batch_norm_backward, (a["dy"], a["x"], a["mean"], a["variance"], a["gamma"]), \
        dict(common, axis=a["axis"], epsilon=a["epsilon"], mask=a["mask"], out=a["out"])


# --------------------------------------------------------------------------------------------
# value makers (each gets the valid arguments, already changed by the entries before it)


def _readonly(shape, dtype=np.float32):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


def _mask_with(value, dtype=np.float64):
    def make(a):
        m = np.ones((6, 5), dtype)
        m[1, 2] = value
        return m
    return make


def _bad_dtype(dtype):
    return lambda a: a["x"].astype(dtype)


class _NotAComm:
    pass


# --------------------------------------------------------------------------------------------
# the table

Row = namedtuple("Row", "where argument bad exception phrase changes call")
Row.__new__.__defaults__ = (None, None)  # changes (functional ops) or call (everything else)


def ops_row(ops, argument, bad, exception, phrase, **changes):
    """A row for functional ops: `changes` replace entries of base_args() (callables get the
    arguments as changed so far)."""
    return Row(ops, argument, bad, exception, phrase, changes=changes)


def call_row(where, argument, bad, exception, phrase, call):
    """A row for anything else: call(a) -> (function, args, kwargs, objects whose state must not
    change) where `a` is base_args()."""
    return Row(where, argument, bad, exception, phrase, call=call)


def _functional_rows():
    X, AX, M, E, O, T = "x", "axis", "mask", "epsilon", "out", "n_threads"
    rows = [
        # x (and dy)
        ops_row(ALL, X, "0-d array (a scalar)", ValueError, "x must have at least one dimension",
                x=np.array(1.5, np.float32), dy=np.array(1.0, np.float32), mask=None),
        ops_row(ALL, X, "complex dtype", TypeError,
                "x must be a real floating, integer or bool array", x=_bad_dtype(np.complex64)),
        ops_row(ALL, X, "object dtype (also None, or a list of non-numbers)", TypeError,
                "x must be a real floating, integer or bool array", x=_bad_dtype(object)),
        ops_row(ALL, X, "string dtype", TypeError,
                "x must be a real floating, integer or bool array", x=_bad_dtype("U8")),
        ops_row(ALL, X, "datetime64 / timedelta64 dtype", TypeError,
                "x must be a real floating, integer or bool array",
                x=lambda a: np.zeros(a["x"].shape, "datetime64[s]")),
        ops_row(ALL, X, "structured (void) dtype", TypeError,
                "x must be a real floating, integer or bool array",
                x=lambda a: np.zeros(a["x"].shape, [("a", "f4")])),
        ops_row(ALL, X, "longdouble dtype", TypeError,
                "bn_cy computes in float16, bfloat16, float32 or float64",
                x=_bad_dtype(np.longdouble)),
        ops_row(ALL, X, "ragged nested list", TypeError, "x must be array-like",
                x=[[1.0, 2.0], [3.0]], dy=[[1.0, 2.0], [3.0]], mask=None),
        ops_row(("batch_norm_backward",), "dy", "ragged nested list", TypeError,
                "dy must be array-like", dy=[[1.0, 2.0], [3.0]]),
        ops_row(("batch_norm_backward",), "dy", "complex dtype", TypeError,
                "dy must be a real floating, integer or bool array",
                dy=lambda a: a["dy"].astype(np.complex128)),
        ops_row(("batch_norm_backward",), "dy", "shape different from x's", ValueError,
                "dy must have the shape of x", dy=lambda a: a["dy"][:, :-1]),
        ops_row(("batch_norm_backward",), "dy", "transposed (same size, other shape)",
                ValueError, "dy must have the shape of x", dy=lambda a: a["dy"].T),
        # axis
        ops_row(ALL, AX, "out of range (>= rank)", ValueError,
                "is out of range for an input of rank", axis=3),
        ops_row(ALL, AX, "out of range (< -rank)", ValueError,
                "is out of range for an input of rank", axis=-4),
        ops_row(ALL, AX, "1 for a rank-1 x", ValueError, "is out of range for an input of rank",
                x=np.arange(4.0, dtype=np.float32), dy=np.arange(4.0, dtype=np.float32),
                mask=None, axis=1),
        ops_row(ALL, AX, "float (also a NumPy float)", TypeError, "axis must be an int",
                axis=1.0),
        ops_row(ALL, AX, "string", TypeError, "axis must be an int", axis="1"),
        ops_row(ALL, AX, "None", TypeError, "axis must be an int", axis=None),
        ops_row(ALL, AX, "bool", TypeError, "axis must be an int", axis=True),
        ops_row(ALL, AX, "tuple of ints", TypeError, "axis must be an int", axis=(0, 1)),
        # per-channel parameters
        ops_row(STATS, "mean", "None", TypeError, "mean must be an array of per-channel means",
                mean=None),
        ops_row(STATS, "variance", "None", TypeError,
                "variance must be an array of per-channel variances", variance=None),
    ]
    for name, ops in (("mean", STATS), ("variance", STATS), ("gamma", PARAMS),
                      ("beta", ("batch_norm", "batch_norm_train"))):
        shape_phrase = "%s must have shape (%d,)" % (name, C)
        rows += [
            ops_row(ops, name, "length != x.shape[axis]", ValueError, shape_phrase,
                    **{name: np.ones(C + 1)}),
            ops_row(ops, name, "2-D, e.g. shape (C, 1)", ValueError, shape_phrase,
                    **{name: np.ones((C, 1))}),
            ops_row(ops, name, "a scalar", ValueError, shape_phrase, **{name: 1.0}),
            ops_row(ops, name, "complex, string or object values", TypeError,
                    "%s must be a real numeric array" % name,
                    **{name: np.ones(C, np.complex64)}),
            ops_row(ops, name, "ragged nested sequence", TypeError,
                    "%s must be array-like" % name, **{name: [[1.0, 2.0], [3.0], 4.0, 5.0]}),
        ]
    rows += [
        # mask
        ops_row(MASKED, M, "shape != x.shape without the feature axis", ValueError,
                "mask must have shape (6, 5)", mask=np.ones((5, 6), bool)),
        ops_row(MASKED, M, "ragged nested list", TypeError, "mask must be array-like",
                mask=[[True, False], [True]]),
        ops_row(MASKED, M, "shaped like x", ValueError, "mask must have shape (6, 5)",
                mask=lambda a: np.ones(a["x"].shape, bool)),
        ops_row(MASKED, M, "complex, string or object values", TypeError,
                "mask must be a bool or real numeric array", mask=np.ones((6, 5), np.complex64)),
        ops_row(MASKED, M, "a negative float weight", ValueError, "mask weights must be >= 0",
                mask=_mask_with(-0.5)),
        ops_row(MASKED, M, "a tiny negative weight (-1e-300, 0 in float32)", ValueError,
                "mask weights must be >= 0", mask=_mask_with(-1e-300)),
        ops_row(MASKED, M, "a negative integer weight", ValueError, "mask weights must be >= 0",
                mask=_mask_with(-1, np.int16)),
        ops_row(MASKED, M, "a NaN weight", ValueError, "mask weights must be finite",
                mask=_mask_with(np.nan, np.float32)),
        ops_row(MASKED, M, "an infinite weight", ValueError, "mask weights must be finite",
                mask=_mask_with(np.inf)),
        # epsilon
        ops_row(PARAMS, E, "negative", ValueError, "epsilon must be finite and >= 0",
                epsilon=-1e-5),
        ops_row(PARAMS, E, "NaN", ValueError, "epsilon must be finite and >= 0",
                epsilon=float("nan")),
        ops_row(PARAMS, E, "infinite", ValueError, "epsilon must be finite and >= 0",
                epsilon=float("inf")),
        ops_row(PARAMS, E, "None", TypeError, "epsilon must be a real number", epsilon=None),
        ops_row(PARAMS, E, "a non-numeric string", TypeError, "epsilon must be a real number",
                epsilon="small"),
        ops_row(PARAMS, E, "complex", TypeError, "epsilon must be a real number",
                epsilon=1e-3j),
        # out
        ops_row(PARAMS, O, "read-only array", ValueError, "out is read-only",
                out=lambda a: _readonly(a["x"].shape)),
        ops_row(PARAMS, O, "x itself when x is read-only (e.g. a broadcast view)", ValueError,
                "out is read-only",
                x=lambda a: np.broadcast_to(a["x"][:1], a["x"].shape),
                out=lambda a: a["x"]),
        ops_row(PARAMS, O, "wrong shape", ValueError, "out must have shape",
                out=lambda a: np.zeros(a["x"].shape[:-1] + (C + 1,), np.float32)),
        ops_row(PARAMS, O, "wrong dtype (float64 for float32 x)", ValueError,
                "out must have dtype float32", out=lambda a: np.zeros(a["x"].shape)),
        ops_row(PARAMS, O, "x's dtype when x is an integer array (y is float32)", ValueError,
                "out must have dtype float32",
                x=lambda a: np.ones(a["x"].shape, np.int64),
                dy=lambda a: np.ones(a["x"].shape, np.float32),
                out=lambda a: np.zeros(a["x"].shape, np.int64)),
        ops_row(PARAMS, O, "non-native byte order", ValueError, "out must have dtype",
                out=lambda a: np.zeros(a["x"].shape, ">f4")),
        ops_row(PARAMS, O, "a list (not an ndarray)", ValueError, "out must be a NumPy array",
                out=lambda a: np.zeros(a["x"].shape).tolist()),
        # n_threads
        ops_row(ALL, T, "0", ValueError, "n_threads must be a positive or negative int, not 0",
                n_threads=0),
        ops_row(ALL, T, "float (also 2.0)", TypeError, "n_threads must be an int or None",
                n_threads=2.0),
        ops_row(ALL, T, "string", TypeError, "n_threads must be an int or None",
                n_threads="2"),
        ops_row(ALL, T, "bool", TypeError, "n_threads must be an int or None", n_threads=True),
        ops_row(ALL, T, "beyond a C int (2**31)", ValueError, "n_threads must be at most",
                n_threads=2**31),
        # comm
        ops_row(MASKED, "comm", "not an mpi4py communicator", TypeError,
                "comm must be an mpi4py communicator", comm=_NotAComm()),
    ]
    import bn_cy

    rows += [
        call_row(("set_num_threads",), "n", "0", ValueError,
                 "n must be a positive or negative int, not 0",
                 lambda a: (bn_cy.set_num_threads, (0,), {}, [])),
        call_row(("set_num_threads",), "n", "float or string", TypeError,
                 "n must be an int or None",
                 lambda a: (bn_cy.set_num_threads, (1.5,), {}, [])),
        call_row(("set_num_threads",), "n", "beyond a C int (2**31)", ValueError,
                 "n must be at most",
                 lambda a: (bn_cy.set_num_threads, (2**31,), {}, [])),
    ]
    return rows


# --------------------------------------------------------------------------------------------
# the layer

def _layer_rows():
    import bn_cy

    if not hasattr(bn_cy, "BatchNormalization"):
        return []
    from bn_cy.layer import ArgumentTypeError, NoForwardError

    BN = bn_cy.BatchNormalization
    ATE = ArgumentTypeError
    where_ctor = ("BatchNormalization()",)

    def ctor(**kw):
        return lambda a: (BN, (), kw, [])

    def built(a, **kw):
        layer = BN(**kw)
        layer(a["x"], training=True)
        return layer

    def on_layer(method, make_args, training=True, forward=True):
        def call(a):
            layer = built(a) if forward else BN()
            args, kw = make_args(a)
            return getattr(layer, method), args, kw, [layer]
        return call

    rows = [
        call_row(where_ctor, "axis", "float or bool", ATE, "axis must be an int", ctor(axis=1.5)),
        call_row(where_ctor, "momentum", "outside [0, 1]", ValueError,
                 "momentum must be in [0, 1]", ctor(momentum=1.5)),
        call_row(where_ctor, "momentum", "NaN or infinite", ValueError,
                 "momentum must be finite", ctor(momentum=float("nan"))),
        call_row(where_ctor, "momentum", "not a real number", ATE,
                 "momentum must be a real number", ctor(momentum="0.9")),
        call_row(where_ctor, "epsilon", "0 or negative", ValueError, "epsilon must be > 0",
                 ctor(epsilon=0.0)),
        call_row(where_ctor, "epsilon", "infinite or NaN", ValueError,
                 "epsilon must be finite", ctor(epsilon=float("inf"))),
        call_row(where_ctor, "epsilon", "not a real number", ATE,
                 "epsilon must be a real number", ctor(epsilon="1e-3")),
    ]
    rows += [
        call_row(where_ctor, flag, "not a bool (e.g. 1, None, \"yes\")", ATE,
                 "%s must be a bool" % flag, ctor(**{flag: bad}))
        for flag, bad in (("center", 1), ("scale", None), ("renorm", "yes"),
                          ("synchronized", 1), ("trainable", "no"),
                          ("skip_nonfinite_updates", 0))
    ]
    rows += [
        call_row(where_ctor, "renorm_clipping", "not a dict", ATE,
                 "renorm_clipping must be a dict", ctor(renorm=True, renorm_clipping=[3.0])),
        call_row(where_ctor, "renorm_clipping", "a key other than rmax, rmin, dmax", ValueError,
                 "renorm_clipping has invalid keys",
                 ctor(renorm=True, renorm_clipping={"r_max": 3.0})),
        call_row(where_ctor, "renorm_clipping", "rmax < rmin", ValueError,
                 "rmax must be >= rmin",
                 ctor(renorm=True, renorm_clipping={"rmax": 1.0, "rmin": 2.0})),
        call_row(where_ctor, "renorm_clipping", "dmax < 0", ValueError, "dmax must be >= 0",
                 ctor(renorm=True, renorm_clipping={"dmax": -1.0})),
        call_row(where_ctor, "renorm_clipping", "a NaN value", ValueError, "must not be NaN",
                 ctor(renorm=True, renorm_clipping={"rmax": float("nan")})),
        call_row(where_ctor, "renorm_clipping", "a non-numeric value", ATE,
                 "must be a real number or None",
                 ctor(renorm=True, renorm_clipping={"dmax": "5"})),
        call_row(where_ctor, "renorm_momentum", "outside [0, 1]", ValueError,
                 "renorm_momentum must be in [0, 1]", ctor(renorm=True, renorm_momentum=-0.1)),
        call_row(where_ctor, "dtype", "an unsupported policy name (e.g. \"int32\")", ValueError,
                 "is not a supported dtype policy", ctor(dtype="int32")),
        call_row(where_ctor, "dtype", "not a policy, name or dtype", ATE,
                 "dtype must be a dtype policy name", ctor(dtype=3.5)),
        call_row(where_ctor, "*_initializer", "an unknown identifier", ValueError,
                 "could not interpret initializer identifier",
                 ctor(gamma_initializer="no_such_initializer")),
        call_row(where_ctor, "*_regularizer", "an unknown identifier", ValueError,
                 "could not interpret regularizer identifier",
                 ctor(beta_regularizer="no_such_regularizer")),
        call_row(where_ctor, "*_constraint", "an unknown identifier", ValueError,
                 "could not interpret constraint identifier",
                 ctor(gamma_constraint="no_such_constraint")),
        call_row(where_ctor, "name", "not a string", ATE, "name must be a string",
                 ctor(name=5)),
        call_row(where_ctor, "moving_variance_estimator", "not \"biased\" or \"unbiased\"",
                 ValueError, "moving_variance_estimator must be", ctor(
                     moving_variance_estimator="sample")),
        call_row(where_ctor, "virtual_batch_size", "< 1", ValueError,
                 "virtual_batch_size must be >= 1", ctor(virtual_batch_size=0)),
        call_row(where_ctor, "(any)", "an unknown keyword (e.g. Keras 2's fused)", TypeError,
                 "unexpected keyword argument", ctor(fused=True)),
        # call
        call_row(("layer(inputs)",), "inputs", "complex, string or object dtype", ATE,
                 "inputs must be a real floating, integer or bool array",
                 lambda a: (BN(), (a["x"].astype(np.complex64),), {}, [])),
        call_row(("layer(inputs)",), "inputs", "0-d", ValueError,
                 "inputs must have at least one dimension",
                 lambda a: (BN(), (np.float32(1.0),), {}, [])),
        call_row(("layer(inputs)",), "inputs", "rank too small for axis", ValueError,
                 "is out of range for inputs of rank",
                 lambda a: (BN(axis=3), (a["x"],), {}, [])),
        call_row(("layer(inputs)",), "inputs", "feature size differs from the built one",
                 ValueError, "expects axis -1 of its input to have size 4",
                 lambda a: _layer_call(built(a), a["x"][..., :3], training=True)),
        call_row(("layer(inputs)",), "inputs", "rank differs from the built one", ValueError,
                 "was built for inputs of rank 3",
                 lambda a: _layer_call(built(a), a["x"][0], training=False)),
        call_row(("layer(inputs)",), "mask", "shape fits neither mask rule", ValueError,
                 "mask must have shape",
                 lambda a: _layer_call(built(a), a["x"], training=True,
                                       mask=np.ones((5, 6), bool))),
        call_row(("layer(inputs)",), "mask", "complex or string dtype", ATE,
                 "mask must hold real numbers",
                 lambda a: _layer_call(built(a), a["x"], training=True,
                                       mask=np.ones((6, 5), np.complex64))),
        # backward
        call_row(("layer.backward(dy)",), "(call order)", "before any forward call",
                 NoForwardError, "backward() needs a forward call first",
                 lambda a: _method(BN(), "backward", a["dy"])),
        call_row(("layer.backward(dy)",), "dy", "shape different from the input's", ValueError,
                 "dy must have the shape of the layer's output",
                 lambda a: _method(built(a), "backward", a["dy"][:, :2])),
        call_row(("layer.backward(dy)",), "dy", "complex or string dtype", ATE,
                 "dy must hold real numbers",
                 lambda a: _method(built(a), "backward", a["dy"].astype(np.complex64))),
        # weights and config
        call_row(("layer(inputs)",), "moving_mean", "replaced by one of the wrong shape",
                 ValueError, "moving_mean of layer 'batch_normalization' must have shape (4,)",
                 lambda a: _method(_replaced(built(a, name="batch_normalization"),
                                             "moving_mean", np.zeros(3, np.float32)),
                                   "__call__", a["x"])),
        call_row(("layer(inputs, training=True)",), "moving_variance",
                 "replaced by a list (not updatable in place)", ATE,
                 "moving_variance of layer 'batch_normalization' must be a NumPy array",
                 lambda a: _training_call(_replaced(built(a, name="batch_normalization"),
                                                    "moving_variance", [1.0] * C), a["x"])),
        call_row(("layer.set_weights(w)",), "w", "wrong number of arrays", ValueError,
                 "got 1 weights, but the layer has 4",
                 lambda a: _method(built(a), "set_weights", [np.ones(C)])),
        call_row(("layer.set_weights(w)",), "w", "an array of the wrong shape", ValueError,
                 "has shape (4,), got shape (3,)",
                 lambda a: _method(built(a), "set_weights", [np.ones(3)] * 4)),
        call_row(("layer.set_weights(w)",), "w", "complex values", ATE,
                 "must hold real numbers",
                 lambda a: _method(built(a), "set_weights", [np.ones(C, np.complex64)] * 4)),
        call_row(("BatchNormalization.from_config(c)",), "c", "not a dict", ATE,
                 "config must be a dict", lambda a: (BN.from_config, (5,), {}, [])),
        call_row(("BatchNormalization.from_config(c)",), "c", "an unknown key", ValueError,
                 "unknown BatchNormalization config keys",
                 lambda a: (BN.from_config, ({"axis": -1, "no_such_key": 1},), {}, [])),
        call_row(("BatchNormalization.from_config(c)",), "c",
                 "Keras 2's adjustment (a function)", ValueError,
                 "adjustment functions are not supported",
                 lambda a: (BN.from_config, ({"adjustment": len},), {}, [])),
    ]
    return rows


def _layer_call(layer, x, **kw):
    return layer, (x,), kw, [layer]


def _replaced(layer, name, value):
    setattr(layer, name, value)
    return layer


def _training_call(layer, x):
    return layer, (x,), {"training": True}, [layer]


def _method(layer, name, *args):
    return getattr(layer, name), args, {}, [layer]


def rows():
    """Every row of the table (the layer's only when bn_cy exports BatchNormalization)."""
    return _functional_rows() + _layer_rows()


# --------------------------------------------------------------------------------------------
# markdown


def exception_name(exc):
    if exc.__module__ == "builtins":
        return exc.__name__
    bases = "+".join(b.__name__ for b in exc.__bases__)
    return "%s (%s)" % (exc.__name__, bases)


def _cell(text):
    return str(text).replace("|", "\\|")


HEADER = """<!-- Generated from tests/bad_inputs.py by
     `python tests/bad_inputs.py > docs/bad_inputs.md`; do not edit:
     tests/test_bad_inputs.py checks that this file and the data agree. -->

# Bad inputs and the exceptions they raise

Every bad argument of bn_cy's public API raises exactly the exception below, with a message that
names the argument and contains the phrase shown. No input array (nor a layer's weights) is
modified by a call that raises. `ArgumentTypeError` (in `bn_cy.layer`) is both a `TypeError` and
a `ValueError`, as Keras raises `ValueError` for several of these; `NoForwardError` is both a
`RuntimeError` and a `ValueError`. The rows are checked by `tests/test_bad_inputs.py`.

| where | argument | bad input | exception | message contains |
|---|---|---|---|---|
"""


def render_markdown(table=None):
    lines = [HEADER.rstrip("\n")]
    for r in (rows() if table is None else table):
        lines.append("| %s | `%s` | %s | `%s` | %s |" % (
            _cell(", ".join("`%s`" % w for w in r.where)), _cell(r.argument), _cell(r.bad),
            _cell(exception_name(r.exception)), _cell(r.phrase)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import os

    # run as a script from a checkout: import bn_cy from the repository (built in place)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.stdout.write(render_markdown())
