"""layer.folded(), fold_into_dense, fold_into_conv: the folded linear layer alone equals
linear-then-BN in inference mode."""

import numpy as np
import pytest

from bn_cy import BatchNormalization
from bn_cy.folding import fold_into_conv, fold_into_dense


def trained_layer(c, axis=-1, seed=0, shape=None, **kw):
    rng = np.random.default_rng(seed)
    layer = BatchNormalization(axis=axis, dtype="float64", momentum=0.5,
                               gamma_initializer="random_normal",
                               beta_initializer="random_normal", **kw)
    if shape is None:
        shape = (16, c) if axis == -1 else (16, c, 3, 2)
    for _ in range(3):
        layer(rng.standard_normal(shape) * 3 + 2, training=True)
    return layer


@pytest.mark.parametrize("kw", [{}, {"center": False}, {"scale": False}])
def test_folded_is_inference(kw):
    layer = trained_layer(4, **kw)
    scale, shift = layer.folded()
    x = np.random.default_rng(1).standard_normal((5, 4))
    np.testing.assert_allclose(x * scale + shift, layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["keras", "torch"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_dense(layout, with_bias):
    rng = np.random.default_rng(2)
    layer = trained_layer(4)
    kernel = rng.standard_normal((3, 4))
    bias = rng.standard_normal(4) if with_bias else None
    x = rng.standard_normal((7, 3))
    z = x @ kernel + (0 if bias is None else bias)
    k = kernel if layout == "keras" else kernel.T.copy()
    nk, nb = fold_into_dense(k, bias, layer, layout=layout)
    got = x @ (nk if layout == "keras" else nk.T) + nb
    np.testing.assert_allclose(got, layer(z), rtol=1e-12, atol=1e-12)


def test_fold_into_conv_torch_layout_matches_torch_conv():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    conv = torch.nn.Conv2d(2, 4, 3).double()
    layer = trained_layer(4, axis=1)
    x = rng.standard_normal((2, 2, 6, 5))
    with torch.no_grad():
        z = conv(torch.tensor(x)).numpy()
        nk, nb = fold_into_conv(conv.weight.numpy(), conv.bias.numpy(), layer, layout="torch")
        got = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(nk),
                                         torch.tensor(nb)).numpy()
    np.testing.assert_allclose(got, layer(z), rtol=1e-10, atol=1e-12)


def test_fold_into_conv_keras_layout():
    rng = np.random.default_rng(4)
    layer = trained_layer(4, shape=(4, 3, 3, 4))
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    x = rng.standard_normal((1, 5, 5, 2))

    def conv(k, b):  # a 'valid' 2-D convolution, (kh, kw, in, out) kernel
        out = np.zeros((1, 3, 3, 4))
        for i in range(3):
            for j in range(3):
                out[0, i, j] = np.einsum("hwc,hwco->o", x[0, i:i + 3, j:j + 3], k)
        return out + b

    nk, nb = fold_into_conv(kernel, None, layer)
    assert nk.dtype == np.float32 and nb.dtype == np.float32
    np.testing.assert_allclose(conv(nk.astype(np.float64), nb), layer(conv(kernel, 0.0)),
                               rtol=1e-5, atol=1e-5)


def test_folding_errors():
    layer = trained_layer(4)
    with pytest.raises(ValueError, match="output channels"):
        fold_into_dense(np.ones((3, 5)), None, layer)
    with pytest.raises(ValueError, match="layout"):
        fold_into_dense(np.ones((3, 4)), None, layer, layout="nchw")
    with pytest.raises(ValueError, match="3 dimensions"):
        fold_into_conv(np.ones((3, 4)), None, layer)
    with pytest.raises(ValueError, match="bias"):
        fold_into_dense(np.ones((3, 4)), np.ones(3), layer)
    with pytest.raises(ValueError, match="built"):
        BatchNormalization().folded()
