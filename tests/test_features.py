"""bn_cy's own options (issue 7): precise statistics, the variance estimator, the non-finite
guard, ghost batches; each checked against an independent NumPy (or PyTorch) computation."""

import io

import numpy as np
import pytest

from bn_cy import BatchNormalization


def rng(seed=0):
    return np.random.default_rng(seed)


def batches(n=5, shape=(16, 3), seed=0):
    r = rng(seed)
    return [(r.standard_normal(shape) * (1 + i) + i).astype(np.float64) for i in range(n)]


# -- 1. precise statistics ----------------------------------------------------------------

def test_momentum_none_is_cumulative_average():
    data = batches(6)
    layer = BatchNormalization(momentum=None, dtype="float64")
    for i, x in enumerate(data):
        layer(x, training=True)
        assert layer.num_batches_tracked == i + 1
    np.testing.assert_allclose(layer.moving_mean, np.mean([x.mean(0) for x in data], 0),
                               rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, np.mean([x.var(0) for x in data], 0),
                               rtol=1e-12)
    assert layer.get_config()["momentum"] is None
    clone = BatchNormalization.from_config(layer.get_config())
    assert clone.momentum is None


def test_num_batches_tracked_counts_training_updates_and_survives_save(tmp_path):
    layer = BatchNormalization()
    x = rng().standard_normal((8, 2))
    layer(x, training=True)
    layer(x, training=False)
    layer(x, training=True)
    assert layer.num_batches_tracked == 2
    path = tmp_path / "bn.npz"
    layer.save(path)
    assert BatchNormalization.load(path).num_batches_tracked == 2


def test_reset_moving_statistics():
    layer = BatchNormalization(moving_variance_initializer="zeros", renorm=True)
    layer(rng().standard_normal((8, 2)) + 3, training=True)
    assert layer.moving_mean.any()
    layer.reset_moving_statistics()
    np.testing.assert_array_equal(layer.moving_mean, 0)
    np.testing.assert_array_equal(layer.moving_variance, 0)
    np.testing.assert_array_equal(layer.renorm_stddev, 0)
    assert layer.num_batches_tracked == 0
    BatchNormalization().reset_moving_statistics()  # not built: nothing to do


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_recompute_statistics_equals_concatenated_data(estimator):
    data = batches(7, (13, 2, 4), seed=3)
    layer = BatchNormalization(axis=1, dtype="float64", moving_variance_estimator=estimator)
    ticks = []
    n = layer.recompute_statistics(iter(data), progress=ticks.append)
    assert n == 7 and ticks == list(range(1, 8)) and layer.num_batches_tracked == 7
    allx = np.concatenate(data)
    np.testing.assert_allclose(layer.moving_mean, allx.mean((0, 2)), rtol=1e-12)
    ddof = 1 if estimator == "unbiased" else 0
    np.testing.assert_allclose(layer.moving_variance, allx.var((0, 2), ddof=ddof), rtol=1e-12)


def test_recompute_statistics_float32_large_offset_and_progress(capsys):
    data = [(rng(i).standard_normal((64, 3)) + 1e4).astype(np.float32) for i in range(4)]
    layer = BatchNormalization()
    layer.recompute_statistics(data, progress=True)
    allx = np.concatenate(data).astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean, allx.mean(0), rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, allx.var(0), rtol=1e-4)
    assert "4 batches" in capsys.readouterr().err


