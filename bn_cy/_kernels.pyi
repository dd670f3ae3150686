"""Typing for the compiled module bn_cy._kernels (called by bn_cy.ops and bn_cy.layer)."""

from typing import Optional, Tuple

import numpy as np

def moments(
    x: np.ndarray, axis: int, mask: Optional[np.ndarray], n_threads: int
) -> Tuple[np.ndarray, np.ndarray]: ...
def batch_norm(
    x: np.ndarray,
    axis: int,
    out: Optional[np.ndarray],
    mean: np.ndarray,
    var: np.ndarray,
    gamma: Optional[np.ndarray],
    beta: Optional[np.ndarray],
    eps: float,
    n_threads: int,
) -> np.ndarray: ...
def batch_norm_train(
    x: np.ndarray,
    axis: int,
    out: Optional[np.ndarray],
    mask: Optional[np.ndarray],
    gamma: Optional[np.ndarray],
    beta: Optional[np.ndarray],
    eps: float,
    n_threads: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def batch_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    out: Optional[np.ndarray],
    mask: Optional[np.ndarray],
    mean: np.ndarray,
    var: np.ndarray,
    gamma: Optional[np.ndarray],
    eps: float,
    training: bool,
    n_threads: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def ema_update(moving: np.ndarray, batch: np.ndarray, momentum: float, rest: float) -> bool: ...
def train_update(
    x: np.ndarray,
    axis: int,
    gamma: Optional[np.ndarray],
    beta: Optional[np.ndarray],
    eps: float,
    moving_mean: object,
    moving_var: object,
    momentum: float,
    rest: float,
) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]]: ...
def openmp_enabled() -> bool: ...
def omp_max_threads() -> int: ...
def num_procs() -> int: ...
def simd_level() -> str: ...
def simd_compiled() -> list[str]: ...
def llc_bytes() -> int: ...
def stream_min_bytes() -> Optional[float]: ...
def compiler() -> str: ...
