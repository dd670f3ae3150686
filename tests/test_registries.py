"""bn_cy.initializers / regularizers / constraints: Keras-compatible names, configs, serialized
form and arithmetic. Where Keras is importable, the serialized dicts and values are compared with
Keras's own."""

import copy
import os
import pickle

import numpy as np
import pytest

from bn_cy import constraints, initializers, regularizers

# ---------------------------------------------------------------------------------------------
# initializers

INIT_NAMES = {
    "zeros": "Zeros", "Zeros": "Zeros", "zero": "Zeros", "ones": "Ones", "one": "Ones",
    "constant": "Constant", "random_normal": "RandomNormal", "normal": "RandomNormal",
    "random_uniform": "RandomUniform", "uniform": "RandomUniform",
    "truncated_normal": "TruncatedNormal", "variance_scaling": "VarianceScaling",
    "glorot_normal": "GlorotNormal", "glorot_uniform": "GlorotUniform",
    "GlorotUniform": "GlorotUniform", "he_normal": "HeNormal", "he_uniform": "HeUniform",
    "lecun_normal": "LecunNormal", "lecun_uniform": "LecunUniform",
}


@pytest.mark.parametrize("name, cls", sorted(INIT_NAMES.items()))
def test_initializer_names(name, cls):
    init = initializers.get(name)
    assert type(init).__name__ == cls
    w = init((5,), dtype="float32")
    assert w.shape == (5,) and w.dtype == np.float32
    assert init((3,)).dtype == np.float32  # default dtype
    assert init((3,), dtype="float64").dtype == np.float64


@pytest.mark.parametrize("bad", ["bogus", "Zeros2", 5, 1.5, [1, 2], {"config": {}},
                                 {"class_name": "Bogus", "config": {}}])
def test_initializer_unknown_identifiers(bad):
    with pytest.raises(ValueError):
        initializers.get(bad)


@pytest.mark.parametrize("name", ["orthogonal", "Identity", "identity", "stft"])
def test_matrix_initializers_are_rejected_clearly(name):
    with pytest.raises(ValueError, match="1-D"):
        initializers.get(name)


