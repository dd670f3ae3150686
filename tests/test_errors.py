"""Every bad input -> the exact exception type, a message naming the argument, and the caller's
arrays untouched (contract: "Errors")."""

import numpy as np
import pytest

import bn_cy
from conftest import assert_unchanged, snapshot

OPS = ("moments", "batch_norm", "batch_norm_train", "batch_norm_backward")
C = 4


def base_args():
    """Valid arguments for every op on a (6, 5, 4) float64 input, feature axis -1."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, C))
    return dict(
        x=x,
        dy=rng.standard_normal(x.shape),
        mean=np.zeros(C),
        variance=np.ones(C),
        gamma=np.full(C, 1.5),
        beta=np.full(C, 0.5),
        axis=-1,
        epsilon=1e-3,
        mask=np.ones((6, 5), bool),
        out=None,
        n_threads=None,
    )


def invoke(op, a):
    if op == "moments":
        return bn_cy.moments(a["x"], a["axis"], mask=a["mask"], n_threads=a["n_threads"])
    if op == "batch_norm":
        return bn_cy.batch_norm(a["x"], a["mean"], a["variance"], a["gamma"], a["beta"],
                                axis=a["axis"], epsilon=a["epsilon"], out=a["out"],
                                n_threads=a["n_threads"])
    if op == "batch_norm_train":
        return bn_cy.batch_norm_train(a["x"], a["gamma"], a["beta"], axis=a["axis"],
                                      epsilon=a["epsilon"], mask=a["mask"], out=a["out"],
                                      n_threads=a["n_threads"])
    return bn_cy.batch_norm_backward(a["dy"], a["x"], a["mean"], a["variance"], a["gamma"],
                                     axis=a["axis"], epsilon=a["epsilon"], mask=a["mask"],
                                     out=a["out"], n_threads=a["n_threads"])


def readonly(shape, dtype=np.float64):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


def neg_mask(a):
    m = np.ones(a["mask"].shape)
    m[2, 3] = -0.5
    return m


def tiny_neg_mask(a):
    """-1e-300 is negative; it must not pass because it underflows to -0.0 in float32."""
    a["x"] = a["x"].astype(np.float32)
    m = np.ones(a["mask"].shape)
    m[0, 0] = -1e-300
    return m


def mask_with(value, dtype=np.float64):
    def make(a):
        m = np.ones(a["mask"].shape, dtype)
        m[1, 1] = value
        return m
    return make


# (id, ops it applies to, argument -> bad value (or a function of the args), exception, name)
ALL, MASKED, PARAM = OPS, ("moments", "batch_norm_train", "batch_norm_backward"), OPS[1:]
CASES = [
    # x
    ("x-0d", ALL, dict(x=np.array(1.0), dy=np.array(1.0), mask=None), ValueError, "x"),
    ("x-complex", ALL, dict(x=lambda a: a["x"].astype(np.complex128)), TypeError, "x"),
    ("x-object", ALL, dict(x=lambda a: a["x"].astype(object)), TypeError, "x"),
    ("x-str", ALL, dict(x=lambda a: a["x"].astype(str)), TypeError, "x"),
    ("x-datetime", ALL, dict(x=lambda a: np.zeros(a["x"].shape, "datetime64[s]")), TypeError, "x"),
    ("x-longdouble", ALL, dict(x=lambda a: a["x"].astype(np.longdouble)), TypeError, "x"),
    ("dy-complex", ("batch_norm_backward",), dict(dy=lambda a: a["dy"].astype(np.complex64)),
     TypeError, "dy"),
    # axis
    ("axis-too-big", ALL, dict(axis=3), ValueError, "axis"),
    ("axis-too-small", ALL, dict(axis=-4), ValueError, "axis"),
    ("axis-float", ALL, dict(axis=1.0), TypeError, "axis"),
    ("axis-str", ALL, dict(axis="1"), TypeError, "axis"),
    ("axis-none", ALL, dict(axis=None), TypeError, "axis"),
    ("axis-rank1", ALL, dict(x=np.arange(4.0), dy=np.arange(4.0), mask=None, axis=1), ValueError, "axis"),
    # parameters of the wrong length or shape
    ("mean-short", ("batch_norm", "batch_norm_backward"), dict(mean=np.zeros(C - 1)), ValueError, "mean"),
    ("mean-2d", ("batch_norm", "batch_norm_backward"), dict(mean=np.zeros((1, C))), ValueError, "mean"),
    ("variance-long", ("batch_norm", "batch_norm_backward"), dict(variance=np.ones(C + 1)),
     ValueError, "variance"),
    ("variance-scalar", ("batch_norm", "batch_norm_backward"), dict(variance=1.0), ValueError,
     "variance"),
    ("gamma-long", PARAM, dict(gamma=np.ones(C + 1)), ValueError, "gamma"),
    ("gamma-list", PARAM, dict(gamma=[1.0, 2.0]), ValueError, "gamma"),
    ("beta-short", ("batch_norm", "batch_norm_train"), dict(beta=np.zeros(1)), ValueError, "beta"),
    ("beta-2d", ("batch_norm", "batch_norm_train"), dict(beta=np.zeros((C, 1))), ValueError, "beta"),
    # mask
    ("mask-like-x", MASKED, dict(mask=lambda a: np.ones(a["x"].shape, bool)), ValueError, "mask"),
    ("mask-transposed", MASKED, dict(mask=np.ones((5, 6), bool)), ValueError, "mask"),
    ("mask-short", MASKED, dict(mask=np.ones((6,), bool)), ValueError, "mask"),
    ("mask-negative", MASKED, dict(mask=neg_mask), ValueError, "mask"),
    ("mask-negative-int", MASKED, dict(mask=mask_with(-1, np.int32)), ValueError, "mask"),
    ("mask-tiny-negative", MASKED, dict(mask=tiny_neg_mask), ValueError, "mask"),
    ("mask-nan", MASKED, dict(mask=mask_with(np.nan)), ValueError, "mask"),
    ("mask-inf", MASKED, dict(mask=mask_with(np.inf, np.float32)), ValueError, "mask"),
    # epsilon
    ("epsilon-negative", PARAM, dict(epsilon=-1e-5), ValueError, "epsilon"),
    ("epsilon-nan", PARAM, dict(epsilon=float("nan")), ValueError, "epsilon"),
    ("epsilon-inf", PARAM, dict(epsilon=float("inf")), ValueError, "epsilon"),
    # dy
    ("dy-shape", ("batch_norm_backward",), dict(dy=lambda a: a["dy"][:, :-1]), ValueError, "dy"),
    ("dy-transposed", ("batch_norm_backward",), dict(dy=lambda a: a["dy"].T), ValueError, "dy"),
    # out
    ("out-readonly", PARAM, dict(out=lambda a: readonly(a["x"].shape)), ValueError, "out"),
    ("out-shape", PARAM, dict(out=lambda a: np.zeros(a["x"].shape[:-1] + (C + 1,))), ValueError, "out"),
    ("out-dtype", PARAM, dict(out=lambda a: np.zeros(a["x"].shape, np.float32)), ValueError, "out"),
    ("out-int-input", PARAM, dict(x=lambda a: a["x"].astype(np.int64),
                                  dy=lambda a: a["dy"].astype(np.float32),
                                  out=lambda a: np.zeros(a["x"].shape, np.int64)), ValueError, "out"),
    ("out-list", PARAM, dict(out=lambda a: a["x"].tolist()), ValueError, "out"),
    # n_threads
    ("n_threads-zero", ALL, dict(n_threads=0), ValueError, "n_threads"),
    ("n_threads-float", ALL, dict(n_threads=2.0), TypeError, "n_threads"),
    ("n_threads-str", ALL, dict(n_threads="2"), TypeError, "n_threads"),
]

PARAMS = [
    pytest.param(op, changes, exc, name, id=f"{case_id}-{op}")
    for case_id, ops, changes, exc, name in CASES
    for op in ops
]


@pytest.mark.parametrize("op,changes,exc,name", PARAMS)
def test_bad_input_raises(op, changes, exc, name):
    a = base_args()
    for key, value in changes.items():  # lambdas see the arguments as already changed
        a[key] = value(a) if callable(value) else value
    keys = ("x", "dy", "mean", "variance", "gamma", "beta", "mask", "out")
    before = snapshot(*(a[k] if isinstance(a[k], np.ndarray) else None for k in keys))
    with pytest.raises(exc) as info:
        invoke(op, a)
    assert exc is info.type, f"raised {info.type.__name__}, expected {exc.__name__}"
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"
    assert_unchanged(before, [a[k] if isinstance(a[k], np.ndarray) else None for k in keys])


@pytest.mark.parametrize("op", OPS)
def test_base_arguments_are_valid(op):
    """The table's starting point is a valid call (so every error above comes from one change)."""
    a = base_args()
    invoke(op, a)
    a["axis"] = np.int64(2)
    invoke(op, a)


def test_errors_leave_out_untouched():
    x = np.random.default_rng(1).standard_normal((5, 3))
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="gamma"):
        bn_cy.batch_norm_train(x, np.ones(2), out=out)
    with pytest.raises(ValueError, match="epsilon"):
        bn_cy.batch_norm(x, np.zeros(3), np.ones(3), epsilon=-1.0, out=out)
    assert np.all(out == 7.0)
