"""BatchNormalization config round trips, Keras 2 configs, save/load, pickle and deepcopy."""

import copy
import io
import json
import pickle
import warnings
import zipfile

import numpy as np
import pytest

from bn_cy import constraints, initializers, regularizers
from bn_cy.layer import BatchNormalization


def trained_layer(**kwargs):
    kwargs.setdefault("axis", 1)
    layer = BatchNormalization(**kwargs)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((8, 3, 4)).astype(np.float32) * 2 + 1
        y = layer(x, training=True)
        layer.backward(y)
        for w, g in zip(layer.trainable_weights, layer.gradients):
            w -= 0.1 * g
    return layer


RICH = dict(axis=1, momentum=0.9, epsilon=1e-4, center=True, scale=True,
            beta_initializer=initializers.RandomUniform(-1, 1, seed=3),
            gamma_initializer="he_normal", moving_mean_initializer=initializers.Constant(0.5),
            moving_variance_initializer="ones",
            beta_regularizer=regularizers.L1L2(0.1, 0.2), gamma_regularizer="l1",
            beta_constraint=constraints.MaxNorm(3.0), gamma_constraint="non_neg",
            synchronized=True, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 2},
            renorm_momentum=0.8, name="rich_bn", dtype="float64", trainable=False)


def assert_same_layer(a, b):
    assert a.get_config() == b.get_config()
    assert a.weight_names == b.weight_names
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert wa.dtype == wb.dtype
        np.testing.assert_array_equal(wa, wb)
    x = np.random.default_rng(9).standard_normal((5, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))


# ---------------------------------------------------------------------------------------------
# configs


def test_config_round_trip_keeps_everything():
    layer = BatchNormalization(**RICH)
    cfg = layer.get_config()
    assert cfg["name"] == "rich_bn" and cfg["trainable"] is False
    assert cfg["dtype"] == {"module": "keras", "class_name": "DTypePolicy",
                            "config": {"name": "float64"}, "registered_name": None}
    assert cfg["renorm_clipping"] == {"rmax": 3.0, "dmax": 2}
    assert cfg["gamma_regularizer"]["config"] == {"l1": 0.009999999776482582}
    back = BatchNormalization.from_config(cfg)
    assert back.get_config() == cfg
    assert back.trainable is False and back.dtype_policy.name == "float64"
    assert isinstance(back.beta_initializer, initializers.RandomUniform)
    assert back.beta_initializer.seed == 3
    # the config is JSON text as is
    assert BatchNormalization.from_config(json.loads(json.dumps(cfg))).get_config() == cfg
    # get_config returns fresh dicts
    cfg["renorm_clipping"]["rmax"] = 100.0
    assert layer.get_config()["renorm_clipping"]["rmax"] == 3.0


def test_config_keys_are_keras_keys():
    assert set(BatchNormalization().get_config()) == {
        "name", "trainable", "dtype", "axis", "momentum", "epsilon", "center", "scale",
        "beta_initializer", "gamma_initializer", "moving_mean_initializer",
        "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
        "beta_constraint", "gamma_constraint", "synchronized", "renorm", "renorm_clipping",
        "renorm_momentum"}


def keras2_config(**extra):
    cfg = {
        "name": "batch_normalization_7", "trainable": True, "dtype": "float32", "axis": -1,
        "momentum": 0.99, "epsilon": 0.001, "center": True, "scale": True,
        "beta_initializer": {"class_name": "Zeros", "config": {}},
        "gamma_initializer": {"class_name": "Ones", "config": {}},
        "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
        "moving_variance_initializer": {"class_name": "Ones", "config": {}},
        "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None,
        "gamma_constraint": None,
    }
    cfg.update(extra)
    return cfg


def test_keras2_config_loads():
    layer = BatchNormalization.from_config(keras2_config(
        gamma_regularizer={"class_name": "L2", "config": {"l2": 0.001}},
        dtype={"class_name": "Policy", "config": {"name": "mixed_float16"}},
        axis=[3], renorm=True, renorm_clipping=None, renorm_momentum=0.9))
    assert layer.axis == 3 and layer.dtype_policy.name == "mixed_float16"
    assert isinstance(layer.gamma_regularizer, regularizers.L2)
    assert layer.gamma_regularizer.l2 == 0.001
    assert layer.renorm_clipping == {}


@pytest.mark.parametrize("key, value", [("fused", None), ("fused", True), ("fused", False),
                                        ("virtual_batch_size", None), ("adjustment", None)])
def test_keras2_keys_with_ignorable_values_warn(key, value):
    with pytest.warns(UserWarning, match=key):
        layer = BatchNormalization.from_config(keras2_config(**{key: value}))
    assert key not in layer.get_config()


@pytest.mark.parametrize("key, value", [("fused", "yes"), ("virtual_batch_size", "8"),
                                        ("adjustment", "some_fn")])
def test_keras2_keys_with_other_values_raise(key, value):
    with pytest.raises(ValueError, match=key):
        BatchNormalization.from_config(keras2_config(**{key: value}))