def test_initializer_identifier_forms():
    assert initializers.get(None) is None
    inst = initializers.Constant(3.0)
    assert initializers.get(inst) is inst
    assert isinstance(initializers.get(initializers.Ones), initializers.Ones)

    def fn(shape, dtype=None):
        return np.full(shape, 7.0)

    assert initializers.get(fn) is fn
    keras3 = {"module": "keras.initializers", "class_name": "RandomNormal",
              "config": {"seed": 3, "mean": 1.0, "stddev": 2.0}, "registered_name": None}
    keras2 = {"class_name": "RandomNormal", "config": {"seed": 3, "mean": 1.0, "stddev": 2.0}}
    a, b = initializers.get(keras3), initializers.get(keras2)
    assert (a.mean, a.stddev, a.seed) == (1.0, 2.0, 3)
    np.testing.assert_array_equal(a((4,)), b((4,)))
    arr_init = initializers.get(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(arr_init((3,), dtype="float32"), [1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        arr_init((4,))


def test_initializer_serialize_form():
    assert initializers.serialize(initializers.Zeros()) == {
        "module": "keras.initializers", "class_name": "Zeros", "config": {},
        "registered_name": None}
    assert initializers.serialize(initializers.Constant(2)) == {
        "module": "keras.initializers", "class_name": "Constant", "config": {"value": 2},
        "registered_name": None}
    assert initializers.serialize(initializers.HeNormal(seed=5))["config"] == {
        "seed": 5, "input_axes": None, "output_axes": None}
    assert initializers.serialize(initializers.VarianceScaling(2.0, "fan_out", "normal"))[
        "config"] == {"seed": None, "scale": 2.0, "mode": "fan_out",
                      "distribution": "truncated_normal", "input_axes": None,
                      "output_axes": None}
    assert initializers.serialize(None) is None

    def my_init(shape, dtype=None):
        return np.zeros(shape)

    cfg = initializers.serialize(my_init)
    assert cfg == {"module": "builtins", "class_name": "function", "config": "my_init",
                   "registered_name": "function"}
    with pytest.raises(ValueError, match="custom_objects"):
        initializers.deserialize(cfg)
    assert initializers.deserialize(cfg, custom_objects={"my_init": my_init}) is my_init


class MyInit(initializers.Initializer):
    def __init__(self, value=1.0):
        self.value = value

    def __call__(self, shape, dtype=None):
        return np.full(shape, self.value, dtype=initializers._np_dtype(dtype))

    def get_config(self):
        return {"value": self.value}


def test_custom_initializer_class_round_trip():
    cfg = initializers.serialize(MyInit(4.0))
    assert cfg["class_name"] == "MyInit" and cfg["config"] == {"value": 4.0}
    with pytest.raises(ValueError, match="custom_objects"):
        initializers.deserialize(cfg)
    back = initializers.deserialize(cfg, custom_objects={"MyInit": MyInit})
    assert isinstance(back, MyInit) and back.value == 4.0


@pytest.mark.parametrize("cls", [initializers.RandomNormal, initializers.RandomUniform,
                                 initializers.TruncatedNormal, initializers.GlorotUniform,
                                 initializers.HeNormal, initializers.LecunUniform])
def test_random_initializer_seeds(cls):
    a, b = cls(seed=7), cls(seed=7)
    np.testing.assert_array_equal(a((50,)), b((50,)))
    np.testing.assert_array_equal(a((50,)), a((50,)))  # same values at every call (Keras)
    assert not np.array_equal(cls(seed=8)((50,)), a((50,)))
    u = cls()
    np.testing.assert_array_equal(u((50,)), u((50,)))
    assert not np.array_equal(u.clone()((50,)), u((50,)))  # unseeded clone: new seed
    assert u.get_config()["seed"] is None
    np.testing.assert_array_equal(a.clone()((50,)), a((50,)))  # seeded clone: same values
    with pytest.raises(ValueError, match="seed"):
        cls(seed=1.5)


def test_random_initializer_distributions():
    n = (200000,)
    w = initializers.RandomNormal(mean=1.0, stddev=2.0, seed=0)(n, dtype="float64")
    assert abs(w.mean() - 1.0) < 0.02 and abs(w.std() - 2.0) < 0.02
    w = initializers.RandomUniform(-3.0, 1.0, seed=0)(n)
    assert w.min() >= -3.0 and w.max() < 1.0 and abs(w.mean() + 1.0) < 0.02
    w = initializers.TruncatedNormal(mean=0.5, stddev=0.1, seed=0)(n, dtype="float64")
    assert w.min() >= 0.3 and w.max() <= 0.7 and abs(w.std() - 0.088) < 0.002


@pytest.mark.parametrize("cls, var", [
    (initializers.GlorotUniform, 1.0 / 400), (initializers.GlorotNormal, 1.0 / 400),
    (initializers.HeNormal, 2.0 / 400), (initializers.HeUniform, 2.0 / 400),
    (initializers.LecunNormal, 1.0 / 400), (initializers.LecunUniform, 1.0 / 400)])
def test_variance_scaling_uses_keras_fans_for_1d(cls, var):
    # Keras's compute_fans: a 1-D shape (n,) has fan_in = fan_out = n
    assert initializers.compute_fans((400,)) == (400, 400)
    w = np.concatenate([cls(seed=s)((400,), dtype="float64") for s in range(200)])
    assert abs(w.var() / var - 1.0) < 0.03


def test_variance_scaling_validation():
    with pytest.raises(ValueError, match="scale"):
        initializers.VarianceScaling(scale=0.0)
    with pytest.raises(ValueError, match="mode"):
        initializers.VarianceScaling(mode="fan")
    with pytest.raises(ValueError, match="distribution"):
        initializers.VarianceScaling(distribution="cauchy")
    assert initializers.VarianceScaling(distribution="Normal").distribution == "truncated_normal"
    assert initializers.compute_fans((3, 4)) == (3, 4)
    assert initializers.compute_fans((2, 3, 4)) == (6, 8)
    assert initializers.compute_fans(()) == (1, 1)


def test_constant_and_bfloat16():
    np.testing.assert_array_equal(initializers.Constant(2.5)((3,), "float64"), [2.5] * 3)
    with pytest.raises(TypeError):
        initializers.Constant("x")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = initializers.Ones()((3,), dtype="bfloat16")
    assert w.dtype == np.dtype(ml_dtypes.bfloat16)


def test_initializers_pickle_and_copy():
    for init in (initializers.RandomNormal(seed=2), initializers.GlorotUniform(seed=1),
                 initializers.Constant(4.0)):
        for clone in (pickle.loads(pickle.dumps(init)), copy.deepcopy(init)):
            np.testing.assert_array_equal(clone((6,)), init((6,)))
            assert clone == init


# ---------------------------------------------------------------------------------------------
# regularizers


@pytest.mark.parametrize("name, cls", [("l1", "L1"), ("L1", "L1"), ("l2", "L2"), ("L2", "L2"),
                                       ("l1l2", "L1L2"), ("l1_l2", "L1L2"), ("L1L2", "L1L2")])
def test_regularizer_names(name, cls):
    assert type(regularizers.get(name)).__name__ == cls


def test_regularizer_values_and_gradients():
    w = np.array([-2.0, 0.0, 0.5, 3.0])
    cases = [(regularizers.L1(0.3), lambda v: float(np.float32(0.3)) * np.abs(v).sum()),
             (regularizers.L2(0.3), lambda v: 0.3 * (v ** 2).sum()),
             (regularizers.L1L2(0.1, 0.2), lambda v: 0.1 * np.abs(v).sum() + 0.2 * (v ** 2).sum()),
             (regularizers.L1L2(), lambda v: 0.0)]
    for reg, f in cases:
        assert reg(w) == pytest.approx(f(w), rel=1e-12, abs=0)
        assert reg.loss(w) == reg(w)
        h = 1e-6
        num = np.array([(f(w + h * e) - f(w - h * e)) / (2 * h) for e in np.eye(4)])
        smooth = w != 0  # |x| has a kink at 0 (subgradient 0 there, as autodiff gives)
        np.testing.assert_allclose(reg.gradient(w)[smooth], num[smooth], rtol=1e-6)
        np.testing.assert_allclose(regularizers.gradient(reg, w), reg.gradient(w))
    assert regularizers.L1(0.3).gradient(w)[1] == 0.0
    w32 = w.astype(np.float32)
    assert regularizers.L2()(w32).dtype == np.float32
    assert regularizers.L2().gradient(w32).dtype == np.float32


def test_regularizer_configs_match_keras_values():
    # Keras's L1 keeps its factor as float32: the config shows the rounded value
    assert regularizers.L1().get_config() == {"l1": 0.009999999776482582}
    assert regularizers.L2().get_config() == {"l2": 0.01}
    assert regularizers.L1L2().get_config() == {"l1": 0.0, "l2": 0.0}
    assert regularizers.serialize(regularizers.L2(0.3)) == {
        "module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.3},
        "registered_name": None}
    back = regularizers.deserialize(regularizers.serialize(regularizers.L1(0.3)))
    assert back == regularizers.L1(0.3)
    assert regularizers.get({"class_name": "L1L2", "config": {"l1": 0.1, "l2": 0.2}}).l2 == 0.2


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "0.1"])
def test_regularizer_validation(bad):
    with pytest.raises(ValueError, match="l2"):
        regularizers.L2(bad)
    with pytest.raises(ValueError, match="l1"):
        regularizers.L1L2(l1=bad)


def test_regularizer_unknown_and_callable():
    for bad in ("l3", "orthogonal_regularizer", 3, {"class_name": "Bogus", "config": {}}):
        with pytest.raises(ValueError):
            regularizers.get(bad)

    def reg(w):
        return float(np.sum(np.asarray(w) ** 4))

    assert regularizers.get(reg) is reg
    w = np.array([1.0, -2.0])
    np.testing.assert_allclose(regularizers.gradient(reg, w), 4 * w ** 3, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# constraints


@pytest.mark.parametrize("name, cls", [
    ("non_neg", "NonNeg"), ("NonNeg", "NonNeg"), ("nonneg", "NonNeg"),
    ("max_norm", "MaxNorm"), ("maxnorm", "MaxNorm"), ("MaxNorm", "MaxNorm"),
    ("min_max_norm", "MinMaxNorm"), ("MinMaxNorm", "MinMaxNorm"),
    ("unit_norm", "UnitNorm"), ("UnitNorm", "UnitNorm")])
def test_constraint_names(name, cls):
    assert type(constraints.get(name)).__name__ == cls


def test_constraint_arithmetic():
    w = np.array([3.0, -4.0], dtype=np.float32)
    np.testing.assert_array_equal(constraints.NonNeg()(w), [3.0, 0.0])
    np.testing.assert_allclose(constraints.MaxNorm(1.0)(w), [0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(constraints.MaxNorm(10.0)(w), w, rtol=1e-6)
    np.testing.assert_allclose(constraints.UnitNorm()(w), [0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(constraints.MinMaxNorm(6.0, 8.0)(w), [3.6, -4.8], rtol=1e-6)
    np.testing.assert_allclose(constraints.MinMaxNorm(6.0, 8.0, rate=0.5)(w), [3.3, -4.4],
                               rtol=1e-6)
    assert constraints.MaxNorm(1.0)(w).dtype == np.float32
    assert constraints.serialize(constraints.MaxNorm()) == {
        "module": "keras.constraints", "class_name": "MaxNorm",
        "config": {"max_value": 2, "axis": 0}, "registered_name": None}
    got = constraints.get({"class_name": "MinMaxNorm", "config": {"max_value": 3.0}})
    assert got.max_value == 3.0
    for bad in ("positive", 2, {"class_name": "Bogus"}):
        with pytest.raises(ValueError):
            constraints.get(bad)


# ---------------------------------------------------------------------------------------------
# against Keras itself


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"
    return pytest.importorskip("keras")


KERAS_OBJECTS = [
    ("initializers", "Zeros", {}), ("initializers", "Ones", {}),
    ("initializers", "Constant", {"value": 0.5}),
    ("initializers", "RandomNormal", {"mean": 1.0, "stddev": 0.5, "seed": 3}),
    ("initializers", "RandomUniform", {"minval": -1, "maxval": 2, "seed": 1}),
    ("initializers", "TruncatedNormal", {"seed": 4}),
    ("initializers", "VarianceScaling", {"scale": 2.0, "mode": "fan_avg",
                                         "distribution": "uniform", "seed": 2}),
    ("initializers", "GlorotNormal", {"seed": 9}), ("initializers", "GlorotUniform", {}),
    ("initializers", "HeNormal", {}), ("initializers", "HeUniform", {"seed": 1}),
    ("initializers", "LecunNormal", {}), ("initializers", "LecunUniform", {}),
    ("regularizers", "L1", {"l1": 0.3}), ("regularizers", "L2", {"l2": 0.2}),
    ("regularizers", "L1L2", {"l1": 0.1, "l2": 0.05}), ("regularizers", "L1", {}),
    ("constraints", "NonNeg", {}), ("constraints", "MaxNorm", {"max_value": 1.5}),
    ("constraints", "MinMaxNorm", {"min_value": 0.5, "max_value": 2.0, "rate": 0.7}),
    ("constraints", "UnitNorm", {}),
]
MODULES = {"initializers": initializers, "regularizers": regularizers,
           "constraints": constraints}


@pytest.mark.parametrize("module, cls, kwargs", KERAS_OBJECTS,
                         ids=[c + str(i) for i, (_, c, _) in enumerate(KERAS_OBJECTS)])
def test_serialized_form_equals_keras(keras, module, cls, kwargs):
    kmod = getattr(keras, module)
    ours_mod = MODULES[module]
    kobj = getattr(kmod, cls)(**kwargs)
    ours = getattr(ours_mod, cls)(**kwargs)
    expected = kmod.serialize(kobj)
    assert ours_mod.serialize(ours) == expected
    # Keras reads ours, we read Keras's, and a Keras object is translated
    assert kmod.serialize(kmod.deserialize(ours_mod.serialize(ours))) == expected
    assert ours_mod.serialize(ours_mod.deserialize(expected)) == expected
    assert ours_mod.serialize(ours_mod.get(kobj)) == expected


def test_names_resolve_like_keras(keras):
    for name in INIT_NAMES:
        if name == "constant":
            continue  # Keras 3.15's get("constant") fails (Constant.from_config needs 'value')
        assert type(keras.initializers.get(name)).__name__ == INIT_NAMES[name]
    for name in ("l1", "l2", "l1l2", "L1L2"):
        assert type(keras.regularizers.get(name)).__name__ == type(regularizers.get(name)).__name__
    for name in ("non_neg", "max_norm", "min_max_norm", "unit_norm"):
        assert type(keras.constraints.get(name)).__name__ == type(constraints.get(name)).__name__


def test_values_equal_keras(keras):
    w = np.array([0.5, -1.5, 2.0, 0.0], dtype=np.float32)
    for cls, kwargs in (("L1", {"l1": 0.3}), ("L2", {"l2": 0.2}),
                        ("L1L2", {"l1": 0.1, "l2": 0.05})):
        k = float(getattr(keras.regularizers, cls)(**kwargs)(keras.ops.convert_to_tensor(w)))
        assert float(getattr(regularizers, cls)(**kwargs)(w)) == pytest.approx(k, rel=1e-6)
    for cls, kwargs in (("NonNeg", {}), ("MaxNorm", {"max_value": 1.5}), ("UnitNorm", {}),
                        ("MinMaxNorm", {"min_value": 0.5, "max_value": 2.0, "rate": 0.7})):
        k = keras.ops.convert_to_numpy(getattr(keras.constraints, cls)(**kwargs)(w))
        np.testing.assert_allclose(getattr(constraints, cls)(**kwargs)(w), k, rtol=1e-6)
    for cls in ("Zeros", "Ones"):
        k = keras.ops.convert_to_numpy(getattr(keras.initializers, cls)()((4,), "float32"))
        np.testing.assert_array_equal(getattr(initializers, cls)()((4,), "float32"), k)
