"""bn_cy.BatchNormalization: construction, build, modes, moving averages, masks, renorm, dtype
policies, backward, weights API, thread safety. Compared with tests/layer_reference.py (float64
NumPy); tests against Keras itself are in test_keras_parity.py."""

import threading

import numpy as np
import pytest

import bn_cy
from bn_cy import constraints, initializers, regularizers
from bn_cy.layer import ArgumentTypeError, BatchNormalization, NoForwardError
from layer_reference import ReferenceBN, keras_mask_weights, own_mask_weights

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def data(shape, seed=0, offset=0.5, scale=2.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def random_weights(layer, seed=1):
    rng = np.random.default_rng(seed)
    ws = [rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in layer.get_weights()]
    layer.set_weights(ws)
    return dict(zip(layer.weight_names, ws))


def reference_for(layer, channels, weights=None):
    return ReferenceBN(channels, axis=layer.axis, momentum=layer.momentum,
                       epsilon=layer.epsilon, center=layer.center, scale=layer.scale,
                       renorm=layer.renorm, renorm_clipping=layer.renorm_clipping,
                       renorm_momentum=layer.renorm_momentum, weights=weights)


def assert_weights_match(layer, ref, **tol):
    for name, w in zip(layer.weight_names, layer.weights):
        np.testing.assert_allclose(w, ref.w[name], err_msg=name, **(tol or F32_TOL))


# ---------------------------------------------------------------------------------------------
# construction


def test_public_name():
    assert bn_cy.BatchNormalization is BatchNormalization


def test_defaults():
    layer = BatchNormalization()
    assert (layer.axis, layer.momentum, layer.epsilon) == (-1, 0.99, 1e-3)
    assert layer.center and layer.scale and layer.trainable
    assert not layer.renorm and not layer.synchronized and not layer.built
    assert layer.renorm_clipping is None and layer.renorm_momentum == 0.99
    assert isinstance(layer.gamma_initializer, initializers.Ones)
    assert isinstance(layer.beta_initializer, initializers.Zeros)
    assert layer.gamma_regularizer is None and layer.beta_constraint is None
    assert layer.dtype == "float32" and layer.compute_dtype == "float32"
    assert layer.weights == [] and layer.get_weights() == []
    assert layer.name.startswith("batch_normalization")


def test_auto_names_are_unique():
    names = {BatchNormalization().name for _ in range(5)}
    assert len(names) == 5


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(momentum="0.9"), TypeError, "momentum"),
    (dict(epsilon=0.0), ValueError, "epsilon"),
    (dict(epsilon=-1e-3), ValueError, "epsilon"),
    (dict(epsilon=float("inf")), ValueError, "epsilon"),
    (dict(epsilon=None), TypeError, "epsilon"),
    (dict(axis=1.5), TypeError, "axis"),
    (dict(axis="1"), TypeError, "axis"),
    (dict(axis=True), TypeError, "axis"),
    (dict(center=1), TypeError, "center"),
    (dict(scale="yes"), TypeError, "scale"),
    (dict(renorm=None), TypeError, "renorm"),
    (dict(synchronized=0), TypeError, "synchronized"),
    (dict(trainable=1), TypeError, "trainable"),
    (dict(renorm=True, renorm_clipping={"rmax": 3, "bogus": 1}), ValueError, "bogus"),
    (dict(renorm=False, renorm_clipping={"r_max": 3}), ValueError, "renorm_clipping"),
    (dict(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 2.0}), ValueError, "rmax"),
    (dict(renorm=True, renorm_clipping={"dmax": -1.0}), ValueError, "dmax"),
    (dict(renorm=True, renorm_clipping={"dmax": "1"}), TypeError, "dmax"),
    (dict(renorm=True, renorm_clipping=[("rmax", 2)]), TypeError, "renorm_clipping"),
    (dict(renorm=True, renorm_momentum=2.0), ValueError, "renorm_momentum"),
    (dict(gamma_initializer="bogus"), ValueError, "gamma_initializer"),
    (dict(beta_initializer="orthogonal"), ValueError, "beta_initializer"),
    (dict(moving_variance_initializer=5), ValueError, "moving_variance_initializer"),
    (dict(gamma_regularizer="l3"), ValueError, "gamma_regularizer"),
    (dict(beta_constraint="positive"), ValueError, "beta_constraint"),
    (dict(dtype="int32"), ValueError, "int32"),
    (dict(dtype="mixed_int8"), ValueError, "dtype"),
    (dict(name=3), TypeError, "name"),
    (dict(name="a/b"), ValueError, "name"),
])
def test_constructor_validation(kwargs, exc, word):
    with pytest.raises(exc) as info:
        BatchNormalization(**kwargs)
    assert word in str(info.value)


