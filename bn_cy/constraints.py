"""Weight constraints with the names, configs and serialized form of ``keras.constraints``.

:class:`NonNeg`, :class:`MaxNorm`, :class:`MinMaxNorm`, :class:`UnitNorm` (names ``"non_neg"``,
``"max_norm"``, ``"min_max_norm"``, ``"unit_norm"``, the class names, and Keras 2's
``"nonneg"``, ``"maxnorm"``, ``"minmaxnorm"``, ``"unitnorm"``). A constraint maps a weight to its
projection, ``w_new = constraint(w)``, with Keras's arithmetic (norms over ``axis``, which for a
1-D weight is the whole vector, and Keras's ``epsilon() = 1e-7`` in the denominators). The layer
applies them in :meth:`bn_cy.BatchNormalization.apply_constraints`, as a Keras optimizer does
after each update.
"""

import numpy as np

from .initializers import _Registry

__all__ = ["Constraint", "NonNeg", "MaxNorm", "MinMaxNorm", "UnitNorm", "get", "serialize",
           "deserialize"]

_KERAS_EPSILON = 1e-7  # keras.config.epsilon()


def _weight(w):
    w = np.asarray(w)
    if w.dtype.kind not in "biuf" and w.dtype.name != "bfloat16":
        raise TypeError("a constraint needs a real numeric array, got dtype %s" % w.dtype)
    return w


def _out_dtype(w):
    return w.dtype if w.dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _norms(w64, axis):
    return np.sqrt(np.sum(w64 * w64, axis=axis, keepdims=True))


class Constraint:
    """Base class: ``constraint(w)`` returns the constrained weight (here: w unchanged)."""

    def __call__(self, w):
        return w

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        cfg = ", ".join("%s=%r" % kv for kv in self.get_config().items())
        return "%s(%s)" % (type(self).__name__, cfg)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(type(self).__name__)


class NonNeg(Constraint):
    """Negative values become 0."""

    def __call__(self, w):
        w = _weight(w)
        return np.maximum(w, 0).astype(_out_dtype(w))


class MaxNorm(Constraint):
    """Rescales so that the norm over `axis` is at most `max_value`."""

    def __init__(self, max_value=2, axis=0):
        self.max_value = max_value
        self.axis = axis

    def __call__(self, w):
        w = _weight(w)
        w64 = w.astype(np.float64)
        norms = _norms(w64, self.axis)
        desired = np.clip(norms, 0, self.max_value)
        return (w64 * (desired / (_KERAS_EPSILON + norms))).astype(_out_dtype(w))

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class UnitNorm(Constraint):
    """Rescales to unit norm over `axis`."""

    def __init__(self, axis=0):
        self.axis = axis

    def __call__(self, w):
        w = _weight(w)
        w64 = w.astype(np.float64)
        return (w64 / (_KERAS_EPSILON + _norms(w64, self.axis))).astype(_out_dtype(w))

    def get_config(self):
        return {"axis": self.axis}


class MinMaxNorm(Constraint):
    """Moves the norm over `axis` towards ``[min_value, max_value]`` by a fraction `rate`."""

    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value = min_value
        self.max_value = max_value
        self.rate = rate
        self.axis = axis

    def __call__(self, w):
        w = _weight(w)
        w64 = w.astype(np.float64)
        norms = _norms(w64, self.axis)
        desired = (self.rate * np.clip(norms, self.min_value, self.max_value)
                   + (1 - self.rate) * norms)
        return (w64 * (desired / (_KERAS_EPSILON + norms))).astype(_out_dtype(w))

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate,
                "axis": self.axis}


_REGISTRY = _Registry("constraint", "keras.constraints", Constraint)
_REGISTRY.register(NonNeg, "nonneg")
_REGISTRY.register(MaxNorm, "maxnorm", "max_norm")
_REGISTRY.register(MinMaxNorm, "minmaxnorm", "min_max_norm")
_REGISTRY.register(UnitNorm, "unitnorm", "unit_norm")


def get(identifier, custom_objects=None):
    """A constraint from a name, config dict, class, instance or callable (None stays None)."""
    return _REGISTRY.get(identifier, custom_objects)


def serialize(constraint):
    """The Keras-serialized dict of a constraint (None for None)."""
    return _REGISTRY.serialize(constraint)


def deserialize(config, custom_objects=None):
    """A constraint from its Keras-serialized dict."""
    return _REGISTRY.deserialize(config, custom_objects)
