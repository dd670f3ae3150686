"""Weight regularizers with the names, configs and serialized form of ``keras.regularizers``.

:class:`L1`, :class:`L2` and :class:`L1L2` (names ``"l1"``, ``"l2"``, ``"l1l2"``/``"l1_l2"`` and
the class names). Each regularizer is a callable ``penalty = reg(weight)`` (also
``reg.loss(weight)``) and gives the penalty's gradient, ``reg.gradient(weight)``, which the layer
adds to its parameter gradients. A plain callable is accepted as a regularizer too; its
gradient is then taken by central finite differences (:func:`gradient`).

As in Keras, ``L1`` keeps its factor as a float32 value (so ``L1(0.01).get_config()`` is
``{"l1": 0.009999999776482582}``, exactly what Keras returns), while ``L2`` and ``L1L2`` keep
Python floats. Keras's ``OrthogonalRegularizer`` needs 2-D weights and is not provided.
"""

import math

import numpy as np

from .initializers import _Registry

__all__ = [
    "Regularizer", "L1", "L2", "L1L2", "get", "serialize", "deserialize", "penalty", "gradient",
]


def _factor(value, name):
    """Keras's validate_float_arg: a finite, non-negative number, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(
            "Invalid value for argument %s: expected a non-negative float. Received: %s=%r"
            % (name, name, value)
        )
    value = float(value)
    if math.isinf(value) or math.isnan(value) or value < 0:
        raise ValueError(
            "Invalid value for argument %s: expected a non-negative float. Received: %s=%r"
            % (name, name, value)
        )
    return value


def _weight(x):
    x = np.asarray(x)
    if x.dtype.kind not in "biuf" and x.dtype.name != "bfloat16":
        raise TypeError("a regularizer needs a real numeric array, got dtype %s" % x.dtype)
    return x


def _result_dtype(x):
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


class Regularizer:
    """Base class: ``reg(w)`` is the penalty (0 here), ``reg.gradient(w)`` its gradient."""

    def __call__(self, x):
        return 0.0

    def loss(self, x):
        """The penalty of weight `x` (same as calling the regularizer)."""
        return self(x)

    def gradient(self, x):
        """d penalty / d x, an array shaped like `x`."""
        x = _weight(x)
        return np.zeros(x.shape, dtype=_result_dtype(x))

    def get_config(self):
        raise NotImplementedError("%s does not implement get_config()" % type(self).__name__)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        try:
            cfg = ", ".join("%s=%r" % kv for kv in self.get_config().items())
        except NotImplementedError:
            cfg = ""
        return "%s(%s)" % (type(self).__name__, cfg)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(type(self).__name__)


class L1L2(Regularizer):
    """``l1 * sum(|x|) + l2 * sum(x**2)``."""

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _factor(0.0 if l1 is None else l1, "l1")
        self.l2 = _factor(0.0 if l2 is None else l2, "l2")

    def __call__(self, x):
        x = _weight(x)
        dt = _result_dtype(x)
        x64 = x.astype(np.float64)
        total = 0.0
        if self.l1 != 0.0:
            total += self.l1 * np.sum(np.abs(x64))
        if self.l2 != 0.0:
            total += self.l2 * np.sum(x64 * x64)
        return dt.type(total)

    def gradient(self, x):
        x = _weight(x)
        x64 = x.astype(np.float64)
        g = self.l1 * np.sign(x64) + 2.0 * self.l2 * x64
        return g.astype(_result_dtype(x))

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(Regularizer):
    """``l1 * sum(|x|)``; the factor is held in float32, as Keras does."""

    def __init__(self, l1=0.01):
        l1 = _factor(0.01 if l1 is None else l1, "l1")
        self.l1 = float(np.float32(l1))

    def __call__(self, x):
        x = _weight(x)
        return _result_dtype(x).type(self.l1 * np.sum(np.abs(x.astype(np.float64))))

    def gradient(self, x):
        x = _weight(x)
        return (self.l1 * np.sign(x.astype(np.float64))).astype(_result_dtype(x))

    def get_config(self):
        return {"l1": self.l1}


class L2(Regularizer):
    """``l2 * sum(x**2)``."""

    def __init__(self, l2=0.01):
        self.l2 = _factor(0.01 if l2 is None else l2, "l2")

    def __call__(self, x):
        x = _weight(x)
        x64 = x.astype(np.float64)
        return _result_dtype(x).type(self.l2 * np.sum(x64 * x64))

    def gradient(self, x):
        x = _weight(x)
        return (2.0 * self.l2 * x.astype(np.float64)).astype(_result_dtype(x))

    def get_config(self):
        return {"l2": self.l2}


_REGISTRY = _Registry("regularizer", "keras.regularizers", Regularizer)
_REGISTRY.register(L1)
_REGISTRY.register(L2)
_REGISTRY.register(L1L2, "l1_l2")
_REGISTRY.reject(
    "it regularizes 2-D kernels, and normalization weights are 1-D",
    "OrthogonalRegularizer", "orthogonal_regularizer",
)


def get(identifier, custom_objects=None):
    """A regularizer from a name, config dict, class, instance or callable (None stays None)."""
    return _REGISTRY.get(identifier, custom_objects)


def serialize(regularizer):
    """The Keras-serialized dict of a regularizer (None for None)."""
    return _REGISTRY.serialize(regularizer)


def deserialize(config, custom_objects=None):
    """A regularizer from its Keras-serialized dict."""
    return _REGISTRY.deserialize(config, custom_objects)


def penalty(regularizer, x):
    """The penalty of `x` as a float (any callable regularizer)."""
    return float(np.asarray(regularizer(x), dtype=np.float64))


def gradient(regularizer, x):
    """The gradient of ``regularizer(x)`` with respect to `x`.

    Uses ``regularizer.gradient`` when it exists; for a plain callable, central finite
    differences in float64 (two evaluations per element: fine for per-channel vectors).
    """
    x = _weight(x)
    grad = getattr(regularizer, "gradient", None)
    if grad is not None:
        return np.asarray(grad(x)).astype(_result_dtype(x))
    x64 = x.astype(np.float64)
    flat = x64.reshape(-1)
    g = np.empty_like(flat)
    for i in range(flat.size):
        h = 1e-6 * max(1.0, abs(flat[i]))
        saved = flat[i]
        flat[i] = saved + h
        up = penalty(regularizer, x64)
        flat[i] = saved - h
        down = penalty(regularizer, x64)
        flat[i] = saved
        g[i] = (up - down) / (2.0 * h)
    return g.reshape(x.shape).astype(_result_dtype(x))