def test_type_errors_are_also_value_errors():
    # Keras raises ValueError for several wrong types (trainable=1, ...); ours are both.
    with pytest.raises(ValueError):
        BatchNormalization(trainable=1)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


def test_accepted_argument_forms():
    layer = BatchNormalization(axis=np.int64(1), momentum=1, epsilon=np.float32(0.5),
                               center=np.bool_(False), renorm=True, renorm_momentum=0,
                               renorm_clipping={"rmax": 3, "rmin": None}, synchronized=True,
                               gamma_initializer=initializers.Constant(2.0),
                               beta_regularizer=regularizers.L2, gamma_constraint="non_neg")
    assert layer.axis == 1 and layer.momentum == 1.0 and layer.epsilon == 0.5
    assert layer.center is False and layer.renorm_momentum == 0
    assert isinstance(layer.beta_regularizer, regularizers.L2)
    assert isinstance(layer.gamma_constraint, constraints.NonNeg)
    assert layer.renorm_clipping == {"rmax": 3, "rmin": None}
    assert BatchNormalization(renorm=True).renorm_clipping == {}


# ---------------------------------------------------------------------------------------------
# build


@pytest.mark.parametrize("center, scale, renorm", [
    (True, True, False), (False, True, False), (True, False, False), (False, False, False),
    (True, True, True), (False, False, True)])
def test_build_creates_keras_weights(center, scale, renorm):
    layer = BatchNormalization(center=center, scale=scale, renorm=renorm)
    layer.build((None, 7))
    expected = (["gamma"] if scale else []) + (["beta"] if center else []) + [
        "moving_mean", "moving_variance"]
    if renorm:
        expected += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    assert layer.weight_names == expected
    assert layer.trainable_weight_names == [n for n in expected if n in ("gamma", "beta")]
    assert all(w.shape == (7,) and w.dtype == np.float32 for w in layer.weights)
    assert layer.count_params() == 7 * len(expected)
    values = dict(zip(layer.weight_names, layer.weights))
    for name, w in values.items():
        assert np.all(w == (1.0 if name in ("gamma", "moving_variance", "moving_stddev",
                                            "renorm_stddev") else 0.0)), name
    assert layer.gamma is values.get("gamma") and layer.moving_mean is values["moving_mean"]
    assert layer.variables == layer.weights
    assert layer.trainable_variables == layer.trainable_weights


def test_build_with_initializers_and_float64_policy():
    layer = BatchNormalization(renorm=True, dtype="float64",
                               moving_variance_initializer=initializers.Constant(4.0),
                               moving_mean_initializer=initializers.RandomNormal(seed=3),
                               gamma_initializer=lambda shape, dtype=None: np.full(shape, 2.0))
    layer.build((2, 3))
    assert all(w.dtype == np.float64 for w in layer.weights)
    assert np.all(layer.gamma == 2.0)
    assert np.all(layer.moving_stddev == 2.0) and np.all(layer.renorm_stddev == 2.0)
    # a seeded initializer's clone draws the same values (Keras: renorm_mean is a clone)
    np.testing.assert_array_equal(layer.renorm_mean, layer.moving_mean)


@pytest.mark.parametrize("policy, vdt", [("mixed_float16", np.float32),
                                         ("mixed_bfloat16", np.float32),
                                         ("float16", np.float16)])
def test_variable_dtype_follows_policy(policy, vdt):
    if "bfloat16" in policy and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    layer = BatchNormalization(dtype=policy)
    layer.build((4, 3))
    assert all(w.dtype == vdt for w in layer.weights)


def test_call_builds_and_checks_later_shapes():
    layer = BatchNormalization(axis=1)
    x = data((4, 3, 5))
    y = layer(x)
    assert layer.built and y.shape == x.shape and layer.gamma.shape == (3,)
    with pytest.raises(ValueError, match="size 3"):
        layer(data((4, 4, 5)))
    with pytest.raises(ValueError, match="rank"):
        layer(data((4, 3)))
    layer(data((9, 3, 2)))  # other non-feature sizes are fine


