"""Weight initializers with the names, configs and serialized form of ``keras.initializers``.

Only the Keras built-ins that make sense for the 1-D weights of a normalization layer are
provided: :class:`Zeros`, :class:`Ones`, :class:`Constant`, :class:`RandomNormal`,
:class:`RandomUniform`, :class:`TruncatedNormal` and the variance-scaling family
(:class:`VarianceScaling`, Glorot, He and LeCun, normal and uniform). Keras's matrix-only
initializers (``Identity``, ``Orthogonal``, ``STFT``) are rejected with a clear error.

An identifier is what Keras accepts: a name (``"zeros"``, ``"Zeros"``, ``"he_normal"``, the
aliases ``"zero"``, ``"one"``, ``"normal"``, ``"uniform"``), a Keras-serialized dict
(``{"module": "keras.initializers", "class_name": "Zeros", "config": {}, "registered_name":
None}``, or Keras 2's ``{"class_name": ..., "config": ...}``), a class, an instance (ours, or a
Keras one, which is translated through its config), a callable ``f(shape, dtype=None)``, or a
NumPy array (the weight's exact value). Initializers return NumPy arrays.

Random initializers use :func:`numpy.random.default_rng`. As in Keras, an initializer draws the
same values at every call: ``seed=None`` picks a random seed once, at construction, and a copy
made from the config (``clone()``) picks a new one.

This module also holds the small serialization machinery (:class:`_Registry`) that
:mod:`bn_cy.regularizers` and :mod:`bn_cy.constraints` share.
"""

import inspect
import math
import operator
import re
import types

import numpy as np

__all__ = [
    "Initializer",
    "Zeros",
    "Ones",
    "Constant",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "LecunNormal",
    "LecunUniform",
    "compute_fans",
    "get",
    "serialize",
    "deserialize",
]


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by regularizers.py and constraints.py)
# ---------------------------------------------------------------------------------------------


def _to_snake_case(name):
    """Keras's snake_case of a class name (``GlorotUniform`` -> ``glorot_uniform``)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _plain(value):
    """A config value as Keras's serialize_keras_object leaves it (plain Python, JSON-able)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return value.item()
        return {
            "class_name": "__numpy__",
            "config": {"value": value.tolist(), "dtype": str(value.dtype)},
        }
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _unplain(value):
    """Inverse of :func:`_plain` for the values that occur in these configs."""
    if isinstance(value, dict) and value.get("class_name") == "__numpy__":
        cfg = value.get("config") or {}
        return np.array(cfg.get("value"), dtype=_np_dtype(cfg.get("dtype", "float32")))
    return value


