"""``BatchNormalization``: Keras 3.15's layer for NumPy arrays, with a fused backward.

The layer is a thin stateful shell over the functional operations of :mod:`bn_cy.ops`
(:func:`~bn_cy.moments`, :func:`~bn_cy.batch_norm`, :func:`~bn_cy.batch_norm_train`,
:func:`~bn_cy.batch_norm_backward`); itself it does per-channel vector arithmetic only, except
for Keras's mask rule with a feature axis that is not last (per-channel weights), where it
merges per-row statistics and applies one masked correction to dx with NumPy.

Keras behaviour reproduced (checked against Keras 3.15 in ``tests/test_keras_parity.py``):

* constructor arguments and defaults, ``get_config()`` (same keys and serialized
  initializers/regularizers/constraints, ``dtype`` as a serialized ``DTypePolicy``), weight
  names and order (gamma, beta, moving_mean, moving_variance, then renorm's moving_stddev,
  renorm_mean, renorm_stddev), ``count_params()``, auto names (``batch_normalization``,
  ``batch_normalization_1``, ...);
* batch statistics and moving-average updates only when ``training and layer.trainable``;
  ``trainable=False`` means inference mode and no trainable weights;
* dtype policies: floating inputs are cast to the compute dtype, integer/bool inputs compute in
  float32, 16-bit compute dtypes compute in float32 and the output is cast to the compute dtype;
* masks: a mask with one dimension less than the input is expanded on the *last* axis (Keras's
  rule, for any ``axis``), cast to bool; masked positions leave the batch statistics but are
  normalized; a channel whose positions are all masked gets batch mean 0 and variance 0, as
  Keras's ``sum / (count + 1e-7)`` gives;
* renorm: r and d from the batch and the renorm statistics (renorm_stddev floored at
  sqrt(epsilon)), clipped by ``renorm_clipping``; the output is ``xhat * (r*gamma) +
  (d*gamma + beta)``; then renorm_mean/renorm_stddev, moving_mean and moving_stddev move
  towards the batch values and ``moving_variance = relu(moving_stddev**2 - epsilon)``.

Deliberate differences from Keras (each for a reason):

* Arguments are validated (Keras converts or accepts silently): ``momentum`` and
  ``renorm_momentum`` must lie in [0, 1], ``epsilon`` must be > 0, ``axis`` an int, flags bools,
  ``renorm_clipping`` keys and values are checked even when ``renorm=False``. Wrong types raise
  :class:`ArgumentTypeError`, which is both a TypeError and a ValueError (Keras raises ValueError
  for several of these; NumPy's AxisError is both a ValueError and an IndexError for the same
  reason).
* ``synchronized=True`` is accepted on every backend (Keras supports it on TensorFlow only) and
  synchronizes over MPI: a training call computes the statistics of the global batch of every
  rank of ``layer.communicator`` (None: ``MPI.COMM_WORLD``; any mpi4py communicator, not part
  of the config, not pickled or saved), with one collective per call, bitwise the same on
  every rank, so the moving averages stay identical; ``backward`` after such a call is
  synchronized too (one more collective; every rank must call it) and gives each rank its own
  contribution to the gamma/beta gradients. Both mask rules work (Keras's per-channel rule for
  a non-last axis merges per-channel counts over the ranks). With one process it is the local
  computation, bitwise. mpi4py is imported on the first synchronized training call only;
  without it that call raises ImportError ("pip install 'bn_cy[mpi]'"); construction and
  inference never need it. Not combinable with ``virtual_batch_size`` over several ranks
  (NotImplementedError).

bn_cy-only options (absent from get_config while at their defaults, so Keras's config is
unchanged): ``momentum=None`` (cumulative average, PyTorch's convention),
``moving_variance_estimator="unbiased"`` (Bessel-corrected moving variance, PyTorch's),
``skip_nonfinite_updates=True`` (channels with NaN/Inf batch statistics keep their moving
statistics; ``layer.skipped_updates`` counts such batches), ``virtual_batch_size=k`` (ghost
batches along axis 0 in training; the moving averages are updated once per group, in order).
``layer.num_batches_tracked`` counts the moving-average updates. See docs/features.md.
* The ``"float64"`` policy computes in float64. Keras's torch and JAX backends promote float64
  with float32 to float32 and so compute this policy in float32; Keras on TensorFlow keeps
  float64, as bn_cy does.
* Variance is computed with a stable algorithm; Keras's backends use E[x^2] - E[x]^2, which
  loses digits (or goes negative) when |mean| >> std.
* Masks: a mask shaped like the input without the feature axis is also accepted (for any axis;
  for ``axis=-1`` it is Keras's rule). When the two rules both fit (``axis`` not last and equal
  sizes), Keras's rule wins. A mask of the wrong shape raises ValueError in inference mode too,
  where Keras ignores a mask whose rank is right. Where a channel has at least one unmasked
  position, the statistics divide by the count itself, not ``count + 1e-7`` (identical in float32
  for counts >= 2, within 1.2e-7 relative for a count of 1).
* Rank-1 inputs (one position per channel) work in training mode: the batch variance is 0.
  Keras 3.15 on torch raises for them in training mode.
* ``apply_constraints()`` is a no-op on a frozen layer (a Keras optimizer never touches frozen
  weights); ``layer.losses`` holds penalties of trainable weights only, as in Keras.

Kept as Keras has it, though surprising: an unmasked training batch with no positions (a zero
batch dimension) has NaN statistics, which then enter the moving averages.

Thread safety: every layer has a :class:`threading.Lock`. A training-mode call holds it from
reading gamma/beta and the statistics to the end of the moving-average update, so concurrent
calls serialize and no update is lost; an inference-mode call holds it only while copying the
per-channel parameters, so inference calls run in parallel. ``backward`` uses the forward
record of the calling thread (falling back to the most recent call of any thread), and the
parameter values that forward used; ``layer.gradients`` is whatever the latest backward wrote.
The input array of a call is kept (not copied) for ``backward``: do not modify it in between.
"""

import hashlib
import json
import math
import numbers
import operator
import os
import tempfile
import threading
import warnings
import zipfile

import numpy as np

from . import constraints as _constraints
from . import initializers as _initializers
from . import regularizers as _regularizers
from .initializers import _np_dtype
from . import _kernels
from . import ops as _ops
from .ops import batch_norm, batch_norm_backward, batch_norm_train, moments