def test_build_errors():
    with pytest.raises(ValueError, match="axis"):
        BatchNormalization(axis=3).build((2, 3))
    with pytest.raises(ValueError, match="axis"):
        BatchNormalization(axis=-3)(data((2, 3)))
    with pytest.raises(ValueError, match="known"):
        BatchNormalization().build((2, None))
    with pytest.raises(ValueError, match="rank"):
        BatchNormalization().build(())
    with pytest.raises(ValueError, match="0-d"):
        BatchNormalization()(np.float32(1.0))
    with pytest.raises(TypeError, match="inputs"):
        BatchNormalization()(np.ones((2, 3), dtype=complex))
    with pytest.raises(TypeError, match="inputs"):
        BatchNormalization()(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="not built"):
        BatchNormalization().count_params()


def test_negative_axis_normalized_per_rank():
    layer = BatchNormalization(axis=-2)
    layer(data((3, 5, 2)), training=True)
    assert layer.gamma.shape == (5,) and layer.axis == -2
    assert layer.compute_output_shape((3, 5, 2)) == (3, 5, 2)


# ---------------------------------------------------------------------------------------------
# modes


def test_inference_uses_moving_statistics():
    layer = BatchNormalization(axis=1)
    x = data((6, 3, 4))
    layer.build(x.shape)
    w = random_weights(layer)
    ref = reference_for(layer, 3, w)
    for training in (None, False):
        y = layer(x, training=training)
        np.testing.assert_allclose(y, ref.forward(x, False), **F32_TOL)
    assert_weights_match(layer, ref)


@pytest.mark.parametrize("shape, axis", [((32, 4), -1), ((8, 3, 5), 1), ((4, 5, 6, 3), -1),
                                         ((2, 3, 4, 5, 6), 2), ((7,), 0), ((5, 6, 2), 0)])
def test_training_updates_moving_averages(shape, axis):
    layer = BatchNormalization(axis=axis, momentum=0.8)
    layer.build(shape)
    ref = reference_for(layer, shape[axis], random_weights(layer))
    for step in range(4):
        x = data(shape, seed=step)
        y = layer(x, training=True)
        np.testing.assert_allclose(y, ref.forward(x, True), **F32_TOL)
        assert_weights_match(layer, ref)
    x = data(shape, seed=99)
    np.testing.assert_allclose(layer(x), ref.forward(x, False), **F32_TOL)


def test_batch_statistics_normalize():
    layer = BatchNormalization()
    y = layer(data((256, 3), offset=10.0, scale=5.0), training=True)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=0), np.sqrt(25.0 / (25.0 + 1e-3)), rtol=1e-2)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_extremes(momentum):
    layer = BatchNormalization(momentum=momentum)
    x = data((64, 3))
    layer(x, training=True)
    if momentum == 1.0:
        assert np.all(layer.moving_mean == 0) and np.all(layer.moving_variance == 1)
    else:
        np.testing.assert_allclose(layer.moving_mean, x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance, x.var(0), rtol=1e-5)


def test_trainable_false_forces_inference_and_freezes():
    for make_frozen in ("constructor", "attribute"):
        if make_frozen == "constructor":
            layer = BatchNormalization(trainable=False, gamma_regularizer="l2")
        else:
            layer = BatchNormalization(gamma_regularizer="l2")
        x = data((16, 3))
        layer.build(x.shape)
        random_weights(layer)
        if make_frozen == "attribute":
            layer.trainable = False
        before = layer.get_weights()
        y = layer(x, training=True)
        ref = reference_for(layer, 3, dict(zip(layer.weight_names, before)))
        np.testing.assert_allclose(y, ref.forward(x, False), **F32_TOL)
        for b, a in zip(before, layer.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert layer.trainable_weights == [] and layer.trainable_weight_names == []
        assert len(layer.non_trainable_weights) == 4
        assert layer.losses == []
        dx = layer.backward(np.ones_like(y))
        assert layer.gradients == [] and dx.shape == x.shape
        layer.trainable = True
        assert layer.trainable_weight_names == ["gamma", "beta"]
        layer(x, training=True)
        assert not np.array_equal(layer.moving_mean, before[2])


def test_synchronized_true_is_single_process_identity():
    pytest.importorskip("mpi4py")
    x = data((16, 3))
    a, b = BatchNormalization(synchronized=True), BatchNormalization(synchronized=False)
    np.testing.assert_array_equal(a(x, training=True), b(x, training=True))
    np.testing.assert_array_equal(a.moving_variance, b.moving_variance)
    assert a.get_config()["synchronized"] is True


# ---------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("shape, axis, rule", [
    ((6, 5, 3), -1, "keras"), ((6, 5, 3), 1, "keras"), ((6, 5, 3), 0, "keras"),
    ((6, 5, 3), 1, "own"), ((6, 5, 3), 0, "own"), ((4, 3, 2, 5), 1, "keras"),
    ((4, 3, 2, 5), 2, "own"), ((10, 3), -1, "keras"), ((10, 3), 0, "keras"), ((5,), 0, "keras")])
