"""bn_cy.BatchNormalization against Keras 3's keras.layers.BatchNormalization itself (torch
backend): outputs, every weight and every gradient over several training steps, then inference,
for many random configurations; and config interchange in both directions.

Skipped when Keras (or torch) is not importable.
"""

import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from bn_cy import constraints, initializers, regularizers  # noqa: E402
from bn_cy.layer import BatchNormalization  # noqa: E402

if keras.backend.backend() != "torch":  # pragma: no cover - keras was imported elsewhere first
    pytest.skip("these tests drive Keras on the torch backend", allow_module_level=True)

POLICY_TOL = {
    # Keras computes E[x^2]-E[x]^2 in float32 (also for the float64 policy, which its torch
    # backend runs in float32); 16-bit outputs differ by at most about one unit in the last place.
    "float32": dict(rtol=1e-4, atol=1e-4),
    "float64": dict(rtol=1e-4, atol=1e-4),
    "mixed_float16": dict(rtol=4e-3, atol=8e-3),
    "mixed_bfloat16": dict(rtol=2e-2, atol=5e-2),
    "float16": dict(rtol=4e-3, atol=8e-3),
    "bfloat16": dict(rtol=2e-2, atol=5e-2),
}


def random_config(seed):
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(2, 6))
    shape = tuple(int(d) for d in rng.integers(2, 6, size=rank))
    shape = (max(shape[0], 3),) + shape[1:]
    axis = int(rng.integers(-rank, rank))
    kw = dict(axis=axis, center=bool(rng.random() < 0.75), scale=bool(rng.random() < 0.75),
              momentum=float(rng.choice([0.0, 0.5, 0.9, 0.99])),
              epsilon=float(rng.choice([1e-3, 1e-5, 0.1])))
    if rng.random() < 0.4:
        clipping = {}
        for key, lo, hi in (("rmin", 0.7, 0.95), ("rmax", 1.05, 1.5), ("dmax", 0.0, 0.5)):
            if rng.random() < 0.6:
                clipping[key] = float(rng.uniform(lo, hi))
        kw.update(renorm=True, renorm_clipping=clipping or None,
                  renorm_momentum=float(rng.choice([0.5, 0.9, 0.99])))
    kw["trainable"] = bool(rng.random() < 0.85)
    kw["dtype"] = str(rng.choice(["float32"] * 6 + ["float64", "mixed_float16",
                                                    "mixed_bfloat16", "float16", "bfloat16"]))
    use_mask = bool(rng.random() < 0.4)
    return shape, kw, use_mask


def make_pair(shape, kw, seed):
    kl = keras.layers.BatchNormalization(**kw)
    bl = BatchNormalization(**kw)
    kl.build(shape)
    bl.build(shape)
    assert [w.name for w in kl.weights] == bl.weight_names
    rng = np.random.default_rng(seed)
    ws = [rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in bl.get_weights()]
    kl.set_weights(ws)
    bl.set_weights(ws)
    return kl, bl


def keras_forward_backward(kl, x, dy, training, mask):
    xt = torch.tensor(x, requires_grad=True)
    mt = None if mask is None else torch.tensor(mask)
    y = kl(xt, training=training, mask=mt)
    (y.float() * torch.tensor(dy)).sum().backward()
    grads = [w.value.grad.float().numpy().copy() for w in kl.trainable_weights]
    for w in kl.trainable_weights:
        w.value.grad = None
    return y.detach().float().numpy(), xt.grad.float().numpy(), grads


def compare_weights(kl, bl, tol, msg):
    assert [w.name for w in kl.weights] == bl.weight_names
    for kw_, name, w in zip(kl.weights, bl.weight_names, bl.weights):
        np.testing.assert_allclose(w.astype(np.float64), keras.ops.convert_to_numpy(kw_),
                                   err_msg="%s %s" % (msg, name), **tol)


