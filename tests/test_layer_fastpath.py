"""The layer's hot paths (direct kernel calls, cached per-shape checks) give bitwise the
results of the functional ops, and the cache never hides a check."""

import numpy as np
import pytest

import bn_cy
from bn_cy import BatchNormalization


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "fortran"])
def test_direct_paths_equal_ops(dtype, layout):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20, 6)) * 3 + 1).astype(dtype)
    if layout == "strided":
        x = (rng.standard_normal((40, 12)) * 3 + 1).astype(dtype)[::2, ::2]
    elif layout == "fortran":
        x = np.asfortranarray(x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    policy = "float64" if dtype == np.float64 else "float32"
    layer = BatchNormalization(momentum=0.7, dtype=policy, gamma_initializer="random_normal",
                               beta_initializer="random_normal")
    layer.build(x.shape)
    g, b = layer.gamma.copy(), layer.beta.copy()
    mm, mv = layer.moving_mean.copy(), layer.moving_variance.copy()
    for step in range(3):
        y = layer(x, training=True)
        ry, rm, rv = bn_cy.batch_norm_train(x, g, b, epsilon=1e-3)
        np.testing.assert_array_equal(y, ry)
        mom, rest = np.dtype(policy).type(0.7), np.dtype(policy).type(1 - 0.7)
        mm = mm * mom + rm.astype(policy) * rest
        mv = mv * mom + rv.astype(policy) * rest
        np.testing.assert_array_equal(layer.moving_mean, mm)
        np.testing.assert_array_equal(layer.moving_variance, mv)
        dx = layer.backward(dy)
        rdx, rdg, rdb = bn_cy.batch_norm_backward(dy, x, rm, rv, g, epsilon=1e-3)
        np.testing.assert_array_equal(dx, rdx)
        np.testing.assert_array_equal(layer.gradients[0], rdg.astype(policy))
        np.testing.assert_array_equal(layer.gradients[1], rdb.astype(policy))
    yi = layer(x, training=False)
    np.testing.assert_array_equal(yi, bn_cy.batch_norm(x, mm, mv, g, b, epsilon=1e-3))
    np.testing.assert_array_equal(layer.backward(dy),
                                  bn_cy.batch_norm_backward(dy, x, mm, mv, g, training=False)[0])


def test_cache_does_not_skip_checks():
    layer = BatchNormalization()
    layer(np.ones((4, 3), np.float32), training=True)
    layer(np.ones((4, 3), np.float32), training=True)  # cached
    with pytest.raises(ValueError):
        layer(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError):
        layer(np.ones((4, 3, 1), np.float32))
    with pytest.raises(TypeError):
        layer(np.ones((4, 3), np.complex64))
    y = layer(np.ones((4, 3), np.int64), training=False)  # ints: computed in float32
    assert y.dtype == np.float32
    y = layer(np.ones((4, 3), np.float64), training=False)  # cast to the compute dtype
    assert y.dtype == np.float32
    big_endian = np.ones((4, 3), ">f4")
    np.testing.assert_array_equal(layer(big_endian), layer(np.ones((4, 3), np.float32)))


def test_momentum_change_after_calls_is_used():
    x = np.random.default_rng(1).standard_normal((8, 2))
    layer = BatchNormalization(dtype="float64")
    layer(x, training=True)
    layer.momentum = 0.0
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean, x.mean(0), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moving_arrays_the_compiled_update_cannot_take(dtype):
    # The common training call updates contiguous moving arrays in the compiled call; moving
    # arrays a user replaced with strided views go the general way, with the same arithmetic,
    # in place (the views' bases change), and the batch is counted either way.
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 5)) * 2 - 1).astype(dtype)
    policy = np.dtype(dtype).name
    layer = BatchNormalization(momentum=0.6, dtype=policy)
    layer.build(x.shape)
    base_mean, base_var = np.zeros(10, dtype), np.ones(10, dtype)
    layer.moving_mean, layer.moving_variance = base_mean[::2], base_var[::2]
    y = layer(x, training=True)
    ry, rm, rv = bn_cy.batch_norm_train(x, layer.gamma, layer.beta, epsilon=1e-3)
    np.testing.assert_array_equal(y, ry)
    mom, rest = np.dtype(dtype).type(0.6), np.dtype(dtype).type(1 - 0.6)
    np.testing.assert_array_equal(base_mean[::2], np.zeros(5, dtype) * mom + rm * rest)
    np.testing.assert_array_equal(base_var[::2], np.ones(5, dtype) * mom + rv * rest)
    np.testing.assert_array_equal(base_mean[1::2], 0)
    assert layer.num_batches_tracked == 1
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(
        layer.backward(dy), bn_cy.batch_norm_backward(dy, x, rm, rv, layer.gamma)[0])