def test_masked_training_matches_reference(shape, axis, rule):
    layer = BatchNormalization(axis=axis, momentum=0.7)
    layer.build(shape)
    ref = reference_for(layer, shape[axis], random_weights(layer))
    rng = np.random.default_rng(5)
    for step in range(3):
        x = data(shape, seed=step)
        if rule == "keras":
            mask = rng.random(shape[:-1]) > 0.4
            w = keras_mask_weights(mask, shape)
        else:
            mask = rng.random(shape[:axis] + shape[axis + 1:]) > 0.4
            w = own_mask_weights(mask, shape, axis)
        y = layer(x, training=True, mask=mask)
        np.testing.assert_allclose(y, ref.forward(x, True, w), **F32_TOL)
        assert_weights_match(layer, ref)
        dy = data(shape, seed=50 + step)
        dx = layer.backward(dy)
        rdx, rdg, rdb = ref.backward(dy)
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.gradients[0], rdg, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.gradients[1], rdb, rtol=1e-5, atol=1e-4)


def test_masked_positions_do_not_enter_statistics_but_are_normalized():
    x = data((8, 2))
    x[6:] = 1e6  # huge values at masked positions
    x[7, 0] = np.nan
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    layer = BatchNormalization(momentum=0.0)
    y = layer(x, training=True, mask=mask)
    np.testing.assert_allclose(layer.moving_mean, x[:6].mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, x[:6].var(0), rtol=1e-4)
    assert np.all(np.isfinite(y[:7])) and np.isnan(y[7, 0])
    assert np.all(y[6] > 1e3)  # normalized with the unmasked statistics


def test_mask_value_forms_are_equivalent():
    x = data((8, 5, 3))
    rng = np.random.default_rng(0)
    b = rng.random((8, 5)) > 0.5
    outs = []
    for m in (b, b.astype(np.int64), b.astype(np.float32), b * 0.5):  # cast to bool, as Keras
        layer = BatchNormalization()
        outs.append((layer(x, training=True, mask=m), layer.moving_mean.copy()))
    for y, mm in outs[1:]:
        np.testing.assert_array_equal(y, outs[0][0])
        np.testing.assert_array_equal(mm, outs[0][1])


def test_broadcastable_keras_mask():
    x = data((4, 6, 3))
    full = np.repeat(np.array([[1], [0], [1], [1]], bool), 6, axis=1)
    a, b = BatchNormalization(), BatchNormalization()
    np.testing.assert_array_equal(a(x, training=True, mask=full[:, :1]),
                                  b(x, training=True, mask=full))


def test_all_masked_gives_zero_statistics_like_keras():
    layer = BatchNormalization(momentum=0.5)
    x = data((6, 3))
    y = layer(x, training=True, mask=np.zeros(6, bool))
    np.testing.assert_allclose(layer.moving_mean, 0.0)
    np.testing.assert_allclose(layer.moving_variance, 0.5)
    np.testing.assert_allclose(y, x / np.sqrt(1e-3), rtol=1e-5)
    dx = layer.backward(np.ones_like(y))
    np.testing.assert_allclose(dx, np.full_like(x, 1 / np.sqrt(1e-3)), rtol=1e-5)


def test_mask_errors_and_inference():
    layer = BatchNormalization(axis=1)
    x = data((4, 3, 5))
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=True, mask=np.ones((4, 3, 5), bool))
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=True, mask=np.ones((4, 2), bool))
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=False, mask=np.ones(4, bool))
    with pytest.raises(TypeError, match="mask"):
        layer(x, training=True, mask=np.array([["a"] * 3] * 4))
    # inference ignores the mask
    np.testing.assert_array_equal(layer(x, mask=np.zeros((4, 3), bool)), layer(x))


# ---------------------------------------------------------------------------------------------
# renorm