__all__ = ["BatchNormalization", "DTypePolicy", "ArgumentTypeError", "NoForwardError"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (both a TypeError and, as Keras raises, a ValueError)."""


class NoForwardError(RuntimeError, ValueError):
    """``backward()`` was called before any forward call of the layer."""


# ---------------------------------------------------------------------------------------------
# dtype policies
# ---------------------------------------------------------------------------------------------

_POLICIES = {
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "float16": ("float16", "float16"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}


class DTypePolicy:
    """Keras's dtype policy, reduced to what a normalization layer needs.

    ``name`` is one of "float32", "float64", "float16", "bfloat16", "mixed_float16",
    "mixed_bfloat16"; ``compute_dtype`` is the dtype inputs are cast to and outputs have,
    ``variable_dtype`` the dtype of the weights.
    """

    def __init__(self, name="float32"):
        if not isinstance(name, str):
            raise ArgumentTypeError("dtype policy name must be a string, got %r" % (name,))
        if name not in _POLICIES:
            raise ValueError(
                "dtype=%r is not a supported dtype policy; use one of %s"
                % (name, ", ".join(sorted(_POLICIES)))
            )
        self._name = name
        self._compute_dtype, self._variable_dtype = _POLICIES[name]
        self._np_compute = self._np_variable = None  # NumPy dtypes, resolved on first use

    def _numpy_dtypes(self):
        """(compute, variable) as NumPy dtypes (bfloat16 needs ml_dtypes)."""
        if self._np_compute is None:
            self._np_compute = _np_dtype(self._compute_dtype)
            self._np_variable = _np_dtype(self._variable_dtype)
        return self._np_compute, self._np_variable

    name = property(lambda self: self._name)
    compute_dtype = property(lambda self: self._compute_dtype)
    variable_dtype = property(lambda self: self._variable_dtype)

    def get_config(self):
        return {"name": self._name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return '<DTypePolicy "%s">' % self._name

    def __reduce__(self):
        return (DTypePolicy, (self._name,))

    def __eq__(self, other):
        return isinstance(other, DTypePolicy) and other.name == self.name

    def __hash__(self):
        return hash(self._name)


def _policy(dtype):
    """A DTypePolicy from None, a name, a NumPy dtype, a serialized policy or a Keras policy."""
    if dtype is None:
        return DTypePolicy("float32")
    if isinstance(dtype, DTypePolicy):
        return dtype
    if isinstance(dtype, str):
        return DTypePolicy(dtype)
    if isinstance(dtype, dict):
        cls = dtype.get("class_name")
        cfg = dtype.get("config")
        if cls not in ("DTypePolicy", "FloatDTypePolicy", "Policy") or not isinstance(cfg, dict):
            raise ValueError("dtype=%r is not a supported serialized dtype policy" % (dtype,))
        return DTypePolicy(cfg.get("name"))
    if getattr(dtype, "quantization_mode", None) is None and isinstance(
            getattr(dtype, "name", None), str) and type(dtype).__name__.endswith("Policy"):
        return DTypePolicy(dtype.name)  # a Keras DTypePolicy
    try:
        return DTypePolicy(_np_dtype(dtype).name)
    except TypeError:
        raise ArgumentTypeError("dtype must be a dtype policy name, got %r" % (dtype,)) from None


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

_name_lock = threading.Lock()
_name_counts = {}


def _unique_name(prefix):
    """Keras's automatic layer names: prefix, prefix_1, prefix_2, ... (per process)."""
    with _name_lock:
        n = _name_counts.get(prefix, 0)
        _name_counts[prefix] = n + 1
    return prefix if n == 0 else "%s_%d" % (prefix, n)


def _is_float(dt):
    return dt.kind == "f" or dt.name == "bfloat16"


def _to_numpy(value, name="inputs"):
    """A NumPy array from an array-like, a torch tensor or another framework's tensor."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if hasattr(value, "numpy") and callable(value.numpy):  # tensorflow, keras variables
        return np.asarray(value.numpy())
    return _ops._array_like(value, name)


def _real_array(value, name):
    a = _to_numpy(value, name)
    if a.dtype.kind not in "biuf" and a.dtype.name != "bfloat16":
        raise ArgumentTypeError("%s must hold real numbers, got dtype %s" % (name, a.dtype))
    return a


def _bool_arg(value, name):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError("%s must be a bool, got %r" % (name, value))


def _real_arg(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError("%s must be a real number, got %r" % (name, value))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError("%s must be finite, got %r" % (name, value))
    return value


def _fraction_arg(value, name):
    v = _real_arg(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError("%s must be in [0, 1], got %r" % (name, value))
    return v


def _int_arg(value, name):
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError("%s must be an int, got a bool" % name)
    try:
        return operator.index(value)
    except TypeError:
        raise ArgumentTypeError("%s must be an int, got %r" % (name, value)) from None


def _clipping_arg(clipping, renorm):
    """Validate renorm_clipping; store it as Keras does (``{}`` for None when renorm)."""
    if clipping is None:
        return {} if renorm else None
    if not isinstance(clipping, dict):
        raise ArgumentTypeError(
            "renorm_clipping must be a dict with keys among rmax, rmin, dmax, or None; got %r"
            % (clipping,)
        )
    keys = ("rmax", "rmin", "dmax")
    unknown = sorted(set(clipping) - set(keys), key=str)
    if unknown:
        raise ValueError(
            "renorm_clipping has invalid keys %s; supported keys: %s" % (unknown, list(keys))
        )
    values = {}
    for key, value in clipping.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ArgumentTypeError(
                "renorm_clipping[%r] must be a real number or None, got %r" % (key, value))
        if math.isnan(float(value)):
            raise ValueError("renorm_clipping[%r] must not be NaN" % key)
        values[key] = float(value)
    if "rmax" in values and "rmin" in values and values["rmax"] < values["rmin"]:
        raise ValueError(
            "renorm_clipping: rmax must be >= rmin, got rmax=%r, rmin=%r"
            % (clipping["rmax"], clipping["rmin"])
        )
    if "dmax" in values and values["dmax"] < 0:
        raise ValueError("renorm_clipping: dmax must be >= 0, got dmax=%r" % (clipping["dmax"],))
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in clipping.items()}


def _resolve(module, identifier, name, custom_objects=None):
    try:
        return module.get(identifier, custom_objects)
    except TypeError as exc:
        raise ArgumentTypeError("%s: %s" % (name, exc)) from None
    except ValueError as exc:
        raise ValueError("%s: %s" % (name, exc)) from None


def _shape_arg(input_shape):
    if isinstance(input_shape, (int, np.integer)):
        input_shape = (input_shape,)
    try:
        dims = list(input_shape)
    except TypeError:
        raise ArgumentTypeError("input_shape must be a sequence, got %r" % (input_shape,)) from None
    shape = []
    for d in dims:
        if d is None:
            shape.append(None)
            continue
        d = _int_arg(d, "input_shape")
        if d < 0:
            raise ValueError("input_shape has a negative dimension: %r" % (input_shape,))
        shape.append(d)
    return tuple(shape)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError("config value %r is not JSON-serializable" % (value,))


_INITIALIZER_KEYS = ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                     "moving_variance_initializer")
_REGULARIZER_KEYS = ("beta_regularizer", "gamma_regularizer")
_CONSTRAINT_KEYS = ("beta_constraint", "gamma_constraint")
# bn_cy's own options: in get_config only when they differ from these defaults (Keras parity).
_EXTRA_DEFAULTS = (("moving_variance_estimator", "biased"), ("skip_nonfinite_updates", False),
                   ("virtual_batch_size", None))
_CONFIG_KEYS = frozenset(
    ("name", "trainable", "dtype", "axis", "momentum", "epsilon", "center", "scale",
     "synchronized", "renorm", "renorm_clipping", "renorm_momentum")
    + _INITIALIZER_KEYS + _REGULARIZER_KEYS + _CONSTRAINT_KEYS
    + tuple(k for k, _ in _EXTRA_DEFAULTS)
)
# Keras 2 (tf.keras) BatchNormalization keys, and the values bn_cy can ignore.
_LEGACY_KEYS = {
    "fused": ((None, True, False),
              "it only chose TensorFlow's fused kernel; the normalization is the same"),
    "virtual_batch_size": ((None,), "None means no ghost batches"),
    "adjustment": ((None,), "adjustment functions are not supported"),
}
_FILE_FORMAT = "bn_cy.BatchNormalization"
_FILE_VERSION = 1
_META_KEY = "bn_cy_meta"


_DIRECT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _ema_update(moving, batch, momentum, rest):
    """moving = moving * momentum + batch * rest in place, in moving's dtype."""
    if moving.shape != batch.shape or not _kernels.ema_update(moving, batch, momentum, rest):
        moving *= momentum
        moving += batch * rest


class _Forward:
    """What backward() needs from one forward call."""

    __slots__ = ("x", "mask_kind", "mask", "mean", "variance", "gamma", "batch_stats",
                 "counts", "r", "d", "input_dtype", "comm", "groups")

    def __init__(self, x, mean, variance, gamma, batch_stats, mask_kind=None, mask=None,
                 counts=None, r=None, d=None, comm=None):
        self.x, self.mean, self.variance, self.gamma = x, mean, variance, gamma
        self.batch_stats, self.mask_kind, self.mask, self.counts = (batch_stats, mask_kind,
                                                                    mask, counts)
        self.r, self.d, self.input_dtype = r, d, None
        self.comm = comm  # the communicator of a synchronized training call
        self.groups = None  # ghost batches: one _Forward per group


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------


class BatchNormalization:
    """Batch normalization layer with the semantics of ``keras.layers.BatchNormalization``.

    Args:
        axis: int, the feature axis that is kept (negative counts from the end).
        momentum: momentum of the moving averages, in [0, 1]; None: cumulative average.
        epsilon: small float > 0 added to the variance.
        center, scale: whether to add ``beta`` / multiply by ``gamma``.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: initializers (see :mod:`bn_cy.initializers`).
        beta_regularizer, gamma_regularizer: regularizers (see :mod:`bn_cy.regularizers`).
        beta_constraint, gamma_constraint: constraints (see :mod:`bn_cy.constraints`).
        synchronized: training statistics over every rank of ``layer.communicator`` (MPI).
        renorm: use Batch Renormalization (adds moving_stddev, renorm_mean, renorm_stddev).
        renorm_clipping: dict with optional keys "rmax", "rmin", "dmax" clipping r and d.
        renorm_momentum: momentum of renorm_mean and renorm_stddev, in [0, 1].
        name: layer name (automatic when None).
        dtype: dtype policy: "float32" (default), "float64", "mixed_float16", "mixed_bfloat16",
            "float16", "bfloat16", or a serialized / Keras DTypePolicy.
        trainable: False freezes the layer: inference mode, no trainable weights.
        moving_variance_estimator: "biased" (Keras) or "unbiased" (PyTorch) moving variance.
        skip_nonfinite_updates: keep moving statistics of channels whose batch statistics are
            NaN/Inf (counted in ``skipped_updates``).
        virtual_batch_size: ghost batch normalization in training (groups along axis 0).

    Calling ``layer(x, training=None, mask=None)`` returns a NumPy array of the policy's compute
    dtype; ``layer.backward(dy)`` then returns dx and fills ``layer.gradients``.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, synchronized=False, renorm=False, renorm_clipping=None,
                 renorm_momentum=0.99, *, moving_variance_estimator="biased",
                 skip_nonfinite_updates=False, virtual_batch_size=None, name=None, dtype=None,
                 trainable=True):
        self.axis = _int_arg(axis, "axis")
        # momentum=None: cumulative average over the batches seen (PyTorch's convention)
        self.momentum = None if momentum is None else _fraction_arg(momentum, "momentum")
        if moving_variance_estimator not in ("biased", "unbiased"):
            raise ValueError('moving_variance_estimator must be "biased" or "unbiased", got %r'
                             % (moving_variance_estimator,))
        self.moving_variance_estimator = moving_variance_estimator
        self.skip_nonfinite_updates = _bool_arg(skip_nonfinite_updates, "skip_nonfinite_updates")
        if virtual_batch_size is not None:
            virtual_batch_size = _int_arg(virtual_batch_size, "virtual_batch_size")
            if virtual_batch_size < 1:
                raise ValueError("virtual_batch_size must be >= 1, got %d" % virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        self.epsilon = _real_arg(epsilon, "epsilon")
        if self.epsilon <= 0:
            raise ValueError("epsilon must be > 0, got %r" % (epsilon,))
        self.center = _bool_arg(center, "center")
        self.scale = _bool_arg(scale, "scale")
        self.beta_initializer = _resolve(_initializers, beta_initializer, "beta_initializer")
        self.gamma_initializer = _resolve(_initializers, gamma_initializer, "gamma_initializer")
        self.moving_mean_initializer = _resolve(
            _initializers, moving_mean_initializer, "moving_mean_initializer")
        self.moving_variance_initializer = _resolve(
            _initializers, moving_variance_initializer, "moving_variance_initializer")
        self.beta_regularizer = _resolve(_regularizers, beta_regularizer, "beta_regularizer")
        self.gamma_regularizer = _resolve(_regularizers, gamma_regularizer, "gamma_regularizer")
        self.beta_constraint = _resolve(_constraints, beta_constraint, "beta_constraint")
        self.gamma_constraint = _resolve(_constraints, gamma_constraint, "gamma_constraint")
        self.synchronized = _bool_arg(synchronized, "synchronized")
        self.renorm = _bool_arg(renorm, "renorm")
        self.renorm_clipping = _clipping_arg(renorm_clipping, self.renorm)
        _fraction_arg(renorm_momentum, "renorm_momentum")
        # Keras keeps renorm_momentum as given (an int stays an int in the config).
        self.renorm_momentum = (renorm_momentum.item() if isinstance(renorm_momentum, np.generic)
                                else renorm_momentum)
        if name is None:
            name = _unique_name("batch_normalization")
        if not isinstance(name, str):
            raise ArgumentTypeError("name must be a string, got %r" % (name,))
        if "/" in name:
            raise ValueError("name must not contain '/', got %r" % (name,))
        self.name = name
        self._dtype_policy = _policy(dtype)
        self._trainable = _bool_arg(trainable, "trainable")
        self.supports_masking = True

        self.built = False
        self._build_input_shape = None
        self._axis_index = None
        self._weight_names = []
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self.gradients = None
        self.num_batches_tracked = 0  # training updates of the moving statistics
        self.skipped_updates = 0  # batches with non-finite statistics (skip_nonfinite_updates)
        self._communicator = None
        self._call_cache = None  # (shape, dtype, policy, compute dtype, work dtype, direct)
        self._momentum_cache = None  # (momentum, work dtype, its two weights): _momentum_pair
        self._lock = threading.Lock()
        self._local = threading.local()
        self._last_forward = None
        if self.renorm and (self.momentum is None or moving_variance_estimator != "biased"
                            or virtual_batch_size is not None):
            raise NotImplementedError(
                "renorm=True works with a float momentum, the biased variance estimator and "
                "no virtual_batch_size")

    # -- properties -----------------------------------------------------------------------

    @property
    def trainable(self):
        """Settable: False freezes the layer (inference mode, no trainable weights)."""
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        self._trainable = bool(value)

    @property
    def communicator(self):
        """The mpi4py communicator of ``synchronized=True`` training calls.

        None (the default) means ``MPI.COMM_WORLD``; any mpi4py communicator works, including
        sub-communicators from ``comm.Split``. It is not part of :meth:`get_config` and is
        not pickled or saved: a restored layer has None again.
        """
        return self._communicator

    @communicator.setter
    def communicator(self, comm):
        if comm is not None and not (hasattr(comm, "allgather") and hasattr(comm, "Get_rank")
                                     and hasattr(comm, "Get_size")):
            raise ArgumentTypeError(
                "communicator must be an mpi4py communicator or None, got %s"
                % type(comm).__name__)
        self._communicator = comm

    def _sync_comm(self):
        """The communicator of a synchronized training call; None when not synchronized or
        when it has one process (then the local computation is the same, bitwise)."""
        if not self.synchronized:
            return None
        from . import distributed  # mpi4py is imported here, on the first synchronized call

        comm = distributed.resolve_comm(self._communicator)
        return None if comm.Get_size() == 1 else comm

    @property
    def dtype_policy(self):
        return self._dtype_policy

    @property
    def dtype(self):
        """The variable dtype name, as Keras's ``layer.dtype``."""
        return self._dtype_policy.variable_dtype

    @property
    def compute_dtype(self):
        return self._dtype_policy.compute_dtype

    @property
    def variable_dtype(self):
        return self._dtype_policy.variable_dtype

    @property
    def weight_names(self):
        """Names of :attr:`weights`, in the same order (Keras's names)."""
        return list(self._weight_names)

    @property
    def weights(self):
        """Every weight (live NumPy arrays): gamma, beta, moving_mean, moving_variance, renorm's."""
        return [getattr(self, n) for n in self._weight_names]

    def _is_trainable_weight(self, name):
        return self._trainable and name in ("gamma", "beta")

    @property
    def trainable_weights(self):
        """gamma and beta (those that exist) unless the layer is frozen: then []."""
        return [getattr(self, n) for n in self._weight_names if self._is_trainable_weight(n)]

    @property
    def trainable_weight_names(self):
        return [n for n in self._weight_names if self._is_trainable_weight(n)]

    @property
    def non_trainable_weights(self):
        return [getattr(self, n) for n in self._weight_names if not self._is_trainable_weight(n)]

    @property
    def non_trainable_weight_names(self):
        return [n for n in self._weight_names if not self._is_trainable_weight(n)]

    # Keras's other names for the same lists
    variables = weights
    trainable_variables = trainable_weights
    non_trainable_variables = non_trainable_weights

    @property
    def losses(self):
        """Regularization penalties of the trainable weights (gamma first, then beta)."""
        out = []
        for name, reg in (("gamma", self.gamma_regularizer), ("beta", self.beta_regularizer)):
            if reg is not None and name in self.trainable_weight_names:
                out.append(reg(getattr(self, name)))
        return out

    # -- build ----------------------------------------------------------------------------

    def _normalize_axis(self, rank):
        if not -rank <= self.axis < rank:
            raise ValueError(
                "axis=%d is out of range for inputs of rank %d" % (self.axis, rank))
        return self.axis % rank

    def build(self, input_shape):
        """Create the weights for inputs of shape `input_shape` (batch dims may be None)."""
        shape = _shape_arg(input_shape)
        if not shape:
            raise ValueError("BatchNormalization needs inputs of rank >= 1, got shape ()")
        ax = self._normalize_axis(len(shape))
        channels = shape[ax]
        if channels is None:
            raise ValueError(
                "the feature dimension (axis=%d) of input_shape %s must be known"
                % (self.axis, shape))
        with self._lock:
            if self.built:
                self._check_shape(shape)
                return
            self._create_weights(channels)
            self._build_input_shape = shape
            self._axis_index = ax
            self.built = True

    def _create_weights(self, channels):
        vdt = self._dtype_policy._numpy_dtypes()[1]
        shape = (channels,)
        names = []

        def make(name, initializer, sqrt=False):
            try:
                value = initializer(shape, dtype=vdt)
            except TypeError:
                value = initializer(shape)
            arr = _real_array(value, name + " initializer output")
            if arr.shape != shape:
                raise ValueError("the %s initializer returned shape %s, expected %s"
                                 % (name, arr.shape, shape))
            if sqrt:
                arr = np.sqrt(arr.astype(np.float64))
            setattr(self, name, np.array(arr, dtype=vdt, copy=True))
            names.append(name)

        if self.scale:
            make("gamma", self.gamma_initializer)
        if self.center:
            make("beta", self.beta_initializer)
        make("moving_mean", self.moving_mean_initializer)
        make("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # As Keras: the stddevs start at sqrt of (a clone of) the variance initializer.
            make("moving_stddev", _clone(self.moving_variance_initializer), sqrt=True)
            make("renorm_mean", _clone(self.moving_mean_initializer))
            make("renorm_stddev", _clone(self.moving_variance_initializer), sqrt=True)
        self._weight_names = names

    def _check_state(self, channels, write=True):
        """Raise, naming the attribute, where a moving statistic a user replaced cannot be
        read (or, with `write`, updated in place) for inputs of `channels` features: it must
        hold real numbers in shape (channels,), and for an update be a writeable
        floating-point NumPy array. Called by the paths that do not check it themselves,
        before anything is updated."""
        for name in self._weight_names:
            if name in ("gamma", "beta"):  # checked by the ops, as their arguments
                continue
            a = getattr(self, name)
            what = "%s of layer %r" % (name, self.name)
            if write and not isinstance(a, np.ndarray):
                raise ArgumentTypeError(
                    "%s must be a NumPy array of shape (%d,), got %s (a training call updates "
                    "it in place; set_weights replaces its values)"
                    % (what, channels, type(a).__name__))
            a = _real_array(a, what)
            if write and a.dtype.kind != "f" and a.dtype.name != "bfloat16":
                raise ArgumentTypeError("%s must have a floating-point dtype, got %s"
                                        % (what, a.dtype))
            if a.shape != (channels,):
                raise ValueError("%s must have shape (%d,) to match the inputs' %d features, "
                                 "got shape %s" % (what, channels, channels, a.shape))
            if write and not a.flags.writeable:
                raise ValueError("%s is read-only: a training call updates it in place" % what)

    def _snapshots(self, *names):
        """Copies, as NumPy arrays, of the named weights (gamma: None without scale) where one a
        user replaced has no .copy() (the error path of the calls' snapshots); a value that does
        not hold real numbers raises naming the attribute and the layer."""
        out = []
        for name in names:
            if name == "gamma" and not self.scale:
                out.append(None)
            else:
                what = "%s of layer %r" % (name, self.name)
                out.append(np.array(_real_array(getattr(self, name), what)))
        return out

    def _check_shape(self, shape):
        built = self._build_input_shape
        if len(shape) != len(built):
            raise ValueError(
                "layer %r was built for inputs of rank %d (shape %s), got rank %d (shape %s)"
                % (self.name, len(built), built, len(shape), shape))
        ax = self._axis_index
        if shape[ax] != built[ax]:
            raise ValueError(
                "layer %r expects axis %d of its input to have size %d, got shape %s"
                % (self.name, self.axis, built[ax], shape))

    def compute_output_shape(self, input_shape):
        shape = _shape_arg(input_shape)
        self._normalize_axis(len(shape))
        return shape

    def get_build_config(self):
        if not self.built:
            return None
        return {"input_shape": list(self._build_input_shape)}

    def build_from_config(self, config):
        if config and config.get("input_shape") is not None:
            self.build(config["input_shape"])

    # -- forward --------------------------------------------------------------------------

    def __call__(self, inputs, training=None, mask=None):
        """Normalize `inputs`; batch statistics and moving updates iff training and trainable."""
        x = inputs if type(inputs) is np.ndarray else _to_numpy(inputs)
        xdt = x.dtype
        # The checks below depend only on (shape, dtype, policy): the last answer is cached.
        cached = self._call_cache
        if cached is not None and cached[0] == x.shape and cached[1] is xdt \
                and cached[2] is self._dtype_policy:
            cdt, wd, direct = self._dtype_policy._np_compute, cached[4], cached[5]
            xc = x if xdt is cdt else x.astype(cached[3])
        else:
            if xdt.kind not in "biuf" and not _is_float(xdt):
                raise ArgumentTypeError(
                    "inputs must be a real floating, integer or bool array, got dtype %s" % xdt)
            if x.ndim == 0:
                raise ValueError("inputs must have at least one dimension, got a 0-d array")
            if not self.built:
                self.build(x.shape)
            self._check_shape(x.shape)
            cdt = self._dtype_policy._numpy_dtypes()[0]
            if _is_float(xdt):
                xc = x if xdt == cdt else x.astype(cdt)
            else:
                xc = x.astype(np.float32)
            wd = np.dtype(np.float64) if xc.dtype == np.float64 else np.dtype(np.float32)
            # Hot paths: float32/float64 data of native byte order go to the kernels directly
            # (the layer has validated everything the ops would), with the per-channel
            # vectors converted to float64 once: bitwise the results of the ops.
            direct = xc.dtype in _DIRECT_DTYPES and xc.dtype.isnative
            self._call_cache = (x.shape, xdt, self._dtype_policy, xc.dtype, wd, direct)
        resolved_mask = None if mask is None else self._resolve_mask(mask, x.shape)
        if training and self._trainable:
            lock = self._lock  # acquire/release: cheaper than a with block in CPython
            lock.acquire()
            try:
                if direct and resolved_mask is None and not self.renorm \
                        and not self.synchronized and self.virtual_batch_size is None:
                    done = None
                    if self.momentum is not None and self.moving_variance_estimator == "biased" \
                            and not self.skip_nonfinite_updates:
                        # The common case: the forward and both moving updates in one compiled
                        # call, with the arithmetic of the general path (_direct_train).
                        mom, rest = self._momentum_pair(wd)
                        done = _kernels.train_update(
                            xc, self._axis_index, self.gamma if self.scale else None,
                            self.beta if self.center else None, self.epsilon,
                            self.moving_mean, self.moving_variance, mom, rest)
                    if done is not None:
                        self.num_batches_tracked += 1
                        # what backward() needs, made into a _Forward there (see _forward)
                        fwd = (xc, done[1], done[2], done[3], xdt)
                        self._local.forward = fwd
                        self._last_forward = fwd
                        y = done[0]
                        return y if y.dtype == cdt else y.astype(cdt)
                    self._check_state(xc.shape[self._axis_index])
                    y, fwd = self._direct_train(xc, wd)
                else:
                    self._check_state(xc.shape[self._axis_index])
                    y, fwd = self._forward_train(xc, wd, resolved_mask)
            finally:
                lock.release()
        elif direct:
            # snapshots of the weights the backward needs (the kernels read float32 or float64
            # vectors as they are)
            with self._lock:
                try:
                    gamma = self.gamma.copy() if self.scale else None
                    mean = self.moving_mean.copy()
                    variance = self.moving_variance.copy()
                except AttributeError:  # a weight a user replaced with a tuple or the like
                    gamma, mean, variance = self._snapshots("gamma", "moving_mean",
                                                            "moving_variance")
                # the public op: its plain-call check is done in the extension, and a weight
                # a user replaced with something it cannot take gets its error message there
                # (for a moving statistic, one naming the attribute)
                try:
                    y = batch_norm(xc, mean, variance, gamma,
                                   self.beta if self.center else None,
                                   axis=self._axis_index, epsilon=self.epsilon)
                except (TypeError, ValueError):
                    self._check_state(xc.shape[self._axis_index], write=False)
                    raise
            fwd = _Forward(x=xc, mean=mean, variance=variance, gamma=gamma, batch_stats=False)
        else:
            with self._lock:
                params = [None if w is None else w.astype(wd)
                          for w in (self.gamma, self.beta, self.moving_mean,
                                    self.moving_variance)]
            y, fwd = self._forward_inference(xc, *params)
        fwd.input_dtype = x.dtype
        self._local.forward = fwd
        self._last_forward = fwd
        return y if y.dtype == cdt else y.astype(cdt)

    call = __call__

    def _resolve_mask(self, mask, shape):
        """("positions" | "rows", bool mask): the ops' form, or Keras's per-channel form."""
        m = _real_array(mask, "mask")
        ax = self._axis_index
        rank = len(shape)
        keras_shape = shape[:-1]
        own_shape = shape[:ax] + shape[ax + 1:]
        keras_kind = "positions" if ax == rank - 1 else "rows"
        if m.shape == keras_shape:
            kind = keras_kind
        elif m.shape == own_shape:
            kind = "positions"
        elif m.ndim == rank - 1 and _broadcastable(m.shape, keras_shape):
            m = np.broadcast_to(m, keras_shape)
            kind = keras_kind
        else:
            raise ValueError(
                "mask must have shape %s (inputs.shape without the last axis, Keras's rule) "
                "or %s (inputs.shape without the feature axis %d); got %s for inputs of "
                "shape %s" % (keras_shape, own_shape, self.axis, m.shape, shape))
        return kind, (m if m.dtype == np.bool_ else m.astype(bool))

    def _forward_inference(self, xc, gamma, beta, mean, variance):
        y = batch_norm(xc, mean, variance, gamma, beta, axis=self._axis_index,
                       epsilon=self.epsilon)
        return y, _Forward(x=xc, mean=mean, variance=variance, gamma=gamma, batch_stats=False)

    def _direct_train(self, xc, wd):
        """Unmasked training call without renorm, synchronization or ghost batches: the fused
        kernel, as :func:`~bn_cy.batch_norm_train` would call it; runs under the lock."""
        try:
            gamma = self.gamma.copy() if self.scale else None  # a snapshot for the backward
        except AttributeError:  # a tuple or the like a user assigned
            gamma, = self._snapshots("gamma")
        y, mean, variance = batch_norm_train(xc, gamma, self.beta if self.center else None,
                                             axis=self._axis_index, epsilon=self.epsilon)
        # statistics in the work dtype, as the ops return them
        if mean.dtype is not wd:
            mean, variance = mean.astype(wd), variance.astype(wd)
        mm, mv = self.moving_mean, self.moving_variance
        if (self.momentum is not None and mm.dtype is wd and mv.dtype is wd
                and self.moving_variance_estimator == "biased"
                and not self.skip_nonfinite_updates):
            # _update_moving's arithmetic, inlined
            mom, rest = self._momentum_pair(wd)
            _ema_update(mm, mean, mom, rest)
            _ema_update(mv, variance, mom, rest)
            self.num_batches_tracked += 1
            return y, _Forward(x=xc, mean=mean, variance=variance, gamma=gamma,
                               batch_stats=True)
        counts = None
        if self.moving_variance_estimator == "unbiased":
            channels = xc.shape[self._axis_index]
            counts = np.full(channels, float(xc.size // channels if channels else 0))
        self._guarded_update(mean, variance,
                             lambda: self._update_moving(mean, variance, wd, counts))
        return y, _Forward(x=xc, mean=mean, variance=variance, gamma=gamma, batch_stats=True)

    def _forward_train(self, xc, wd, resolved_mask):
        """Training forward and state update; runs under the lock."""
        comm = self._sync_comm()
        if self.virtual_batch_size is not None:
            return self._forward_ghost(xc, wd, resolved_mask, comm)
        return self._forward_train_one(xc, wd, resolved_mask, comm)

    def _forward_ghost(self, xc, wd, resolved_mask, comm):
        """Ghost batch normalization: each group of virtual_batch_size samples (along axis 0)
        is normalized with its own statistics and updates the moving averages, in order."""
        k = self.virtual_batch_size
        if self._axis_index == 0:
            raise ValueError("virtual_batch_size needs the batch axis 0, which is the feature "
                             "axis of this layer (axis=%d)" % self.axis)
        if comm is not None:
            raise NotImplementedError(
                "virtual_batch_size with synchronized=True over several processes")
        batch = xc.shape[0]
        if batch % k:
            raise ValueError("the batch size %d is not a multiple of virtual_batch_size=%d"
                             % (batch, k))
        if batch == k or batch == 0:
            return self._forward_train_one(xc, wd, resolved_mask, None)
        ys, groups = [], []
        for start in range(0, batch, k):
            part = slice(start, start + k)
            gmask = None if resolved_mask is None else (resolved_mask[0], resolved_mask[1][part])
            y, f = self._forward_train_one(xc[part], wd, gmask, None)
            ys.append(y)
            groups.append(f)
        fwd = _Forward(x=xc, mean=None, variance=None, gamma=groups[0].gamma, batch_stats=True)
        fwd.groups = groups
        return np.concatenate(ys, axis=0), fwd

    def _forward_train_one(self, xc, wd, resolved_mask, comm):
        ax, eps = self._axis_index, self.epsilon
        gamma = self.gamma.astype(wd) if self.scale else None
        beta = self.beta.astype(wd) if self.center else None
        kind, m = resolved_mask if resolved_mask is not None else (None, None)
        counts = None  # per-channel weight of the statistics, where computed
        stats = None  # (mean, variance) when computed outside the fused kernel
        constant = False  # every position masked: the statistics do not depend on x
        unbiased = self.moving_variance_estimator == "unbiased"
        if comm is not None:
            mean, variance, counts, constant = self._synced_moments(xc, kind, m, comm, unbiased)
            if constant:
                kind, m = None, None
            stats = (mean.astype(wd), variance.astype(wd))
        elif kind == "rows":
            mean, variance, counts = self._row_masked_moments(xc, m, wd)
            stats = (mean, variance)
        elif kind == "positions" and np.count_nonzero(m) == 0:
            # Every position masked: Keras's sum / (0 + 1e-7) gives mean 0 and variance 0.
            stats = (np.zeros(xc.shape[ax], wd), np.zeros(xc.shape[ax], wd))
            kind, m, constant = None, None, True
        batch_mask = m if kind == "positions" else None
        if unbiased and counts is None:
            channels = xc.shape[ax]
            n = (np.count_nonzero(m) if kind == "positions"
                 else (xc.size // channels if channels else 0))
            counts = np.full(channels, float(n))

        r = d = None
        if not self.renorm:
            if stats is None:
                y, mean, variance = batch_norm_train(xc, gamma, beta, axis=ax, epsilon=eps,
                                                     mask=batch_mask)
            else:
                mean, variance = stats
                y = batch_norm(xc, mean, variance, gamma, beta, axis=ax, epsilon=eps)
            mean, variance = mean.astype(wd, copy=False), variance.astype(wd, copy=False)
            eff_gamma = gamma
            self._guarded_update(mean, variance,
                                 lambda: self._update_moving(mean, variance, wd, counts))
        else:
            if stats is None:
                mean, variance = moments(xc, axis=ax, mask=batch_mask)
            else:
                mean, variance = stats
            mean, variance = mean.astype(wd, copy=False), variance.astype(wd, copy=False)
            r, d = self._renorm_correction(mean, variance, wd)
            eff_gamma = r if gamma is None else r * gamma
            eff_beta = d if gamma is None else d * gamma
            if beta is not None:
                eff_beta = eff_beta + beta
            y = batch_norm(xc, mean, variance, eff_gamma, eff_beta, axis=ax, epsilon=eps)
            self._guarded_update(mean, variance,
                                 lambda: self._update_renorm(mean, variance, wd))
        fwd = _Forward(x=xc, mask_kind=kind, mask=m, mean=mean, variance=variance,
                       gamma=eff_gamma, batch_stats=not constant, counts=counts, r=r, d=d,
                       comm=None if constant else comm)
        return y, fwd

    def _synced_moments(self, xc, kind, m, comm, need_counts):
        """Statistics of the global batch over `comm` (one collective).

        Returns (mean, variance, per-channel weight or None, every position masked on every
        rank), in float64. Unmasked without counts: the synchronized ops; otherwise each rank's
        (weight, mean, M2) partials are merged in rank order by :mod:`bn_cy.distributed`.
        """
        from . import distributed

        ax = self._axis_index
        channels = xc.shape[ax]
        if kind is None and not need_counts:
            mean, variance = moments(xc, axis=ax, comm=comm)
            return mean.astype(np.float64), variance.astype(np.float64), None, False
        if kind == "rows":
            mean, variance, counts = self._row_masked_moments(xc, m, np.dtype(np.float64))
            w = counts.astype(np.float64)
        else:
            n = np.count_nonzero(m) if kind == "positions" else (
                xc.size // channels if channels else 0)
            w = np.full(channels, float(n))
            if n:
                mean, variance = moments(xc, axis=ax, mask=m if kind else None)
            else:
                mean = variance = np.zeros(channels)
        has = w > 0
        mean = np.where(has, np.asarray(mean, np.float64), 0.0)
        m2 = np.where(has, np.asarray(variance, np.float64) * w, 0.0)
        wsum, gmean, gm2 = distributed.merge_partials(comm, w, mean, m2)
        has = wsum > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            gvar = gm2 / np.where(has, wsum, 1.0)
        empty = 0.0 if kind is not None else np.nan  # masked: Keras's 0; empty batch: NaN
        gmean = np.where(has, gmean, empty)
        gvar = np.where(has, gvar, empty)
        constant = kind == "positions" and not has.any()
        return gmean, gvar, wsum, constant

    def _row_masked_moments(self, xc, m, wd):
        """Statistics for Keras's mask rule when the feature axis is not last.

        The mask then weights whole rows along the last axis, differently per channel, so the
        statistics come from per-row moments (the ops) merged per channel in float64.
        Returns (mean, variance, number of unmasked positions per channel).
        """
        ax = self._axis_index
        lead = xc.shape[:-1]
        length = xc.shape[-1]
        channels = xc.shape[ax]
        red = tuple(i for i in range(len(lead)) if i != ax)
        rows_per_channel = np.count_nonzero(m, axis=red).reshape(channels)
        counts = rows_per_channel * length
        if xc.size == 0:
            zeros = np.zeros(channels, wd)
            return zeros, zeros.copy(), counts
        row_mean, row_var = moments(xc.reshape(-1, length), axis=0)
        row_mean = row_mean.astype(np.float64).reshape(lead)
        row_var = row_var.astype(np.float64).reshape(lead)
        safe = np.maximum(rows_per_channel, 1)
        mean = np.where(m, row_mean, 0.0).sum(axis=red).reshape(channels) / safe
        bshape = [1] * len(lead)
        bshape[ax] = channels
        dev = row_mean - mean.reshape(bshape)
        variance = np.where(m, row_var + dev * dev, 0.0).sum(axis=red).reshape(channels) / safe
        empty = counts == 0
        mean[empty] = 0.0
        variance[empty] = 0.0
        return mean.astype(wd), variance.astype(wd), counts

    def _moving_names(self):
        return [n for n in self._weight_names if n not in ("gamma", "beta")]

    def _guarded_update(self, mean, variance, update):
        """Run `update`; with skip_nonfinite_updates, channels whose batch statistics are not
        finite keep their moving statistics (and the batch is counted in skipped_updates)."""
        if self.skip_nonfinite_updates:
            ok = np.isfinite(mean) & np.isfinite(variance)
            if not ok.all():
                self.skipped_updates += 1
                if not ok.any():
                    return
                saved = [(getattr(self, n), getattr(self, n).copy()) for n in self._moving_names()]
                update()
                for w, old in saved:
                    w[~ok] = old[~ok]
                return
        update()

    def _momentum_pair(self, wd):
        """(weight of the old value, weight of the batch value) of this update."""
        momentum = self.momentum
        if momentum is None:  # cumulative average: the n-th batch has weight 1/n
            n = self.num_batches_tracked + 1
            return wd.type(1.0 - 1.0 / n), wd.type(1.0 / n)
        cached = self._momentum_cache
        if cached is not None and cached[0] == momentum and cached[1] is wd:
            return cached[2], cached[3]
        pair = wd.type(momentum), wd.type(1.0 - momentum)
        self._momentum_cache = (momentum, wd) + pair
        return pair

    def _update_moving(self, mean, variance, wd, counts=None):
        if self.moving_variance_estimator == "unbiased" and counts is not None:
            n = np.asarray(counts, np.float64)
            factor = np.where(n > 1, n / np.maximum(n - 1, 1), 1.0)
            variance = (variance.astype(np.float64) * factor).astype(wd)
        mom, rest = self._momentum_pair(wd)
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            if moving.dtype is wd:  # in place
                _ema_update(moving, batch, mom, rest)
                continue
            new = moving.astype(wd) * mom  # in the compute dtype, as Keras casts
            new += batch * rest
            moving[...] = new
        self.num_batches_tracked += 1

    def _renorm_correction(self, mean, variance, wd):
        eps = wd.type(self.epsilon)
        stddev = np.sqrt(variance + eps)
        renorm_mean = self.renorm_mean.astype(wd)
        renorm_stddev = np.maximum(self.renorm_stddev.astype(wd), np.sqrt(eps))
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clip = self.renorm_clipping or {}
        if clip.get("rmin") is not None:
            r = np.maximum(r, wd.type(clip["rmin"]))
        if clip.get("rmax") is not None:
            r = np.minimum(r, wd.type(clip["rmax"]))
        if clip.get("dmax") is not None:
            dmax = wd.type(clip["dmax"])
            d = np.clip(d, -dmax, dmax)
        return r.astype(wd), d.astype(wd)

    def _update_renorm(self, mean, variance, wd):
        eps = wd.type(self.epsilon)
        stddev = np.sqrt(variance + eps)
        rmom = wd.type(self.renorm_momentum)
        rrest = wd.type(1.0 - self.renorm_momentum)
        self.renorm_mean[...] = self.renorm_mean.astype(wd) * rmom + mean * rrest
        self.renorm_stddev[...] = self.renorm_stddev.astype(wd) * rmom + stddev * rrest
        mom = wd.type(self.momentum)
        rest = wd.type(1.0 - self.momentum)
        self.moving_mean[...] = self.moving_mean.astype(wd) * mom + mean * rest
        new_stddev = self.moving_stddev.astype(wd) * mom + stddev * rest
        self.moving_stddev[...] = new_stddev
        self.moving_variance[...] = np.maximum(new_stddev * new_stddev - eps, 0)
        self.num_batches_tracked += 1

    # -- backward -------------------------------------------------------------------------

    def _forward(self):
        """The record of this thread's latest call (else of the latest call of any thread) as a
        _Forward, or None. The common training call leaves the tuple (x, mean, variance, gamma,
        input dtype) of a plain batch-statistics forward, which is made a _Forward here."""
        fwd = getattr(self._local, "forward", None) or self._last_forward
        if type(fwd) is tuple:
            x, mean, variance, gamma, input_dtype = fwd
            fwd = _Forward(x=x, mean=mean, variance=variance, gamma=gamma, batch_stats=True)
            fwd.input_dtype = input_dtype
        return fwd

    def backward(self, dy):
        """Gradient of the latest call: returns dx and sets :attr:`gradients`.

        ``layer.gradients`` is aligned with ``layer.trainable_weights`` (empty for a frozen
        layer) and includes the regularizers' gradients. A training-mode call differentiates
        through the batch statistics (masked positions excluded from them); an inference-mode
        call treats the moving statistics as constants; renorm's r and d are constants.
        dx has the dtype of the call's input (float32 for integer input). After a synchronized
        training call, dx is that of the global batch (one collective: every rank must call
        backward) and the gradients are this rank's contributions (sum them over the ranks).
        """
        fwd = self._forward()
        if fwd is None:
            raise NoForwardError(
                "backward() needs a forward call first: call the layer on a batch, then pass "
                "the gradient of the loss with respect to its output")
        dy = _real_array(dy, "dy")
        x = fwd.x
        if dy.shape != x.shape:
            raise ValueError("dy must have the shape of the layer's output %s, got %s"
                             % (x.shape, dy.shape))
        if fwd.groups is not None:
            k = self.virtual_batch_size
            parts = [self._backward_core(dy[i * k:(i + 1) * k], f)
                     for i, f in enumerate(fwd.groups)]
            dx = np.concatenate([p[0] for p in parts], axis=0)
            dgamma = np.sum([np.asarray(p[1], np.float64) for p in parts], axis=0)
            dbeta = np.sum([np.asarray(p[2], np.float64) for p in parts], axis=0)
        else:
            dx, dgamma, dbeta = self._backward_core(dy, fwd)
        vdt = self._dtype_policy._numpy_dtypes()[1]
        with self._lock:
            grads = []
            if self._trainable:
                for name, grad, reg, present in (
                        ("gamma", dgamma, self.gamma_regularizer, self.scale),
                        ("beta", dbeta, self.beta_regularizer, self.center)):
                    if not present:
                        continue
                    if reg is not None:
                        grad = np.asarray(grad, dtype=np.float64) + _regularizers.gradient(
                            reg, getattr(self, name))
                    # (float32 -> float64 -> vdt would round the same as one cast)
                    grads.append(grad.astype(vdt))
            self.gradients = grads
        out_dt = fwd.input_dtype if _is_float(fwd.input_dtype) else dx.dtype
        return dx if dx.dtype == out_dt else dx.astype(out_dt)

    def _backward_core(self, dy, fwd):
        x = fwd.x
        ax, eps = self._axis_index, self.epsilon
        if fwd.batch_stats and fwd.mask_kind == "rows":
            dx, dgamma, dbeta = self._row_masked_backward(dy, fwd)
        elif fwd.batch_stats:
            dx, dgamma, dbeta = batch_norm_backward(
                dy, x, fwd.mean, fwd.variance, fwd.gamma, axis=ax, epsilon=eps,
                mask=fwd.mask if fwd.mask_kind == "positions" else None, training=True,
                comm=fwd.comm)
        else:
            dx, dgamma, dbeta = batch_norm_backward(
                dy, x, fwd.mean, fwd.variance, fwd.gamma, axis=ax, epsilon=eps, training=False)
        if fwd.r is not None:
            # y = xhat*(r*gamma) + d*gamma + beta with r, d constant.
            dgamma = fwd.r * dgamma + fwd.d * dbeta
        return dx, dgamma, dbeta

    def _row_masked_backward(self, dy, fwd):
        """Backward for Keras's per-channel mask rule (feature axis not last).

        dx = dy*g*inv - w_i*g*inv/W_c * (sum(dy) + xhat_i*sum(dy*xhat)): the first term and
        the sums come from the ops in inference mode, the correction is one batch_norm call
        (xhat*A + B per channel) and one masked subtraction. Synchronized: the two sums are
        summed over the ranks (one collective) and W_c is the global count.
        """
        ax, eps = self._axis_index, self.epsilon
        wd = np.float64 if fwd.x.dtype == np.float64 else np.float32
        x = fwd.x.astype(wd, copy=False)
        dx, dgamma, dbeta = batch_norm_backward(
            dy.astype(wd, copy=False), x, fwd.mean, fwd.variance, fwd.gamma, axis=ax,
            epsilon=eps, training=False)
        sdy, sdyx = dbeta, dgamma
        if fwd.comm is not None:
            from . import distributed

            _, sdy, sdyx = distributed.sum_grad_sums(fwd.comm, 0.0, np.asarray(dbeta),
                                                     np.asarray(dgamma))
        g = np.ones(x.shape[ax]) if fwd.gamma is None else np.asarray(fwd.gamma, np.float64)
        inv = 1.0 / np.sqrt(np.asarray(fwd.variance, np.float64) + eps)
        coef = np.where(fwd.counts > 0, g * inv / np.maximum(fwd.counts, 1), 0.0)
        correction = batch_norm(x, fwd.mean, fwd.variance, coef * sdyx, coef * sdy,
                                axis=ax, epsilon=eps)
        # masked-out positions are not in the statistics: no correction (not 0 * Inf = NaN)
        dx -= np.where(np.expand_dims(fwd.mask, -1), correction, 0)
        return dx, dgamma, dbeta

    # -- weights --------------------------------------------------------------------------

    def get_weights(self):
        """Copies of :attr:`weights`."""
        with self._lock:
            return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        """Replace the weights' values (in place), checking count, shapes and dtypes.

        Values are cast to the weights' dtype, as Keras does; non-numeric or complex arrays
        raise TypeError, a wrong count or shape ValueError.
        """
        weights = list(weights)
        current = self.weights
        if len(weights) != len(current):
            raise ValueError(
                "set_weights on layer %r got %d weights, but the layer has %d (%s)"
                % (self.name, len(weights), len(current), ", ".join(self._weight_names)))
        arrays = []
        for name, cur, value in zip(self._weight_names, current, weights):
            a = _real_array(value, "weight %r" % name)
            if a.shape != cur.shape:
                raise ValueError("weight %r of layer %r has shape %s, got shape %s"
                                 % (name, self.name, cur.shape, a.shape))
            arrays.append(a)
        with self._lock:
            for cur, a in zip(current, arrays):
                cur[...] = a.astype(cur.dtype, copy=False)

    def count_params(self):
        """Number of scalars in all weights."""
        if not self.built:
            raise ValueError(
                "count_params() on layer %r, which is not built: call it on data or call "
                "layer.build(input_shape) first" % self.name)
        return int(sum(w.size for w in self.weights))

    def apply_constraints(self):
        """Project gamma and beta with their constraints (a no-op for a frozen layer)."""
        with self._lock:
            for name, con in (("gamma", self.gamma_constraint), ("beta", self.beta_constraint)):
                if con is None or name not in self.trainable_weight_names:
                    continue
                w = getattr(self, name)
                new = _real_array(con(w), "%s_constraint output" % name)
                if new.shape != w.shape:
                    raise ValueError("%s_constraint returned shape %s for a weight of shape %s"
                                     % (name, new.shape, w.shape))
                w[...] = new.astype(w.dtype, copy=False)

    # -- moving statistics ----------------------------------------------------------------

    def reset_moving_statistics(self):
        """Set the moving statistics back to their initializers' values (renorm's too) and
        ``num_batches_tracked`` and ``skipped_updates`` to 0. A no-op before build."""
        with self._lock:
            self.num_batches_tracked = 0
            self.skipped_updates = 0
            if not self.built:
                return
            vdt = self._dtype_policy._numpy_dtypes()[1]
            shape = self.moving_mean.shape
            inits = {"moving_mean": (self.moving_mean_initializer, False),
                     "moving_variance": (self.moving_variance_initializer, False),
                     "moving_stddev": (self.moving_variance_initializer, True),
                     "renorm_mean": (self.moving_mean_initializer, False),
                     "renorm_stddev": (self.moving_variance_initializer, True)}
            for name in self._moving_names():
                init, sqrt = inits[name]
                try:
                    value = init(shape, dtype=vdt)
                except TypeError:
                    value = init(shape)
                value = _real_array(value, name + " initializer output").astype(np.float64)
                getattr(self, name)[...] = (np.sqrt(value) if sqrt else value).astype(vdt)

    def recompute_statistics(self, batches, progress=False):
        """Set the moving mean and variance to the exact statistics of `batches`.

        `batches` is an iterable of input arrays, or of ``(x, mask)`` pairs (masks as in a
        call). Each batch is reduced to per-channel (weight, mean, M2) with the ops and merged
        into a running total in float64 (Chan et al.), so memory stays constant and the result
        equals the statistics of the concatenated data (population variance, or Bessel-
        corrected with ``moving_variance_estimator="unbiased"``). A synchronized layer also
        merges every rank's totals (one collective; every rank must call it, with a built
        layer, even with no batches of its own). Channels that
        saw no unmasked position keep their moving statistics. With renorm, moving_stddev,
        renorm_mean and renorm_stddev are set to match. ``num_batches_tracked`` becomes the
        number of batches. `progress`: True prints a progress line to stderr per batch (or a
        callable ``progress(i)`` is called with the number of batches done). Returns that
        number.
        """
        import sys

        total = mean = m2 = None
        n_batches = 0
        for item in batches:
            if isinstance(item, tuple) and len(item) == 2:
                x, mask = item
            else:
                x, mask = item, None
            x = _to_numpy(x)
            if x.ndim == 0:
                raise ValueError("batches must have at least one dimension")
            if not self.built:
                self.build(x.shape)
            self._check_shape(x.shape)
            cdt = self._dtype_policy._numpy_dtypes()[0]
            xc = (x if x.dtype == cdt else x.astype(cdt)) if _is_float(x.dtype) \
                else x.astype(np.float32)
            ax = self._axis_index
            channels = xc.shape[ax]
            kind, m = (None, None) if mask is None else self._resolve_mask(mask, x.shape)
            if kind == "rows":
                bm, bv, w = self._row_masked_moments(xc, m, np.dtype(np.float64))
                w = w.astype(np.float64)
            else:
                n = np.count_nonzero(m) if kind == "positions" else (
                    xc.size // channels if channels else 0)
                w = np.full(channels, float(n))
                if n:
                    bm, bv = moments(xc, axis=ax, mask=m)
                else:
                    bm = bv = np.zeros(channels)
            bm = np.where(w > 0, np.asarray(bm, np.float64), 0.0)
            bm2 = np.where(w > 0, np.asarray(bv, np.float64) * w, 0.0)
            if total is None:
                total, mean, m2 = w, bm, bm2
            else:
                total, mean, m2 = _chan_merge(total, mean, m2, w, bm, bm2)
            n_batches += 1
            if progress:
                if callable(progress):
                    progress(n_batches)
                else:
                    sys.stderr.write("\rrecompute_statistics: %d batches" % n_batches)
                    sys.stderr.flush()
        if progress and not callable(progress):
            sys.stderr.write("\n")
        if self.synchronized and self.built:
            comm = self._sync_comm()
            if comm is not None:
                from . import distributed

                c = len(self.moving_mean)
                if total is None:
                    total, mean, m2 = np.zeros(c), np.zeros(c), np.zeros(c)
                total, mean, m2 = distributed.merge_partials(comm, total, mean, m2)
        if total is None:
            raise ValueError("recompute_statistics needs at least one batch")
        has = total > 0
        denom = total - 1 if self.moving_variance_estimator == "unbiased" else total
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(denom > 0, m2 / np.where(denom > 0, denom, 1.0), 0.0)
        with self._lock:
            vdt = self.moving_mean.dtype
            self.moving_mean[has] = mean[has].astype(vdt)
            self.moving_variance[has] = var[has].astype(vdt)
            if self.renorm:
                std = np.sqrt(var + self.epsilon)
                self.moving_stddev[has] = std[has].astype(vdt)
                self.renorm_mean[has] = mean[has].astype(vdt)
                self.renorm_stddev[has] = std[has].astype(vdt)
            self.num_batches_tracked = n_batches
        return n_batches

    def folded(self):
        """Per-channel ``(scale, shift)`` (float64) of inference mode: the layer computes
        ``x * scale + shift`` along its feature axis."""
        if not self.built:
            raise ValueError("folded() needs a built layer")
        with self._lock:
            var = self.moving_variance.astype(np.float64)
            scale = 1.0 / np.sqrt(var + self.epsilon)
            if self.scale:
                scale = scale * self.gamma.astype(np.float64)
            shift = -self.moving_mean.astype(np.float64) * scale
            if self.center:
                shift = shift + self.beta.astype(np.float64)
        return scale, shift

    # -- PyTorch and Keras interchange ----------------------------------------------------

    @classmethod
    def from_torch(cls, module_or_state_dict, prefix="", *, input_rank=None, eps=1e-5,
                   momentum=0.1, name=None, dtype=None):
        """A layer equal to a ``torch.nn.BatchNorm{1,2,3}d`` (module or state dict).

        Takes weight/bias (-> gamma/beta; absent: ``affine=False``), running_mean/running_var
        and num_batches_tracked under `prefix` (e.g. ``"layer1.0.bn1."``). The layer has
        ``axis=1`` (channels first), PyTorch's ``eps``, momentum ``1 - torch momentum`` (None
        stays None: cumulative average) and ``moving_variance_estimator="unbiased"``, so
        training updates match PyTorch's. `eps`/`momentum` are read from a module; give them
        for a state dict (PyTorch's defaults otherwise). `input_rank`: the rank of the inputs
        the layer is built for (default: 2 for BatchNorm1d -- pass 3 for (N, C, L) --, 4 for
        BatchNorm2d and state dicts, 5 for BatchNorm3d). Modules without running statistics
        (``track_running_stats=False``) are rejected.
        """
        if hasattr(module_or_state_dict, "state_dict") and callable(
                module_or_state_dict.state_dict):
            module = module_or_state_dict
            state = module.state_dict()
            eps = module.eps
            momentum = module.momentum
            kind = type(module).__name__
        else:
            state = dict(module_or_state_dict)
            kind = ""
        get = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if "running_mean" not in get or "running_var" not in get:
            raise ValueError("no running_mean/running_var under prefix %r: bn_cy needs running "
                             "statistics (track_running_stats=True)" % prefix)
        if input_rank is None:
            input_rank = {"BatchNorm1d": 2, "BatchNorm3d": 5}.get(kind, 4)
        input_rank = _int_arg(input_rank, "input_rank")
        if input_rank < 2:
            raise ValueError("input_rank must be >= 2 (batch, channels, ...)")
        arrays = {k: _to_numpy(v) for k, v in get.items()}
        mean = arrays["running_mean"]
        if dtype is None:
            dtype = "float64" if mean.dtype == np.float64 else "float32"
        layer = cls(axis=1, momentum=None if momentum is None else 1.0 - float(momentum),
                    epsilon=float(eps), center="bias" in arrays, scale="weight" in arrays,
                    moving_variance_estimator="unbiased", name=name, dtype=dtype)
        layer.build((None, mean.shape[0]) + (None,) * (input_rank - 2))
        layer.set_weights([arrays[k] for k, present in (
            ("weight", layer.scale), ("bias", layer.center), ("running_mean", True),
            ("running_var", True)) if present])
        if "num_batches_tracked" in arrays:
            layer.num_batches_tracked = int(arrays["num_batches_tracked"])
        return layer

    def to_torch_state_dict(self, prefix="", as_numpy=False):
        """The state dict of the equivalent ``torch.nn.BatchNorm*d``: weight, bias (gamma/beta;
        ones/zeros for the one that is absent, both absent when neither exists), running_mean,
        running_var, num_batches_tracked. torch tensors when torch is installed and
        `as_numpy` is False, NumPy arrays otherwise. The PyTorch module should have
        ``momentum = 1 - layer.momentum`` (None for None) and ``eps = layer.epsilon``."""
        if not self.built:
            raise ValueError("to_torch_state_dict() needs a built layer")
        with self._lock:
            c = self.moving_mean.shape[0]
            out = {}
            if self.scale or self.center:
                vdt = self.moving_mean.dtype
                out["weight"] = self.gamma.copy() if self.scale else np.ones(c, vdt)
                out["bias"] = self.beta.copy() if self.center else np.zeros(c, vdt)
            out["running_mean"] = self.moving_mean.copy()
            out["running_var"] = self.moving_variance.copy()
            out["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        if not as_numpy:
            try:
                import torch
            except ImportError:
                torch = None
            if torch is not None:
                out = {k: torch.from_numpy(v.astype(np.float32) if v.dtype.name == "bfloat16"
                                           else v) for k, v in out.items()}
        return {prefix + k: v for k, v in out.items()}

    def to_keras(self):
        """An equal ``keras.layers.BatchNormalization`` (built, with these weights), when Keras
        is installed. bn_cy-only options (momentum=None, the unbiased estimator, non-finite
        guard, virtual_batch_size) have no Keras 3 equivalent and raise ValueError."""
        config = self.get_config()
        extra = [k for k, _ in _EXTRA_DEFAULTS if k in config]
        if self.momentum is None:
            extra.insert(0, "momentum=None")
        if extra:
            raise ValueError("Keras 3 has no equivalent of %s" % ", ".join(extra))
        import keras

        layer = keras.layers.BatchNormalization.from_config(config)
        if self.built:
            layer.build(self._build_input_shape)
            layer.set_weights(self.get_weights())
        return layer

    # -- config ---------------------------------------------------------------------------

    def get_config(self):
        """The dict ``keras.layers.BatchNormalization(...).get_config()`` returns."""
        return {
            "name": self.name,
            "trainable": self._trainable,
            "dtype": {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": self._dtype_policy.name},
                "registered_name": None,
            },
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": _initializers.serialize(self.beta_initializer),
            "gamma_initializer": _initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": _initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer":
                _initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": _regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": _regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": _constraints.serialize(self.beta_constraint),
            "gamma_constraint": _constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": (None if self.renorm_clipping is None
                                else dict(self.renorm_clipping)),
            "renorm_momentum": self.renorm_momentum,
            **{key: getattr(self, key) for key, default in _EXTRA_DEFAULTS
               if getattr(self, key) != default},
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """A layer from a Keras 3 or Keras 2 config (or a whole serialized Keras layer).

        Keras 2 keys: ``fused`` (None/True/False), ``virtual_batch_size`` (None) and
        ``adjustment`` (None) are ignored with a warning; other values raise ValueError.
        ``batch_input_shape``/``input_shape`` build the layer; an ``axis`` given as a
        one-element list is taken as that int. `custom_objects` maps names to custom
        initializers, regularizers or constraints (or Python functions).
        """
        if not isinstance(config, dict):
            raise ArgumentTypeError("config must be a dict, got %r" % (config,))
        config = dict(config)
        build_shape = None
        if "class_name" in config and isinstance(config.get("config"), dict):
            outer = config
            if outer["class_name"] not in ("BatchNormalization", "BatchNormalizationV1",
                                           "BatchNormalizationV2", "SyncBatchNormalization"):
                raise ValueError("not a BatchNormalization config: class_name=%r"
                                 % (outer["class_name"],))
            config = dict(outer["config"])
            build_shape = (outer.get("build_config") or {}).get("input_shape")
        for key, (ignorable, why) in _LEGACY_KEYS.items():
            if key not in config:
                continue
            if key == "virtual_batch_size" and isinstance(config[key], numbers.Integral) \
                    and not isinstance(config[key], bool):
                continue  # ghost batch normalization: supported (training only)
            value = config.pop(key)
            if any(value is v for v in ignorable):
                warnings.warn(
                    "BatchNormalization config key %s=%r (from Keras 2) is ignored: %s"
                    % (key, value, why), UserWarning, stacklevel=2)
            else:
                raise ValueError("BatchNormalization config key %s=%r is not supported: %s"
                                 % (key, value, why))
        for key in ("batch_input_shape", "batch_shape"):
            value = config.pop(key, None)
            if value is not None and build_shape is None:
                build_shape = list(value)
        value = config.pop("input_shape", None)
        if value is not None and build_shape is None:
            build_shape = [None] + list(value)
        value = config.pop("input_dim", None)
        if value is not None and build_shape is None:
            build_shape = [None, value]
        if config.pop("activity_regularizer", None) is not None:
            raise ValueError("activity_regularizer is not supported by bn_cy.BatchNormalization")
        axis = config.get("axis", -1)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError("axis=%r: normalization over several axes (Keras 2) is not "
                                 "supported; Keras 3 takes one int" % (axis,))
            config["axis"] = axis[0]
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError("unknown BatchNormalization config keys: %s" % ", ".join(unknown))
        for keys, module in ((_INITIALIZER_KEYS, _initializers),
                             (_REGULARIZER_KEYS, _regularizers),
                             (_CONSTRAINT_KEYS, _constraints)):
            for key in keys:
                if key in config:
                    config[key] = _resolve(module, config[key], key, custom_objects)
        layer = cls(**config)
        if build_shape is not None:
            layer.build(build_shape)
        return layer

    # -- persistence ----------------------------------------------------------------------

    def save(self, path):
        """Write config, build shape and weights to one ``.npz`` file at exactly `path`.

        The file holds only arrays and JSON text: :meth:`load` reads it with
        ``allow_pickle=False``, so loading an untrusted file cannot run code.
        """
        with self._lock:
            meta = {
                "format": _FILE_FORMAT,
                "format_version": _FILE_VERSION,
                "config": self.get_config(),
                "build_input_shape": (None if self._build_input_shape is None
                                      else list(self._build_input_shape)),
                "weight_names": list(self._weight_names),
                "weight_dtypes": [getattr(self, n).dtype.name for n in self._weight_names],
                "num_batches_tracked": int(self.num_batches_tracked),
            }
            arrays = {}
            for name in self._weight_names:
                w = getattr(self, name)
                # NumPy cannot store bfloat16 without pickle; float32 holds it exactly.
                arrays[name] = w.astype(np.float32) if w.dtype.name == "bfloat16" else w.copy()
        meta["sha256"] = _weights_digest(meta, arrays)
        arrays[_META_KEY] = np.array(json.dumps(meta, default=_json_default))
        if hasattr(path, "write"):
            np.savez(path, **arrays)
            return path
        # Written next to the target and renamed into place: an interrupted save never leaves
        # a partial file under `path` (an existing file there stays as it was).
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path, custom_objects=None):
        """A layer from a file written by :meth:`save` (no pickle involved).

        A path that does not exist but exists with ``.npz`` appended (what ``np.savez`` would
        have written) is read from there.
        """
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) \
                and os.path.exists(os.fspath(path) + ".npz"):
            path = os.fspath(path) + ".npz"
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError("%r is not a readable BatchNormalization file (truncated or "
                             "corrupt?): %s" % (path, exc)) from None
        with data:
            try:
                files = data.files
                if _META_KEY not in files:
                    raise ValueError("%r is not a file written by BatchNormalization.save"
                                     % (path,))
                meta = json.loads(str(data[_META_KEY][()]))
                stored = {name: data[name] for name in files if name != _META_KEY}
            except (OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, KeyError) as exc:
                raise ValueError("%r is truncated or corrupt: %s" % (path, exc)) from None
            digest = meta.pop("sha256", None)
            if digest is not None and digest != _weights_digest(meta, stored):
                raise ValueError("%r was modified after it was saved (its checksum does not "
                                 "match its contents)" % (path,))
            if meta.get("format") != _FILE_FORMAT or meta.get("format_version", 0) > _FILE_VERSION:
                raise ValueError("unsupported file format %r version %r"
                                 % (meta.get("format"), meta.get("format_version")))
            layer = cls.from_config(meta["config"], custom_objects)
            if meta.get("build_input_shape") is not None:
                layer.build(meta["build_input_shape"])
                if layer.weight_names != meta["weight_names"]:
                    raise ValueError("weights in the file (%s) do not match the layer (%s)"
                                     % (meta["weight_names"], layer.weight_names))
                layer.set_weights([stored[name] for name in meta["weight_names"]])
            layer.num_batches_tracked = int(meta.get("num_batches_tracked", 0))
        return layer

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_local", "_last_forward", "_communicator", "_call_cache",
                    "_momentum_cache"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        for key, default in _EXTRA_DEFAULTS + (("num_batches_tracked", 0),
                                               ("skipped_updates", 0)):
            state.setdefault(key, default)  # pickles of earlier versions
        self.__dict__.update(state)
        self._communicator = None  # communicators are per process: never pickled
        self._call_cache = None
        self._momentum_cache = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._last_forward = None

    def __repr__(self):
        shape = "" if not self.built else ", built for %s" % (self._build_input_shape,)
        return "<BatchNormalization name=%r axis=%d policy=%s%s>" % (
            self.name, self.axis, self._dtype_policy.name, shape)


def _chan_merge(wa, ma, m2a, wb, mb, m2b):
    """Merge two per-channel (weight, mean, M2) partial states (Chan et al.), in float64."""
    w = wa + wb
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(w > 0, wb / np.where(w > 0, w, 1.0), 0.0)
    delta = mb - ma
    mean = np.where(wa > 0, ma + delta * frac, mb)
    mean = np.where(wb > 0, mean, ma)
    m2 = np.where(wb > 0, m2a + m2b + delta * delta * (wa * frac), m2a)
    return w, mean, m2


def _clone(initializer):
    """A copy with a fresh random seed when unseeded (Keras's _clone_initializer)."""
    if isinstance(initializer, _initializers.Initializer):
        return initializer.clone()
    return initializer


def _broadcastable(shape, target):
    if len(shape) != len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(shape, target))


def _weights_digest(meta, arrays):
    """SHA-256 over the file's metadata (without the digest) and every array's bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=_json_default).encode())
    for name in sorted(arrays):
        if name == _META_KEY:
            continue
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