def test_recompute_statistics_with_masks():
    r = rng(5)
    xs = [r.standard_normal((10, 3)) for _ in range(3)]
    ms = [r.random(10) > 0.5 for _ in range(3)]
    ms[1][:] = False  # a fully masked batch contributes nothing
    layer = BatchNormalization(dtype="float64")
    layer.recompute_statistics(zip(xs, ms))
    sel = np.concatenate([x[m] for x, m in zip(xs, ms)])
    np.testing.assert_allclose(layer.moving_mean, sel.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, sel.var(0), rtol=1e-12)
    # Keras's rule with the feature axis not last: rows of the last axis per channel
    x = [r.standard_normal((6, 3, 5)) for _ in range(2)]
    m = [r.random((6, 3)) > 0.3 for _ in range(2)]
    layer = BatchNormalization(axis=1, dtype="float64")
    layer.recompute_statistics(zip(x, m))
    for c in range(3):
        vals = np.concatenate([xi[:, c][mi[:, c]].ravel() for xi, mi in zip(x, m)])
        np.testing.assert_allclose(layer.moving_mean[c], vals.mean(), rtol=1e-12)
        np.testing.assert_allclose(layer.moving_variance[c], vals.var(), rtol=1e-12)


def test_recompute_statistics_errors():
    with pytest.raises(ValueError, match="at least one batch"):
        BatchNormalization().recompute_statistics([])
    layer = BatchNormalization()
    layer.build((None, 3))
    with pytest.raises(ValueError):
        layer.recompute_statistics([np.ones((4, 2))])


# -- 2. variance estimator ----------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_unbiased_estimator_updates(masked):
    r = rng(2)
    x = r.standard_normal((9, 4))
    mask = r.random(9) > 0.3 if masked else None
    layer = BatchNormalization(momentum=0.6, dtype="float64",
                               moving_variance_estimator="unbiased")
    y = layer(x, training=True, mask=mask)
    sel = x if mask is None else x[mask]
    np.testing.assert_allclose(layer.moving_variance, 0.6 + 0.4 * sel.var(0, ddof=1),
                               rtol=1e-12)
    # the normalization itself uses the biased batch variance, as Keras and PyTorch do
    np.testing.assert_allclose(y, (x - sel.mean(0)) / np.sqrt(sel.var(0) + 1e-3), rtol=1e-10)
    assert layer.get_config()["moving_variance_estimator"] == "unbiased"
    assert "moving_variance_estimator" not in BatchNormalization().get_config()


def test_estimator_validation():
    with pytest.raises(ValueError, match="moving_variance_estimator"):
        BatchNormalization(moving_variance_estimator="bessel")
    with pytest.raises(NotImplementedError):
        BatchNormalization(renorm=True, momentum=None)


# -- 5. non-finite guard ------------------------------------------------------------------

def test_skip_nonfinite_updates_keeps_bad_channels():
    x = rng().standard_normal((8, 3))
    layer = BatchNormalization(momentum=0.5, skip_nonfinite_updates=True, dtype="float64")
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    bad = x.copy()
    bad[2, 1] = np.nan
    bad[3, 2] = np.inf
    layer(bad, training=True)
    assert layer.skipped_updates == 1
    np.testing.assert_array_equal(layer.moving_mean[1:], before[2][1:])
    np.testing.assert_array_equal(layer.moving_variance[1:], before[3][1:])
    np.testing.assert_allclose(layer.moving_mean[0], 0.5 * before[2][0] + 0.5 * x[:, 0].mean())
    bad[:, 0] = np.nan
    layer(bad, training=True)
    assert layer.skipped_updates == 2 and layer.num_batches_tracked == 2
    assert np.isfinite(layer.moving_variance).all()
    plain = BatchNormalization()
    plain(bad, training=True)
    assert np.isnan(plain.moving_mean).all()  # Keras's behaviour stays the default
    assert layer.get_config()["skip_nonfinite_updates"] is True


def test_skip_nonfinite_updates_with_renorm():
    layer = BatchNormalization(renorm=True, skip_nonfinite_updates=True)
    x = rng().standard_normal((8, 2)).astype(np.float32)
    layer(x, training=True)
    before = [w.copy() for w in layer.get_weights()]
    x[0, 0] = np.nan
    layer(x, training=True)
    for b, w, name in zip(before, layer.get_weights(), layer.weight_names):
        if name not in ("gamma", "beta"):
            np.testing.assert_array_equal(w[0], b[0])
            assert w[1] != b[1]