@pytest.mark.parametrize("clipping", [None, {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1},
                                      {"rmax": 1.5}, {"dmax": 0.0}, {"rmin": 1.2}])
@pytest.mark.parametrize("center, scale", [(True, True), (False, False), (True, False)])
def test_renorm_matches_reference(clipping, center, scale):
    shape = (12, 3, 4)
    layer = BatchNormalization(axis=1, renorm=True, renorm_clipping=clipping, momentum=0.9,
                               renorm_momentum=0.6, center=center, scale=scale)
    layer.build(shape)
    ref = reference_for(layer, 3, random_weights(layer))
    for step in range(4):
        x = data(shape, seed=step, offset=step)
        y = layer(x, training=True)
        np.testing.assert_allclose(y, ref.forward(x, True), **F32_TOL)
        assert_weights_match(layer, ref)
        dy = data(shape, seed=10 + step)
        dx = layer.backward(dy)
        rdx, rdg, rdb = ref.backward(dy)
        np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
        grads = dict(zip(layer.trainable_weight_names, layer.gradients))
        if scale:
            np.testing.assert_allclose(grads["gamma"], rdg, rtol=1e-4, atol=1e-4)
        if center:
            np.testing.assert_allclose(grads["beta"], rdb, rtol=1e-5, atol=1e-4)
    x = data(shape, seed=7)
    np.testing.assert_allclose(layer(x), ref.forward(x, False), **F32_TOL)


def test_renorm_moving_variance_derived_from_stddev():
    layer = BatchNormalization(renorm=True, momentum=0.5)
    layer(data((64, 2), scale=3.0), training=True)
    np.testing.assert_allclose(layer.moving_variance,
                               np.maximum(layer.moving_stddev ** 2 - 1e-3, 0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# dtype policies


@pytest.mark.parametrize("policy, in_dtype, out_dtype", [
    ("float32", np.float32, np.float32), ("float32", np.float64, np.float32),
    ("float32", np.float16, np.float32), ("float32", np.int32, np.float32),
    ("float32", np.bool_, np.float32), ("float32", np.uint8, np.float32),
    ("float64", np.float32, np.float64), ("float64", np.int64, np.float64),
    ("mixed_float16", np.float32, np.float16), ("mixed_float16", np.int32, np.float16),
    ("float16", np.float32, np.float16), ("mixed_bfloat16", np.float32, "bfloat16"),
    ("bfloat16", np.float64, "bfloat16")])
def test_output_dtype_follows_policy(policy, in_dtype, out_dtype):
    if "bfloat16" in policy and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    out_dtype = BF16 if out_dtype == "bfloat16" else np.dtype(out_dtype)
    x = (data((16, 3)) * 3).astype(in_dtype)
    for training in (True, False):
        layer = BatchNormalization(dtype=policy)
        y = layer(x, training=training)
        assert y.dtype == out_dtype
        dx = layer.backward(np.ones(y.shape, y.dtype))
        # dx has the input's dtype; integer inputs compute (and differentiate) in float32
        assert dx.dtype == (in_dtype if np.dtype(in_dtype).kind == "f" else np.float32)


def test_float_inputs_are_cast_to_compute_dtype_first():
    x = data((32, 3), dtype=np.float64) + 1e-4 * np.arange(3)
    a, b = BatchNormalization(), BatchNormalization()
    np.testing.assert_array_equal(a(x, training=True), b(x.astype(np.float32), training=True))
    h1, h2 = BatchNormalization(dtype="mixed_float16"), BatchNormalization(dtype="mixed_float16")
    np.testing.assert_array_equal(h1(x, training=True), h2(x.astype(np.float16), training=True))
    np.testing.assert_array_equal(h1.moving_variance, h2.moving_variance)


def test_float64_policy_computes_in_float64():
    rng = np.random.default_rng(0)
    x = 1.0 + 1e-4 * rng.standard_normal((64, 3))
    layer = BatchNormalization(dtype="float64", momentum=0.0, epsilon=1e-12)
    y = layer(x, training=True)
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-12)
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.moving_variance, x.var(0), rtol=1e-9)