def _np_dtype(dtype):
    """A NumPy dtype from a Keras-style name, a NumPy dtype/type, or None (float32)."""
    if dtype is None:
        return np.dtype(np.float32)
    name = getattr(dtype, "name", dtype) if not isinstance(dtype, str) else dtype
    if isinstance(name, str) and name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError("dtype bfloat16 needs the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    if isinstance(name, str) and name.startswith("torch."):  # a torch dtype from Keras code
        name = name[len("torch."):]
    try:
        return np.dtype(name if isinstance(name, str) else dtype)
    except TypeError:
        raise TypeError("could not interpret dtype %r" % (dtype,)) from None


def _is_keras_object(obj):
    return type(obj).__module__.split(".")[0] == "keras"


class _Registry:
    """Name lookup, ``get``, ``serialize`` and ``deserialize`` for one kind of Keras object."""

    def __init__(self, kind, keras_module, base):
        self.kind = kind  # "initializer", "regularizer", "constraint"
        self.keras_module = keras_module  # "keras.initializers", ...
        self.base = base
        self.classes = {}  # name or alias -> class
        self.unsupported = {}  # Keras name -> reason

    def register(self, cls, *aliases):
        for name in (cls.__name__, _to_snake_case(cls.__name__)) + aliases:
            self.classes[name] = cls
        return cls

    def reject(self, reason, *names):
        for name in names:
            self.unsupported[name] = reason

    def _lookup(self, name, custom_objects):
        if custom_objects and name in custom_objects:
            return custom_objects[name]
        if name in self.unsupported:
            raise ValueError(
                "%s %r is not supported here: %s" % (self.kind, name, self.unsupported[name])
            )
        return self.classes.get(name)

    def _is_builtin(self, obj):
        cls = type(obj)
        return self.classes.get(cls.__name__) is cls

    # -- serialize --------------------------------------------------------------------------

    def serialize(self, obj):
        """The dict Keras's ``serialize`` gives for the equivalent Keras object."""
        if obj is None:
            return None
        if self._is_builtin(obj):
            return {
                "module": self.keras_module,
                "class_name": type(obj).__name__,
                "config": _plain(obj.get_config()),
                "registered_name": None,
            }
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            # Keras's form for a plain function: it can only come back through custom_objects.
            return {
                "module": "builtins",
                "class_name": "function",
                "config": obj.__name__,
                "registered_name": "function",
            }
        get_config = getattr(obj, "get_config", None)
        if get_config is None:
            raise TypeError(
                "cannot serialize %s %r: give it a get_config() method" % (self.kind, obj)
            )
        cls = type(obj)
        module = cls.__module__
        return {
            "module": None if module == "__main__" else module,
            "class_name": cls.__name__,
            "config": _plain(get_config()),
            "registered_name": cls.__name__,
        }

    # -- deserialize ------------------------------------------------------------------------

    def deserialize(self, config, custom_objects=None):
        """An object from a Keras-serialized dict (Keras 3 or Keras 2 form) or a name."""
        if config is None:
            return None
        if isinstance(config, str):
            return self._from_name(config, custom_objects)
        if not isinstance(config, dict):
            raise ValueError("could not interpret %s config %r" % (self.kind, config))
        if "class_name" not in config:
            raise ValueError(
                "a serialized %s must have a 'class_name' key, got %r" % (self.kind, config)
            )
        class_name = config["class_name"]
        inner = config.get("config")
        if class_name == "function":
            name = inner if isinstance(inner, str) else config.get("registered_name")
            if custom_objects and name in custom_objects:
                return custom_objects[name]
            raise ValueError(
                "the %s is the Python function %r; pass it in custom_objects={%r: fn} to "
                "load it" % (self.kind, name, name)
            )
        if class_name.startswith("__"):
            raise ValueError("%s config of class %r is not supported" % (self.kind, class_name))
        cls = None
        if custom_objects:
            for key in (class_name, config.get("registered_name")):
                if key is not None and key in custom_objects:
                    cls = custom_objects[key]
                    break
        if cls is None:
            module = config.get("module", "keras")  # Keras 2 configs carry no module
            if module is not None and str(module).split(".")[0] == "keras":
                cls = self._lookup(class_name, None)
            if cls is None:
                raise ValueError(
                    "could not interpret %s identifier %r: unknown class %r (module %r); "
                    "pass custom classes in custom_objects"
                    % (self.kind, config, class_name, config.get("module"))
                )
        if not inspect.isclass(cls):
            return cls
        inner = {} if inner is None else inner
        if not isinstance(inner, dict):
            raise ValueError("the 'config' of a serialized %s must be a dict" % self.kind)
        try:
            if hasattr(cls, "from_config"):
                return cls.from_config(dict(inner))
            return cls(**inner)
        except TypeError as exc:
            raise TypeError("could not rebuild %s %s from config %r: %s"
                            % (self.kind, class_name, inner, exc)) from None

    def _from_name(self, name, custom_objects):
        cls = self._lookup(name, custom_objects)
        if cls is None:
            raise ValueError("could not interpret %s identifier: %r" % (self.kind, name))
        return cls() if inspect.isclass(cls) else cls

    # -- get --------------------------------------------------------------------------------

    def get(self, identifier, custom_objects=None):
        """Keras's ``get``: None, a name, a config dict, a class, an instance or a callable."""
        if identifier is None:
            return None
        if isinstance(identifier, dict):
            obj = self.deserialize(identifier, custom_objects)
        elif isinstance(identifier, str):
            obj = self._from_name(identifier, custom_objects)
        elif inspect.isclass(identifier):
            obj = identifier()
        else:
            obj = identifier
        if isinstance(obj, self.base):
            return obj
        if _is_keras_object(obj) and hasattr(obj, "get_config"):
            # A Keras object: use our equivalent, so that it computes on NumPy arrays.
            cls = self.classes.get(type(obj).__name__)
            if cls is None:
                raise ValueError(
                    "Keras %s %s has no bn_cy equivalent" % (self.kind, type(obj).__name__)
                )
            return cls.from_config(_keras_plain(obj.get_config()))
        if callable(obj):
            return obj
        raise ValueError("could not interpret %s identifier: %r" % (self.kind, identifier))


def _keras_plain(config):
    """A Keras object's config with any tensors turned into plain values."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch tensor
            value = value.detach().cpu().numpy()
        elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            value = value.numpy()
        out[key] = _plain(value)
    return out


# ---------------------------------------------------------------------------------------------
# Initializers
# ---------------------------------------------------------------------------------------------


def _shape_tuple(shape):
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        shape = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError("shape must be a tuple of ints, got %r" % (shape,)) from None
    if any(d < 0 for d in shape):
        raise ValueError("shape must not have negative dimensions, got %r" % (shape,))
    return shape


class Initializer:
    """Base class: ``initializer(shape, dtype=None)`` returns a NumPy array."""

    def __call__(self, shape, dtype=None):
        raise NotImplementedError("Initializer subclasses must implement __call__()")

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def clone(self):
        """A new initializer from this one's config (a fresh seed when seed is None)."""
        return self.__class__.from_config(self.get_config())

    def __repr__(self):
        cfg = ", ".join("%s=%r" % kv for kv in self.get_config().items())
        return "%s(%s)" % (type(self).__name__, cfg)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(type(self).__name__)


class Zeros(Initializer):
    """All zeros."""

    def __call__(self, shape, dtype=None):
        return np.zeros(_shape_tuple(shape), dtype=_np_dtype(dtype))


class Ones(Initializer):
    """All ones."""

    def __call__(self, shape, dtype=None):
        return np.ones(_shape_tuple(shape), dtype=_np_dtype(dtype))


class Constant(Initializer):
    """A constant ``value`` (a scalar, or an array broadcastable to the shape)."""

    def __init__(self, value=0.0):
        value = _unplain(value)
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError("Constant value must be a real number, got %r" % (value,))
        self.value = value

    def __call__(self, shape, dtype=None):
        shape = _shape_tuple(shape)
        dt = _np_dtype(dtype)
        return np.array(np.broadcast_to(np.asarray(self.value), shape), dtype=dt)

    def get_config(self):
        return {"value": _plain(self.value)}

    @classmethod
    def from_config(cls, config):
        return cls(_unplain(config.get("value", 0.0)))


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            "seed must be an int or None, got %r (Keras SeedGenerator objects are not "
            "supported)" % (seed,)
        )
    return int(seed)