def test_from_config_errors_and_build_shapes():
    with pytest.raises(ValueError, match="bogus"):
        BatchNormalization.from_config(keras2_config(bogus=1))
    with pytest.raises(ValueError, match="axis"):
        BatchNormalization.from_config(keras2_config(axis=[1, 2]))
    with pytest.raises(ValueError, match="activity_regularizer"):
        BatchNormalization.from_config(keras2_config(activity_regularizer={
            "class_name": "L2", "config": {"l2": 0.1}}))
    with pytest.raises(TypeError):
        BatchNormalization.from_config([("axis", 1)])
    with pytest.raises(ValueError, match="gamma_initializer"):
        BatchNormalization.from_config(keras2_config(
            gamma_initializer={"class_name": "Orthogonal", "config": {}}))
    layer = BatchNormalization.from_config(keras2_config(batch_input_shape=[None, 5]))
    assert layer.built and layer.gamma.shape == (5,)
    assert BatchNormalization.from_config(keras2_config(activity_regularizer=None)).name
    layer = BatchNormalization.from_config({
        "module": "keras.layers", "class_name": "BatchNormalization",
        "config": keras2_config(axis=1), "build_config": {"input_shape": [None, 4, 2]}})
    assert layer.built and layer.gamma.shape == (4,)
    assert layer.get_build_config() == {"input_shape": [None, 4, 2]}


def my_gamma_init(shape, dtype=None):
    return np.full(shape, 3.0, dtype=dtype)


def test_custom_objects_in_configs():
    layer = BatchNormalization(gamma_initializer=my_gamma_init)
    cfg = layer.get_config()
    assert cfg["gamma_initializer"] == {"module": "builtins", "class_name": "function",
                                        "config": "my_gamma_init", "registered_name": "function"}
    with pytest.raises(ValueError, match="custom_objects"):
        BatchNormalization.from_config(cfg)
    back = BatchNormalization.from_config(cfg, custom_objects={"my_gamma_init": my_gamma_init})
    back.build((2, 3))
    assert np.all(back.gamma == 3.0)


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tmp_path):
    layer = trained_layer(**{k: v for k, v in RICH.items() if k != "trainable"})
    path = tmp_path / "layer.bn"
    assert layer.save(str(path)) == str(path)
    assert path.exists()  # written at exactly that path (no ".npz" appended)
    loaded = BatchNormalization.load(str(path))
    assert_same_layer(layer, loaded)
    # the file holds only plain arrays: nothing needs pickle
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
    assert names == sorted([n + ".npy" for n in layer.weight_names] + ["bn_cy_meta.npy"])
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["bn_cy_meta"]))
        assert all(data[n].dtype != object for n in data.files)
    assert meta["format"] == "bn_cy.BatchNormalization"
    assert meta["build_input_shape"] == [8, 3, 4]


def test_save_load_unbuilt_and_file_objects(tmp_path):
    layer = BatchNormalization(axis=2, momentum=0.5, name="fresh")
    buf = io.BytesIO()
    layer.save(buf)
    buf.seek(0)
    loaded = BatchNormalization.load(buf)
    assert not loaded.built and loaded.get_config() == layer.get_config()
    p = tmp_path / "plain.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a file"):
        BatchNormalization.load(p)


def test_load_finds_the_npz_suffix(tmp_path):
    layer = trained_layer()
    np.savez(tmp_path / "other", a=np.zeros(1))  # unrelated
    layer.save(tmp_path / "model.npz")
    assert_same_layer(layer, BatchNormalization.load(tmp_path / "model"))
    assert_same_layer(layer, BatchNormalization.load(str(tmp_path / "model.npz")))


def test_save_load_bfloat16_weights(tmp_path):
    pytest.importorskip("ml_dtypes")
    layer = BatchNormalization(dtype="bfloat16")
    layer(np.random.default_rng(0).standard_normal((16, 3)), training=True)
    path = tmp_path / "bf16.npz"
    layer.save(path)
    loaded = BatchNormalization.load(path)
    for a, b in zip(layer.get_weights(), loaded.get_weights()):
        assert a.dtype == b.dtype and a.dtype.name == "bfloat16"
        np.testing.assert_array_equal(a.astype(np.float32), b.astype(np.float32))


def test_load_with_custom_objects(tmp_path):
    layer = BatchNormalization(gamma_initializer=my_gamma_init)
    layer.build((2, 3))
    layer.save(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="custom_objects"):
        BatchNormalization.load(tmp_path / "c.npz")
    loaded = BatchNormalization.load(tmp_path / "c.npz",
                                     custom_objects={"my_gamma_init": my_gamma_init})
    assert np.all(loaded.gamma == 3.0)


# ---------------------------------------------------------------------------------------------
# pickle / deepcopy


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy(how):
    layer = trained_layer(**{k: v for k, v in RICH.items() if k != "trainable"})
    clone = pickle.loads(pickle.dumps(layer)) if how == "pickle" else copy.deepcopy(layer)
    with pytest.raises(RuntimeError):  # the forward record is not copied
        clone.backward(np.ones((8, 3, 4)))
    assert_same_layer(layer, clone)
    assert clone.gamma is not layer.gamma
    # independent state, working lock
    clone.moving_mean[...] = 42.0
    assert not np.any(layer.moving_mean == 42.0)
    clone(np.ones((2, 3, 4), np.float32), training=True)
    clone.backward(np.ones((2, 3, 4)))


def test_pickle_unbuilt_and_copy_of_policies():
    for policy in ("float32", "mixed_float16", "float64"):
        layer = BatchNormalization(dtype=policy)
        clone = pickle.loads(pickle.dumps(layer))
        assert clone.get_config() == layer.get_config() and not clone.built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy.deepcopy(BatchNormalization(renorm=True))


def test_keras2_virtual_batch_size_int_is_supported():
    layer = BatchNormalization.from_config(keras2_config(virtual_batch_size=8))
    assert layer.virtual_batch_size == 8
    assert layer.get_config()["virtual_batch_size"] == 8