# -- 7. ghost batches ---------------------------------------------------------------------

def test_virtual_batch_size_forward_moving_and_inference():
    r = rng(8)
    x = r.standard_normal((12, 2, 3))
    layer = BatchNormalization(axis=1, virtual_batch_size=4, momentum=0.5, dtype="float64")
    y = layer(x, training=True)
    mm, mv = np.zeros(2), np.ones(2)
    for g in range(3):
        part = x[4 * g:4 * g + 4]
        m, v = part.mean((0, 2)), part.var((0, 2))
        want = (part - m[None, :, None]) / np.sqrt(v[None, :, None] + 1e-3)
        np.testing.assert_allclose(y[4 * g:4 * g + 4], want, rtol=1e-10, atol=1e-12)
        mm, mv = 0.5 * mm + 0.5 * m, 0.5 * mv + 0.5 * v
    np.testing.assert_allclose(layer.moving_mean, mm, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, mv, rtol=1e-12)
    assert layer.num_batches_tracked == 3
    # inference ignores the groups: any batch size
    xi = r.standard_normal((5, 2, 3))
    np.testing.assert_allclose(layer(xi), (xi - mm[None, :, None]) /
                               np.sqrt(mv[None, :, None] + 1e-3), rtol=1e-10)


def test_virtual_batch_size_backward_matches_torch():
    torch = pytest.importorskip("torch")
    r = rng(9)
    x = r.standard_normal((8, 3))
    dy = r.standard_normal((8, 3))
    mask = r.random(8) > 0.2
    mask[:2] = True
    layer = BatchNormalization(virtual_batch_size=4, dtype="float64",
                               gamma_initializer="random_normal")
    layer(x, training=True, mask=mask)
    dx = layer.backward(dy)
    g = torch.tensor(layer.gamma, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    outs = []
    for k in range(2):
        part = xt[4 * k:4 * k + 4]
        w = torch.tensor(mask[4 * k:4 * k + 4], dtype=torch.float64)[:, None]
        m = (part * w).sum(0) / w.sum()
        v = (((part - m) ** 2) * w).sum(0) / w.sum()
        outs.append((part - m) / torch.sqrt(v + 1e-3) * g + b)
    (torch.cat(outs) * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.gradients[0], g.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(layer.gradients[1], b.grad.numpy(), rtol=1e-9)


def test_virtual_batch_size_errors_and_config():
    layer = BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match="multiple of virtual_batch_size"):
        layer(np.ones((6, 2)), training=True)
    layer(np.ones((6, 2)), training=False)  # inference: no groups
    with pytest.raises(ValueError, match="virtual_batch_size"):
        BatchNormalization(virtual_batch_size=0)
    with pytest.raises(ValueError, match="feature axis"):
        BatchNormalization(axis=0, virtual_batch_size=2)(np.ones((4, 3)), training=True)
    cfg = BatchNormalization(virtual_batch_size=4).get_config()
    assert cfg["virtual_batch_size"] == 4
    assert BatchNormalization.from_config(cfg).virtual_batch_size == 4


def test_new_options_survive_save_load_and_pickle():
    import pickle

    layer = BatchNormalization(momentum=None, moving_variance_estimator="unbiased",
                               skip_nonfinite_updates=True, virtual_batch_size=2)
    layer(rng().standard_normal((4, 3)), training=True)
    buf = io.BytesIO()
    layer.save(buf)
    buf.seek(0)
    for clone in (BatchNormalization.load(buf), pickle.loads(pickle.dumps(layer))):
        assert clone.get_config() == layer.get_config()
        assert clone.num_batches_tracked == 2
        for a, b in zip(clone.get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_defaults_keep_keras_config_keys():
    keys = set(BatchNormalization().get_config())
    assert not keys & {"moving_variance_estimator", "skip_nonfinite_updates",
                       "virtual_batch_size"}