class _RandomInitializer(Initializer):
    def __init__(self, seed=None):
        self._init_seed = _check_seed(seed)
        # Like Keras: without a seed, draw one now, so each call gives the same values.
        self.seed = (self._init_seed if self._init_seed is not None
                     else int(np.random.SeedSequence().generate_state(1)[0]))

    def _rng(self):
        return np.random.default_rng(self.seed)

    def get_config(self):
        return {"seed": self._init_seed}


def _finish(values, dtype):
    return np.asarray(values).astype(_np_dtype(dtype))


def _truncated_normal(rng, shape, mean, stddev):
    """Normal values, redrawing those more than two standard deviations from the mean."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return mean + stddev * out


class RandomNormal(_RandomInitializer):
    """Normal distribution with ``mean`` and ``stddev``."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean = mean
        self.stddev = stddev
        super().__init__(seed=seed)

    def __call__(self, shape, dtype=None):
        shape = _shape_tuple(shape)
        return _finish(self._rng().normal(self.mean, self.stddev, size=shape), dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(_RandomInitializer):
    """Normal distribution truncated to two standard deviations around ``mean``."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean = mean
        self.stddev = stddev
        super().__init__(seed=seed)

    def __call__(self, shape, dtype=None):
        shape = _shape_tuple(shape)
        return _finish(_truncated_normal(self._rng(), shape, self.mean, self.stddev), dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class RandomUniform(_RandomInitializer):
    """Uniform distribution on ``[minval, maxval)``."""

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval = minval
        self.maxval = maxval
        super().__init__(seed=seed)

    def __call__(self, shape, dtype=None):
        shape = _shape_tuple(shape)
        return _finish(self._rng().uniform(self.minval, self.maxval, size=shape), dtype)

    def get_config(self):
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


def compute_fans(shape, input_axes=None, output_axes=None):
    """Keras's fan-in and fan-out of a weight shape (a 1-D shape (n,) has fan_in = fan_out = n)."""
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        fan_in = int(np.prod([shape[a] for a in input_axes]))
        fan_out = int(np.prod([shape[a] for a in output_axes]))
        return fan_in, fan_out
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    receptive = int(np.prod(shape[:-2]))
    return int(shape[-2] * receptive), int(shape[-1] * receptive)


class VarianceScaling(_RandomInitializer):
    """Keras's variance scaling: ``scale / fan`` variance, normal (truncated or not) or uniform."""

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None,
                 input_axes=None, output_axes=None):
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer,
                                                             np.floating)):
            raise TypeError("VarianceScaling scale must be a positive float, got %r" % (scale,))
        if not scale > 0.0:
            raise ValueError("VarianceScaling scale must be a positive float, got %r" % (scale,))
        modes = ("fan_in", "fan_out", "fan_avg")
        if mode not in modes:
            raise ValueError("VarianceScaling mode must be one of %s, got %r" % (modes, mode))
        if not isinstance(distribution, str):
            raise TypeError("VarianceScaling distribution must be a string")
        distribution = distribution.lower()
        if distribution == "normal":
            distribution = "truncated_normal"
        dists = ("uniform", "truncated_normal", "untruncated_normal")
        if distribution not in dists:
            raise ValueError(
                "VarianceScaling distribution must be one of %s, got %r" % (dists, distribution)
            )
        self.scale = scale
        self.mode = mode
        self.distribution = distribution
        self.input_axes = input_axes
        self.output_axes = output_axes
        super().__init__(seed=seed)

    def __call__(self, shape, dtype=None):
        shape = _shape_tuple(shape)
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        if self.mode == "fan_in":
            fan = fan_in
        elif self.mode == "fan_out":
            fan = fan_out
        else:
            fan = (fan_in + fan_out) / 2.0
        scale = self.scale / max(1.0, fan)
        rng = self._rng()
        if self.distribution == "truncated_normal":
            # 0.8796... is the stddev of a standard normal truncated to (-2, 2).
            values = _truncated_normal(rng, shape, 0.0, math.sqrt(scale) / 0.87962566103423978)
        elif self.distribution == "untruncated_normal":
            values = rng.normal(0.0, math.sqrt(scale), size=shape)
        else:
            limit = math.sqrt(3.0 * scale)
            values = rng.uniform(-limit, limit, size=shape)
        return _finish(values, dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
            "input_axes": self.input_axes,
            "output_axes": self.output_axes,
        }