def test_mixed_precision_matches_float32_rounded():
    x = data((64, 4), dtype=np.float16)
    m16, m32 = BatchNormalization(dtype="mixed_float16"), BatchNormalization()
    y16 = m16(x, training=True)
    y32 = m32(x.astype(np.float32), training=True)
    # computed in float32 and rounded once (allow one unit for a different kernel path)
    np.testing.assert_array_max_ulp(y16, y32.astype(np.float16), maxulp=1)
    np.testing.assert_allclose(m16.moving_mean, m32.moving_mean, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# backward


def numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("case", ["train", "infer", "mask_keras", "mask_own", "renorm",
                                  "no_scale", "no_center", "rank1", "renorm_mask_rows"])
def test_backward_matches_finite_differences(case):
    axis = 1 if case in ("mask_keras", "mask_own", "renorm_mask_rows") else -1
    shape = (5,) if case == "rank1" else (4, 3, 2)
    kw = dict(axis=axis, dtype="float64", momentum=0.5)
    if case.startswith("renorm"):
        # Keras stops the gradient at r and d; pinning them by clipping makes the true
        # derivative (what finite differences see) equal to that.
        kw.update(renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 1.1, "dmax": 0.0})
    if case == "no_scale":
        kw["scale"] = False
    if case == "no_center":
        kw["center"] = False
    layer = BatchNormalization(**kw)
    layer.build(shape)
    random_weights(layer)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    mask = None
    if case in ("mask_keras", "renorm_mask_rows"):
        mask = rng.random(shape[:-1]) > 0.3
    elif case == "mask_own":
        mask = rng.random((4, 2)) > 0.3
    training = case != "infer"
    state = layer.get_weights()

    def loss():
        layer.set_weights(state)  # the statistics update must not leak into the next eval
        return float(np.sum(layer(x, training=training, mask=mask) * dy))

    gx = numeric_grad(loss, x)
    params = {n: w.copy() for n, w in zip(layer.weight_names, state)}
    gp = {}
    for name in layer.trainable_weight_names:
        p = params[name]

        def loss_p(name=name, p=p):
            layer.set_weights([p if n == name else params[n] for n in layer.weight_names])
            return float(np.sum(layer(x, training=training, mask=mask) * dy))

        gp[name] = numeric_grad(loss_p, p)
    layer.set_weights(state)
    layer(x, training=training, mask=mask)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, gx, rtol=1e-6, atol=1e-7)
    for name, g in zip(layer.trainable_weight_names, layer.gradients):
        np.testing.assert_allclose(g, gp[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_torch_autograd(training):
    torch = pytest.importorskip("torch")
    shape = (6, 4, 3, 5)  # NCHW, axis=1: torch's own batch_norm layout
    layer = BatchNormalization(axis=1, epsilon=1e-3, dtype="float64")
    layer.build(shape)
    w = random_weights(layer)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    g = torch.tensor(w["gamma"], requires_grad=True)
    b = torch.tensor(w["beta"], requires_grad=True)
    yt = torch.nn.functional.batch_norm(
        xt, torch.tensor(w["moving_mean"]), torch.tensor(w["moving_variance"]), g, b,
        training=training, momentum=0.0, eps=1e-3)
    (yt * torch.tensor(dy)).sum().backward()
    y = layer(x, training=training)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.gradients[0], g.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.gradients[1], b.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_regularizer_gradients_and_losses():
    layer = BatchNormalization(gamma_regularizer=regularizers.L1L2(l1=0.1, l2=0.2),
                               beta_regularizer="l2", dtype="float64")
    x = data((8, 3), dtype=np.float64)
    layer.build(x.shape)
    w = random_weights(layer)
    y = layer(x, training=True)
    dy = np.ones_like(y)
    layer.backward(dy)
    plain = BatchNormalization(dtype="float64")
    plain.build(x.shape)
    plain.set_weights(list(w.values()))
    plain(x, training=True)
    plain.backward(dy)
    g, b = w["gamma"], w["beta"]
    np.testing.assert_allclose(layer.gradients[0],
                               plain.gradients[0] + 0.1 * np.sign(g) + 0.4 * g, rtol=1e-12)
    np.testing.assert_allclose(layer.gradients[1], plain.gradients[1] + 0.02 * b, rtol=1e-12)
    losses = layer.losses
    assert len(losses) == 2
    np.testing.assert_allclose(losses[0], 0.1 * np.abs(g).sum() + 0.2 * (g ** 2).sum())
    np.testing.assert_allclose(losses[1], 0.01 * (b ** 2).sum())


def test_callable_regularizer_gets_numeric_gradient():
    layer = BatchNormalization(gamma_regularizer=lambda w: 0.5 * float(np.sum(w ** 3)),
                               dtype="float64")
    x = data((8, 3), dtype=np.float64)
    layer(x, training=True)
    layer.gamma[...] = [1.0, 2.0, -1.0]
    layer(x, training=True)
    layer.backward(np.zeros_like(x))
    np.testing.assert_allclose(layer.gradients[0], 1.5 * layer.gamma ** 2, rtol=1e-6)


def test_backward_errors():
    layer = BatchNormalization()
    with pytest.raises(NoForwardError):
        layer.backward(np.ones((2, 3)))
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((2, 3)))
    layer(data((4, 3)), training=True)
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.ones((4, 2)))
    with pytest.raises(TypeError, match="dy"):
        layer.backward(np.full((4, 3), "a"))