def test_backward_after_the_common_training_call_uses_its_gamma():
    # The compiled training call keeps a copy of gamma for the backward: an update of gamma
    # in between (an optimizer step) does not change the gradient of the call made before it.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = BatchNormalization(gamma_initializer="random_normal")
    layer(x, training=True)
    gamma = layer.gamma.copy()
    _, rm, rv = bn_cy.batch_norm_train(x, gamma, layer.beta, epsilon=1e-3)
    layer.gamma -= 0.5
    dx = layer.backward(dy)
    rdx, rdg, rdb = bn_cy.batch_norm_backward(dy, x, rm, rv, gamma, epsilon=1e-3)
    np.testing.assert_array_equal(dx, rdx)
    np.testing.assert_array_equal(layer.gradients[0], rdg)
    assert layer.backward(dy).dtype == np.float32


@pytest.mark.parametrize("training", [True, False])
def test_replaced_weights_are_checked(training):
    # The hot paths trust the layer's own weights; a weight a user replaced goes through the
    # ops' checks: a wrong length is an error naming it, a list is taken as an array.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    layer = BatchNormalization()
    layer(x, training=True)
    for bad in (np.ones(4, np.float32), np.ones(2, np.float32), np.ones((3, 1), np.float32)):
        layer.gamma = bad
        with pytest.raises(ValueError, match="gamma"):
            layer(x, training=training)
    layer.gamma = [1.0, 2.0, 3.0]
    expected = layer(x, training=training)
    layer.gamma = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(layer(x, training=training), expected)
    layer.moving_mean = np.zeros(2, np.float32)
    with pytest.raises(ValueError):
        layer(x, training=training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["moving_mean", "moving_variance"])
def test_replaced_moving_statistics_are_checked(name, training):
    # A moving statistic a user replaced with something the layer cannot use (or, in training,
    # cannot update in place) is an error naming it, raised before anything is updated.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    cases = [(np.zeros(2, np.float32), ValueError, "shape"),
             (np.zeros(4, np.float32), ValueError, "shape"),
             (np.zeros((3, 1), np.float32), ValueError, "shape")]
    if not training:
        cases += [(np.zeros(3, np.complex64), TypeError, "real numbers")]
    if training:
        read_only = np.zeros(3, np.float32)
        read_only.flags.writeable = False
        cases += [([0.0, 0.0, 0.0], TypeError, "NumPy array"),
                  (np.zeros(3, np.int64), TypeError, "floating-point"),
                  (read_only, ValueError, "read-only")]
    for bad, error, what in cases:
        layer = BatchNormalization(name="bn")
        layer(x, training=True)
        other = "moving_variance" if name == "moving_mean" else "moving_mean"
        kept = getattr(layer, other).copy()
        tracked = layer.num_batches_tracked
        setattr(layer, name, bad)
        with pytest.raises(error, match="%s of layer 'bn'.*%s" % (name, what)):
            layer(x, training=training)
        np.testing.assert_array_equal(getattr(layer, other), kept)
        assert layer.num_batches_tracked == tracked
    # what inference can read, it takes as its values: a list, an integer array
    if not training:
        layer = BatchNormalization()
        layer(x, training=True)
        expected = layer(x, training=False)
        value = getattr(layer, name)
        setattr(layer, name, value.tolist())
        np.testing.assert_allclose(layer(x, training=False), expected, rtol=1e-6)
        setattr(layer, name, np.rint(value).astype(np.int64))
        reference = BatchNormalization()
        reference(x, training=True)
        setattr(reference, name, np.rint(value).astype(np.float32))
        np.testing.assert_allclose(layer(x, training=False), reference(x, training=False),
                                   rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_weights_replaced_by_tuples(training):
    # A weight a user replaced with a tuple (no .copy(), unlike a list) is read as its values,
    # and the backward of that call works; a tuple of non-numbers is an error naming it.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    dy = rng.standard_normal((16, 3)).astype(np.float32)
    names = ["gamma"] if training else ["gamma", "moving_mean", "moving_variance"]
    for name in names:
        layer = BatchNormalization(name="bn")
        layer(x, training=True)
        reference = BatchNormalization()
        reference(x, training=True)
        value = (getattr(layer, name) + np.float32(0.5)).astype(np.float32)
        setattr(reference, name, value.copy())
        setattr(layer, name, tuple(float(v) for v in value))
        y = layer(x, training=training)
        np.testing.assert_array_equal(y, reference(x, training=training))
        # independent float64 oracle of the same call
        if training:
            mean, var = x.mean(0, dtype=np.float64), x.var(0, dtype=np.float64)
        else:
            mean = np.asarray(reference.moving_mean, np.float64)
            var = np.asarray(reference.moving_variance, np.float64)
        want = ((x - mean) / np.sqrt(var + layer.epsilon) * np.asarray(reference.gamma, np.float64)
                + np.asarray(reference.beta, np.float64))
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(layer.backward(dy), reference.backward(dy))
        for got, ref in zip(layer.gradients, reference.gradients):
            np.testing.assert_array_equal(got, ref)
        setattr(layer, name, ("a", "b", "c"))
        with pytest.raises(TypeError, match="%s of layer 'bn'" % name):
            layer(x, training=training)