@pytest.mark.parametrize("seed", range(32))
def test_random_configurations_match_keras(seed):
    shape, kw, use_mask = random_config(seed)
    run_parity(shape, kw, use_mask, seed)


FIXED_CASES = [
    ((6, 4, 3), dict(axis=1, renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.2},
                     momentum=0.5), True),
    ((3, 4, 2, 5), dict(axis=-1, renorm=True, renorm_momentum=0.5, center=False), True),
    ((7, 3), dict(axis=0, momentum=0.5), True),
    ((2, 3, 4, 5, 2), dict(axis=2, scale=False, momentum=0.9), True),
    ((8, 3), dict(renorm=True, momentum=0.0, renorm_momentum=0.0), False),
    ((4, 6), dict(dtype="mixed_float16", renorm=True), True),
    ((5, 4, 3), dict(axis=1, dtype="mixed_bfloat16"), True),
    ((5, 4, 3), dict(axis=0, dtype="float16", renorm=True), True),
]


@pytest.mark.parametrize("case", range(len(FIXED_CASES)))
def test_fixed_configurations_match_keras(case):
    shape, kw, use_mask = FIXED_CASES[case]
    run_parity(shape, kw, use_mask, 100 + case)


def run_parity(shape, kw, use_mask, seed):
    kl, bl = make_pair(shape, kw, seed)
    tol = POLICY_TOL[kw.get("dtype", "float32")]
    msg = "config %s shape %s mask %s" % (kw, shape, use_mask)
    rng = np.random.default_rng(1000 + seed)
    lr = 0.05
    for step in range(3):
        x = (rng.standard_normal(shape) * 1.5 + rng.uniform(-1, 1)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        mask = (rng.random(shape[:-1]) > 0.3) if use_mask else None
        ky, kdx, kgrads = keras_forward_backward(kl, x, dy, True, mask)
        by = bl(x, training=True, mask=mask)
        assert str(by.dtype) == kl.compute_dtype == bl.compute_dtype
        np.testing.assert_allclose(by.astype(np.float32), ky, err_msg=msg, **tol)
        compare_weights(kl, bl, tol, msg)
        dx = bl.backward(dy)
        np.testing.assert_allclose(dx, kdx, err_msg=msg + " dx", **tol)
        assert len(bl.gradients) == len(kgrads)
        for kg, bg, name in zip(kgrads, bl.gradients, bl.trainable_weight_names):
            scale = max(1.0, float(np.abs(kg).max()))
            np.testing.assert_allclose(bg, kg, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       err_msg=msg + " d" + name)
        # one SGD step on both, each with its own gradients
        for kv, bw, g in zip(kl.trainable_weights, bl.trainable_weights, kgrads):
            kv.assign(keras.ops.convert_to_numpy(kv) - lr * g)
            bw -= lr * g
    x = (rng.standard_normal(shape) + 0.3).astype(np.float32)
    ky, kdx, _ = keras_forward_backward(kl, x, np.ones(shape, np.float32), False, None)
    np.testing.assert_allclose(bl(x, training=False).astype(np.float32), ky, err_msg=msg, **tol)
    np.testing.assert_allclose(bl.backward(np.ones(shape, np.float32)), kdx, err_msg=msg, **tol)


def test_frozen_layer_matches_keras():
    kl, bl = make_pair((8, 3, 4), dict(axis=1), 0)
    kl.trainable = False
    bl.trainable = False
    x = np.random.default_rng(0).standard_normal((8, 3, 4)).astype(np.float32)
    ky, kdx, kgrads = keras_forward_backward(kl, x, np.ones_like(x), True, None)
    np.testing.assert_allclose(bl(x, training=True), ky, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bl.backward(np.ones_like(x)), kdx, rtol=1e-5, atol=1e-5)
    assert kgrads == [] and bl.gradients == []
    assert len(kl.trainable_weights) == len(bl.trainable_weights) == 0
    assert [w.name for w in kl.non_trainable_weights] == bl.non_trainable_weight_names


def test_all_masked_and_float64_inputs_match_keras():
    kl, bl = make_pair((6, 3), dict(momentum=0.5), 2)
    x = np.random.default_rng(1).standard_normal((6, 3))
    mask = np.zeros(6, bool)
    dy = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    ky, kdx, kgrads = keras_forward_backward(kl, x.astype(np.float32), dy, True, mask)
    np.testing.assert_allclose(bl(x, training=True, mask=mask), ky, rtol=1e-4, atol=1e-4)
    compare_weights(kl, bl, dict(rtol=1e-6, atol=1e-6), "all masked")
    np.testing.assert_allclose(bl.backward(dy), kdx, rtol=1e-4, atol=1e-4)
    for kg, bg in zip(kgrads, bl.gradients):
        np.testing.assert_allclose(bg, kg, rtol=1e-4, atol=1e-4)
    # float64 input to a float32 layer: cast first, float32 output (Keras's autocast)
    assert bl(x).dtype == np.float32
    assert keras.ops.convert_to_numpy(kl(x)).dtype == np.float32


def test_regularization_losses_match_keras():
    kwargs = dict(gamma_regularizer="l2", beta_regularizer=regularizers.L1L2(0.3, 0.1))
    kl = keras.layers.BatchNormalization(
        gamma_regularizer="l2", beta_regularizer=keras.regularizers.L1L2(0.3, 0.1))
    bl = BatchNormalization(**kwargs)
    kl.build((2, 3))
    bl.build((2, 3))
    ws = [np.array([1.0, -2.0, 3.0]), np.array([0.5, -1.0, 2.0]), np.zeros(3), np.ones(3)]
    kl.set_weights(ws)
    bl.set_weights(ws)
    np.testing.assert_allclose([float(v) for v in bl.losses], [float(v) for v in kl.losses],
                               rtol=1e-6)
    kl.trainable = bl.trainable = False
    assert kl.losses == [] and bl.losses == []


def test_integer_inputs_match_keras():
    for policy in ("float32", "float64", "mixed_float16"):
        kl, bl = make_pair((10, 3), dict(dtype=policy), 3)
        x = np.arange(30).reshape(10, 3).astype(np.int32) % 7
        ky = keras.ops.convert_to_numpy(kl(x, training=True))
        by = bl(x, training=True)
        assert by.dtype == ky.dtype
        np.testing.assert_allclose(by.astype(np.float64), ky.astype(np.float64),
                                   **POLICY_TOL[policy])
        compare_weights(kl, bl, POLICY_TOL[policy], policy)


# ---------------------------------------------------------------------------------------------
# configs


def config_cases():
    return [
        dict(),
        dict(axis=1, momentum=0.9, epsilon=1e-5, center=False),
        dict(axis=-2, scale=False, name="bn_custom", trainable=False),
        dict(renorm=True),
        dict(renorm=True, renorm_clipping={"rmax": 3, "rmin": 0.5, "dmax": 1.0},
             renorm_momentum=0.9),
        dict(renorm=False, renorm_clipping={"rmax": 2.0}),
        dict(dtype="float64"),
        dict(dtype="mixed_float16"),
        dict(dtype="mixed_bfloat16"),
        dict(beta_initializer="random_normal", gamma_initializer="he_normal",
             moving_mean_initializer="glorot_uniform", moving_variance_initializer="one"),
        dict(beta_initializer=("RandomUniform", dict(minval=-1, maxval=1, seed=3)),
             gamma_initializer=("Constant", dict(value=2.0)),
             moving_variance_initializer=("VarianceScaling",
                                          dict(scale=0.5, mode="fan_out", seed=1))),
        dict(beta_regularizer="l1", gamma_regularizer="l1l2"),
        dict(beta_regularizer=("L1L2", dict(l1=0.1, l2=0.2)), gamma_regularizer=("L2", {})),
        dict(beta_constraint="non_neg", gamma_constraint="unit_norm"),
        dict(beta_constraint=("MaxNorm", dict(max_value=3.0)),
             gamma_constraint=("MinMaxNorm", dict(min_value=0.5, max_value=2.0, rate=0.5))),
    ]


def instantiate(kwargs, lib):
    """Replace ("ClassName", kwargs) by an instance from `lib` (keras or bn_cy modules)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, tuple):
            cls_name, args = value
            family = key.rsplit("_", 1)[1] + "s"  # initializers, regularizers, constraints
            module = getattr(lib, family) if lib is keras else {
                "initializers": initializers, "regularizers": regularizers,
                "constraints": constraints}[family]
            value = getattr(module, cls_name)(**args)
        out[key] = value
    return out


@pytest.mark.parametrize("case", range(len(config_cases())))
def test_get_config_equals_keras(case):
    kwargs = config_cases()[case]
    name = kwargs.pop("name", "bn_case_%d" % case)
    kl = keras.layers.BatchNormalization(name=name, **instantiate(kwargs, keras))
    bl = BatchNormalization(name=name, **instantiate(kwargs, None))
    kcfg, bcfg = kl.get_config(), bl.get_config()
    assert bcfg == kcfg
    # Keras loads ours, we load Keras's; both round-trip to the same dict
    assert keras.layers.BatchNormalization.from_config(bcfg).get_config() == kcfg
    assert BatchNormalization.from_config(kcfg).get_config() == kcfg
    # and the built layers agree on weights
    shape = (4, 3, 5)
    kl.build(shape)
    bl.build(shape)
    assert [w.name for w in kl.weights] == bl.weight_names
    assert [w.name for w in kl.trainable_weights] == bl.trainable_weight_names
    assert [str(w.dtype) for w in kl.weights] == [str(w.dtype) for w in bl.weights]
    assert kl.count_params() == bl.count_params()
    for kw_, bw, name in zip(kl.weights, bl.weights, bl.weight_names):
        init = bl.get_config().get(name.replace("moving_stddev", "moving_variance")
                                   .replace("renorm_stddev", "moving_variance")
                                   .replace("renorm_mean", "moving_mean") + "_initializer")
        if init is None or init["class_name"] in ("Zeros", "Ones", "Constant"):
            np.testing.assert_allclose(bw, keras.ops.convert_to_numpy(kw_), rtol=1e-6)


def test_default_config_equals_keras_except_name():
    kcfg = keras.layers.BatchNormalization().get_config()
    bcfg = BatchNormalization().get_config()
    assert kcfg.pop("name").startswith("batch_normalization")
    assert bcfg.pop("name").startswith("batch_normalization")
    assert bcfg == kcfg


def test_whole_serialized_keras_layer_loads_with_its_build_shape():
    kl = keras.layers.BatchNormalization(axis=1, renorm=True, name="from_keras")
    kl.build((None, 6, 2))
    blob = keras.saving.serialize_keras_object(kl)
    bl = BatchNormalization.from_config(blob)
    assert bl.built and bl.name == "from_keras" and bl.weight_names == [w.name for w in kl.weights]
    assert bl.gamma.shape == (6,)
    bl.set_weights([keras.ops.convert_to_numpy(w) for w in kl.weights])


def test_keras_objects_are_accepted_as_arguments():
    bl = BatchNormalization(gamma_initializer=keras.initializers.Constant(3.0),
                            beta_regularizer=keras.regularizers.L2(0.5),
                            gamma_constraint=keras.constraints.NonNeg(),
                            dtype=keras.DTypePolicy("mixed_float16"))
    bl.build((2, 4))
    assert np.all(bl.gamma == 3.0) and bl.dtype_policy.name == "mixed_float16"
    assert isinstance(bl.beta_regularizer, regularizers.L2) and bl.beta_regularizer.l2 == 0.5
    assert isinstance(bl.gamma_constraint, constraints.NonNeg)
