"""A float64 NumPy model of Keras 3.15's BatchNormalization, written from its definition.

It uses no bn_cy code: the layer tests compare bn_cy's layer against it (moving averages, masks,
renorm, backward). Masks are given to it as full-shape weights, already expanded by the test.
"""

import numpy as np


def reduce_axes(ndim, axis):
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def channel_shape(ndim, axis, channels):
    shape = [1] * ndim
    shape[axis % ndim] = channels
    return shape


def keras_mask_weights(mask, x_shape):
    """Keras's rule: expand the mask on the last axis and broadcast it to the input."""
    return np.broadcast_to(np.expand_dims(np.asarray(mask) != 0, -1), x_shape).astype(np.float64)


def own_mask_weights(mask, x_shape, axis):
    """bn_cy's extra rule: a mask shaped like the input without the feature axis."""
    return np.broadcast_to(np.expand_dims(np.asarray(mask) != 0, axis % len(x_shape)),
                           x_shape).astype(np.float64)


def weighted_moments(x, axis, w=None):
    """Population mean/variance per channel; all-masked channels give 0, 0 (Keras)."""
    x = np.asarray(x, np.float64)
    red = reduce_axes(x.ndim, axis)
    if w is None:
        return x.mean(axis=red), x.var(axis=red)
    total = w.sum(axis=red)
    safe = np.where(total > 0, total, 1.0)
    mean = np.where(w > 0, x * w, 0.0).sum(axis=red) / safe
    dev = x - mean.reshape(channel_shape(x.ndim, axis, mean.size))
    var = np.where(w > 0, w * dev * dev, 0.0).sum(axis=red) / safe
    mean = np.where(total > 0, mean, 0.0)
    var = np.where(total > 0, var, 0.0)
    return mean, var


class ReferenceBN:
    """State and arithmetic of the Keras layer in float64."""

    def __init__(self, channels, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 renorm=False, renorm_clipping=None, renorm_momentum=0.99, weights=None):
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.center, self.scale = center, scale
        self.renorm, self.renorm_momentum = renorm, renorm_momentum
        self.clip = renorm_clipping or {}
        ones, zeros = np.ones(channels), np.zeros(channels)
        self.w = {"gamma": ones.copy(), "beta": zeros.copy(), "moving_mean": zeros.copy(),
                  "moving_variance": ones.copy(), "moving_stddev": ones.copy(),
                  "renorm_mean": zeros.copy(), "renorm_stddev": ones.copy()}
        if weights:
            for k, v in weights.items():
                self.w[k] = np.asarray(v, np.float64).copy()

    def _bshape(self, x):
        return channel_shape(x.ndim, self.axis, x.shape[self.axis])

    def forward(self, x, training, mask_weights=None):
        x = np.asarray(x, np.float64)
        b = self._bshape(x)
        gamma = self.w["gamma"] if self.scale else np.ones(x.shape[self.axis])
        beta = self.w["beta"] if self.center else np.zeros(x.shape[self.axis])
        self.cache = dict(x=x, training=training, w=mask_weights, r=None, d=None)
        if not training:
            mean, var = self.w["moving_mean"], self.w["moving_variance"]
            eff_g, eff_b = gamma, beta
        else:
            mean, var = weighted_moments(x, self.axis, mask_weights)
            eff_g, eff_b = gamma, beta
            if self.renorm:
                std = np.sqrt(var + self.epsilon)
                rstd = np.maximum(self.w["renorm_stddev"], np.sqrt(self.epsilon))
                r = std / rstd
                d = (mean - self.w["renorm_mean"]) / rstd
                if self.clip.get("rmin") is not None:
                    r = np.maximum(r, self.clip["rmin"])
                if self.clip.get("rmax") is not None:
                    r = np.minimum(r, self.clip["rmax"])
                if self.clip.get("dmax") is not None:
                    d = np.clip(d, -self.clip["dmax"], self.clip["dmax"])
                eff_g, eff_b = r * gamma, d * gamma + beta
                self.cache.update(r=r, d=d)
                rm = self.renorm_momentum
                self.w["renorm_mean"] = self.w["renorm_mean"] * rm + mean * (1 - rm)
                self.w["renorm_stddev"] = self.w["renorm_stddev"] * rm + std * (1 - rm)
                m = self.momentum
                self.w["moving_mean"] = self.w["moving_mean"] * m + mean * (1 - m)
                self.w["moving_stddev"] = self.w["moving_stddev"] * m + std * (1 - m)
                self.w["moving_variance"] = np.maximum(
                    self.w["moving_stddev"] ** 2 - self.epsilon, 0.0)
            else:
                m = self.momentum
                self.w["moving_mean"] = self.w["moving_mean"] * m + mean * (1 - m)
                self.w["moving_variance"] = self.w["moving_variance"] * m + var * (1 - m)
        inv = 1.0 / np.sqrt(var + self.epsilon)
        xhat = (x - mean.reshape(b)) * inv.reshape(b)
        self.cache.update(mean=mean, var=var, inv=inv, xhat=xhat, eff_g=eff_g)
        return xhat * eff_g.reshape(b) + eff_b.reshape(b)

    def backward(self, dy):
        """(dx, dgamma, dbeta) of the latest forward, r and d constant."""
        c = self.cache
        dy = np.asarray(dy, np.float64)
        x, xhat, inv, g = c["x"], c["xhat"], c["inv"], c["eff_g"]
        red = reduce_axes(x.ndim, self.axis)
        b = self._bshape(x)
        sum_dy = dy.sum(axis=red)
        sum_dy_xhat = (dy * xhat).sum(axis=red)
        dx = dy * (g * inv).reshape(b)
        if c["training"]:
            w = np.ones_like(x) if c["w"] is None else c["w"]
            total = w.sum(axis=red)
            coef = np.where(total > 0, g * inv / np.where(total > 0, total, 1.0), 0.0)
            # masked-out positions (w = 0) are not in the statistics: their term is exactly 0
            term = coef.reshape(b) * (sum_dy.reshape(b) + xhat * sum_dy_xhat.reshape(b))
            dx = dx - np.where(w > 0, w * term, 0.0)
        dgamma = sum_dy_xhat
        if c["r"] is not None:
            dgamma = c["r"] * sum_dy_xhat + c["d"] * sum_dy
        return dx, dgamma, sum_dy
