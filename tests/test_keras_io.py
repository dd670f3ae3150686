"""load_keras_layers (h5py only) on real Keras 3 files, and layer.to_keras()."""

import os

import numpy as np
import pytest

pytest.importorskip("h5py")
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
pytest.importorskip("torch")

from bn_cy import BatchNormalization  # noqa: E402
from bn_cy.keras_io import load_keras_layers  # noqa: E402

if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests drive Keras on the torch backend", allow_module_level=True)


def _np(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("keras_files")
    inp = keras.Input((5, 3))
    h = keras.layers.Dense(4)(inp)
    h = keras.layers.BatchNormalization(name="bn_a", momentum=0.9, epsilon=1e-4)(h)
    h = keras.layers.BatchNormalization(name="bn_b", axis=1, renorm=True)(h)
    sub = keras.Sequential([keras.Input((5, 4)),
                            keras.layers.BatchNormalization(center=False, name="bn_inner"),
                            keras.layers.Dense(2),
                            keras.layers.BatchNormalization(name="bn_last")], name="sub")
    out = sub(h)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    model.compile(optimizer="sgd", loss="mse")
    x = rng.standard_normal((32, 5, 3)).astype(np.float32)
    model.fit(x, rng.standard_normal((32, 5, 2)).astype(np.float32), epochs=1, batch_size=8,
              verbose=0)
    model.save(d / "m.keras")
    model.save_weights(d / "m.weights.h5")
    return model, d, x


def test_keras_archive_layers_equal_keras(model_files):
    model, d, x = model_files
    layers = load_keras_layers(str(d / "m.keras"))
    assert list(layers) == ["bn_a", "bn_b", "sub/bn_inner", "sub/bn_last"]
    kl = {"bn_a": model.get_layer("bn_a"), "bn_b": model.get_layer("bn_b"),
          "sub/bn_inner": model.get_layer("sub").get_layer("bn_inner"),
          "sub/bn_last": model.get_layer("sub").get_layer("bn_last")}
    assert layers["bn_a"].epsilon == 1e-4 and layers["bn_a"].momentum == 0.9
    assert layers["bn_b"].renorm and layers["bn_b"].axis == 1
    assert not layers["sub/bn_inner"].center
    for key, layer in layers.items():
        assert layer.get_config() == kl[key].get_config(), key
        for a, b in zip(layer.get_weights(), kl[key].get_weights()):
            np.testing.assert_array_equal(a, b)
        z = np.random.default_rng(1).standard_normal(layer._build_input_shape[1:])
        z = z[None].astype(np.float32)
        np.testing.assert_allclose(layer(z), _np(kl[key](z, training=False)), rtol=1e-5,
                                   atol=1e-5)


def test_weights_only_file(model_files):
    model, d, _ = model_files
    with pytest.raises(ValueError, match="3 variables"):
        load_keras_layers(str(d / "m.weights.h5"))
    m2 = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(),
                           keras.layers.BatchNormalization(scale=False, center=False)])
    m2.layers[0].set_weights([np.arange(3.0) + k for k in range(4)])
    path = str(d / "seq.weights.h5")
    m2.save_weights(path)
    layers = load_keras_layers(path)
    assert list(layers) == ["layers/batch_normalization", "layers/batch_normalization_1"]
    np.testing.assert_array_equal(layers["layers/batch_normalization"].moving_variance,
                                  np.arange(3.0) + 3)
    assert layers["layers/batch_normalization_1"].weight_names == ["moving_mean",
                                                                   "moving_variance"]


def test_to_keras_round_trip():
    layer = BatchNormalization(axis=1, momentum=0.8, epsilon=1e-2, renorm=True,
                               gamma_regularizer="l2")
    x = np.random.default_rng(2).standard_normal((6, 3, 2)).astype(np.float32)
    layer(x, training=True)
    kl = layer.to_keras()
    assert isinstance(kl, keras.layers.BatchNormalization)
    assert kl.get_config() == layer.get_config()
    np.testing.assert_allclose(_np(kl(x, training=False)), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNormalization(momentum=None).to_keras()
    with pytest.raises(ValueError, match="virtual_batch_size"):
        BatchNormalization(virtual_batch_size=2).to_keras()