class _FixedVarianceScaling(VarianceScaling):
    """VarianceScaling with a fixed scale, mode and distribution (Glorot, He, LeCun)."""

    _scale, _mode, _distribution = 1.0, "fan_in", "truncated_normal"

    def __init__(self, seed=None, input_axes=None, output_axes=None):
        super().__init__(scale=self._scale, mode=self._mode, distribution=self._distribution,
                         seed=seed, input_axes=input_axes, output_axes=output_axes)

    def get_config(self):
        return {"seed": self._init_seed, "input_axes": self.input_axes,
                "output_axes": self.output_axes}


class GlorotNormal(_FixedVarianceScaling):
    """Glorot (Xavier) truncated normal: variance 1 / fan_avg."""

    _scale, _mode, _distribution = 1.0, "fan_avg", "truncated_normal"


class GlorotUniform(_FixedVarianceScaling):
    """Glorot (Xavier) uniform: variance 1 / fan_avg."""

    _scale, _mode, _distribution = 1.0, "fan_avg", "uniform"


class HeNormal(_FixedVarianceScaling):
    """He truncated normal: variance 2 / fan_in."""

    _scale, _mode, _distribution = 2.0, "fan_in", "truncated_normal"


class HeUniform(_FixedVarianceScaling):
    """He uniform: variance 2 / fan_in."""

    _scale, _mode, _distribution = 2.0, "fan_in", "uniform"


class LecunNormal(_FixedVarianceScaling):
    """LeCun truncated normal: variance 1 / fan_in."""

    _scale, _mode, _distribution = 1.0, "fan_in", "truncated_normal"


class LecunUniform(_FixedVarianceScaling):
    """LeCun uniform: variance 1 / fan_in."""

    _scale, _mode, _distribution = 1.0, "fan_in", "uniform"


_REGISTRY = _Registry("initializer", "keras.initializers", Initializer)
for _cls in (Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal,
             VarianceScaling, GlorotNormal, GlorotUniform, HeNormal, HeUniform, LecunNormal,
             LecunUniform):
    _REGISTRY.register(_cls)
_REGISTRY.register(Zeros, "zero")
_REGISTRY.register(Ones, "one")
_REGISTRY.register(RandomNormal, "normal")
_REGISTRY.register(RandomUniform, "uniform")
_REGISTRY.reject(
    "it initializes matrices or convolution kernels, and normalization weights are 1-D",
    "Identity", "identity", "IdentityInitializer", "Orthogonal", "orthogonal",
    "OrthogonalInitializer", "STFT", "stft", "STFTInitializer",
)
del _cls


def _array_initializer(value):
    """Keras's initializer for a given array: returns it, cast, for exactly its shape."""
    value = np.array(value)
    if value.dtype.kind not in "biuf":
        raise ValueError("an array initializer must hold real numbers, got dtype %s"
                         % value.dtype)

    def initialize_fn(shape, dtype=None):
        if _shape_tuple(shape) != value.shape:
            raise ValueError(
                "Expected shape %s for this array initializer, got shape %s"
                % (value.shape, tuple(shape))
            )
        return value.astype(_np_dtype(dtype))

    return initialize_fn


def get(identifier, custom_objects=None):
    """An initializer from a name, config dict, class, instance, callable or NumPy array."""
    if isinstance(identifier, (np.ndarray, np.generic)):
        return _array_initializer(identifier)
    return _REGISTRY.get(identifier, custom_objects)


def serialize(initializer):
    """The Keras-serialized dict of an initializer (None for None)."""
    return _REGISTRY.serialize(initializer)


def deserialize(config, custom_objects=None):
    """An initializer from its Keras-serialized dict."""
    return _REGISTRY.deserialize(config, custom_objects)
