"""Folding an inference-mode BatchNormalization into the linear layer before it.

``y = BN(x @ W + b)`` with the layer's moving statistics is ``x @ W' + b'`` with
``W' = W * scale`` (per output channel) and ``b' = b * scale + shift``, where
``(scale, shift) = layer.folded()``. The same holds for convolutions, whose output channels
are the BN channels. Results are computed in float64 and returned in the kernel's dtype.
"""

import numpy as np

__all__ = ["fold_into_dense", "fold_into_conv"]

_LAYOUTS = ("keras", "torch")


def _scale_shift(layer, out_channels):
    scale, shift = layer.folded()
    if scale.shape != (out_channels,):
        raise ValueError("the layer has %d channels but the kernel has %d output channels"
                         % (scale.shape[0], out_channels))
    return scale, shift


def _fold(kernel, bias, layer, out_axis):
    kernel = np.asarray(kernel)
    if kernel.dtype.kind not in "fiu":
        raise TypeError("kernel must be a real array, got dtype %s" % kernel.dtype)
    out_dt = kernel.dtype if kernel.dtype.kind == "f" else np.dtype(np.float32)
    c = kernel.shape[out_axis]
    scale, shift = _scale_shift(layer, c)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    if b.shape != (c,):
        raise ValueError("bias must have shape (%d,), got %s" % (c, b.shape))
    shape = [1] * kernel.ndim
    shape[out_axis] = c
    new_kernel = kernel.astype(np.float64) * scale.reshape(shape)
    new_bias = b * scale + shift
    return new_kernel.astype(out_dt), new_bias.astype(out_dt)


def _check_layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError('layout must be "keras" or "torch", got %r' % (layout,))


def fold_into_dense(kernel, bias, layer, layout="keras"):
    """(kernel, bias) of a dense layer that alone equals dense-then-`layer` (inference).

    `layout` "keras": kernel (in, out) as ``keras.layers.Dense``; "torch": (out, in) as
    ``torch.nn.Linear``. `bias` may be None (no bias: the folded one is the shift).
    """
    _check_layout(layout)
    if np.ndim(kernel) != 2:
        raise ValueError("a dense kernel has 2 dimensions, got shape %s" % (np.shape(kernel),))
    return _fold(kernel, bias, layer, 1 if layout == "keras" else 0)


def fold_into_conv(kernel, bias, layer, layout="keras"):
    """(kernel, bias) of a convolution that alone equals conv-then-`layer` (inference).

    `layout` "keras": kernel (..., in, out), e.g. (kh, kw, in, out) for ``Conv2D``;
    "torch": (out, in, ...), e.g. (out, in, kh, kw) for ``torch.nn.Conv2d``. 1-D, 2-D and 3-D
    kernels work alike (grouped convolutions too: the output axis is the same).
    """
    _check_layout(layout)
    if np.ndim(kernel) < 3:
        raise ValueError("a convolution kernel has at least 3 dimensions, got shape %s"
                         % (np.shape(kernel),))
    return _fold(kernel, bias, layer, -1 if layout == "keras" else 0)