def test_gradients_align_with_trainable_weights_for_sgd():
    layer = BatchNormalization(center=False)
    x = data((16, 3))
    y = layer(x, training=True)
    layer.backward(y)  # d/dy of 0.5*sum(y**2)
    assert len(layer.gradients) == len(layer.trainable_weights) == 1
    assert layer.gradients[0].dtype == layer.gamma.dtype
    before = 0.5 * float(np.sum(y ** 2))
    for w, g in zip(layer.trainable_weights, layer.gradients):
        w -= 0.1 * g  # in place: the live weight
    after = 0.5 * float(np.sum(layer(x, training=True) ** 2))
    assert after < before


# ---------------------------------------------------------------------------------------------
# weights API, constraints


def test_get_set_weights_validation():
    layer = BatchNormalization()
    layer.build((2, 3))
    with pytest.raises(ValueError, match="4"):
        layer.set_weights([np.ones(3)] * 3)
    with pytest.raises(ValueError, match="shape"):
        layer.set_weights([np.ones(3)] * 3 + [np.ones(4)])
    with pytest.raises(TypeError):
        layer.set_weights([np.ones(3)] * 3 + [np.ones(3, complex)])
    with pytest.raises(TypeError):
        layer.set_weights([np.ones(3)] * 3 + [np.array(["a", "b", "c"])])
    live = layer.moving_mean
    layer.set_weights([np.arange(3, dtype=np.float64) + i for i in range(4)])
    assert live is layer.moving_mean and live.dtype == np.float32
    np.testing.assert_array_equal(layer.get_weights()[2], [2, 3, 4])
    got = layer.get_weights()
    got[0][:] = 100
    assert np.all(layer.gamma != 100)  # copies
    unbuilt = BatchNormalization()
    with pytest.raises(ValueError):
        unbuilt.set_weights([np.ones(3)])
    unbuilt.set_weights([])


def test_apply_constraints():
    layer = BatchNormalization(gamma_constraint=constraints.MaxNorm(1.0),
                               beta_constraint="non_neg")
    layer.build((2, 4))
    layer.set_weights([np.array([3.0, 4.0, 0, 0]), np.array([-1.0, 2, -3, 4]),
                       np.zeros(4), np.ones(4)])
    layer.apply_constraints()
    np.testing.assert_allclose(layer.gamma, [0.6, 0.8, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(layer.beta, [0, 2, 0, 4])
    layer.trainable = False
    layer.gamma[...] = 10.0
    layer.apply_constraints()  # frozen: nothing changes
    assert np.all(layer.gamma == 10.0)


# ---------------------------------------------------------------------------------------------
# threads


def test_concurrent_training_calls_lose_no_update():
    x = data((64, 8))
    shared = BatchNormalization(momentum=0.9)
    serial = BatchNormalization(momentum=0.9)
    n = 40
    for _ in range(2 * n):
        serial(x, training=True)
    errors = []

    def work():
        try:
            for _ in range(n):
                y = shared(x, training=True)
                shared.backward(y)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_array_equal(shared.moving_mean, serial.moving_mean)
    np.testing.assert_array_equal(shared.moving_variance, serial.moving_variance)


def test_backward_uses_the_calling_threads_forward():
    layer = BatchNormalization()
    xa, xb = data((16, 3), seed=1), data((32, 3), seed=2)
    results = {}
    barrier = threading.Barrier(2)

    def work(key, x):
        layer(x, training=True)
        barrier.wait()  # both forwards done before either backward
        results[key] = layer.backward(np.ones_like(x))

    threads = [threading.Thread(target=work, args=("a", xa)),
               threading.Thread(target=work, args=("b", xb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"].shape == xa.shape and results["b"].shape == xb.shape
