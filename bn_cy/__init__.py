"""bn_cy: batch normalization for NumPy on the CPU, with the semantics of Keras 3's
``keras.layers.BatchNormalization``, computed by C kernels parallelized with OpenMP.

Functional API: :func:`moments`, :func:`batch_norm`, :func:`batch_norm_train`,
:func:`batch_norm_backward`; thread control: :func:`set_num_threads`, :func:`get_num_threads`;
build facts: :func:`openmp_enabled`, :func:`build_info`.
"""

__version__ = "0.1.0"

from .ops import (
    batch_norm,
    batch_norm_backward,
    batch_norm_train,
    build_info,
    get_num_threads,
    moments,
    openmp_enabled,
    set_num_threads,
)
from .folding import fold_into_conv, fold_into_dense
from .keras_io import load_keras_layers
from .layer import BatchNormalization

__all__ = [
    "__version__",
    "moments",
    "batch_norm",
    "batch_norm_train",
    "batch_norm_backward",
    "set_num_threads",
    "get_num_threads",
    "openmp_enabled",
    "build_info",
    "BatchNormalization",
    "fold_into_dense",
    "fold_into_conv",
    "load_keras_layers",
]
