#!/usr/bin/env python3
"""bn_cy benchmarks: the cases, the peers, the streaming floors, and the ratio report.

    python benchmarks/report.py [--quick] [--dtype float32] [--threads 1 2] [--output BENCHMARKS.md]
    python -m bn_cy bench [same options]        # the same report, from a source checkout

Every time in the report is measured in the same run, best of N, with ``time.perf_counter``
(short calls are looped so one measurement lasts about 0.2 ms); the peers and floor passes of a
case and thread count are measured round-robin, so their ratios are side by side, and each is
also measured back to back with itself, the faster of both counting (between the others' calls
an input may or may not still be in the last-level cache, depending on who ran before; when a
call repeats itself it finds the caches as its own loop leaves them). The pytest-benchmark
suites next to this file (``pytest benchmarks``) time the very same callables, one peer per test,
peers of a case in one benchmark ``group``.

Peers (each one given the same memory layout as bn_cy's input):

* ``bn_cy``      the allocating call; ``bn_cy out=`` writes into a preallocated, pre-faulted array.
* ``numpy``      a NumPy two-pass reference (mean, then variance of the centred data), the code a
                 NumPy user would write; NumPy runs it on one thread whatever the thread count.
* ``torch``      PyTorch CPU: ``torch.nn.functional.batch_norm`` (backward:
                 ``aten.native_batch_norm_backward``, the kernel autograd calls; moments:
                 ``torch.var_mean``) on ``torch.from_numpy(x)`` with the feature axis moved to dim 1
                 by ``torch.movedim`` -- a permuted *view*, not a copy -- and
                 ``torch.set_num_threads`` set to the thread count.
* ``keras``      Keras 3 on the torch backend: ``keras.layers.BatchNormalization`` called on a torch
                 tensor with ``training=True`` (``False`` for inference), under ``torch.no_grad()``;
                 moments: ``keras.ops.moments``. Keras has no standalone backward, so none is timed.

The floor is what streaming the data costs with at most the same number of threads:

* ``read x``  one read pass over x (a sum);
* ``copy``    one read/write pass x -> a preallocated, pre-faulted y;
* ``add``     one pass reading x and dy and writing dx (``dx = x + dy``).

NumPy's own reductions and copies run on one thread, so each pass is measured twice: with
PyTorch's multithreaded ``Tensor.sum`` / ``Tensor.copy_`` / ``torch.add(out=)`` over flat views of
the same NumPy memory, and with NumPy over a pool of Python threads (one contiguous slice each;
NumPy releases the GIL in these loops). The report keeps the fastest of both ways at every thread
count up to the row's (on cached data, two threads can stream slower than one), each measured
both round-robin with the peers and back to back with itself (the faster counts). Per mode:

* training forward = read x + copy       (statistics need x once, normalizing reads it again and
                                          writes y)
* inference        = copy
* backward         = read x + read dy + add   (the reductions sum(dy) and sum(dy*xhat) read x and
                                          dy; dx then needs x and dy again and writes dx)
* moments          = read x
"""

import argparse
import contextlib
import datetime
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import bn_cy

#: the repository this script belongs to (where BENCHMARKS.md is written by default)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPSILON = 1e-3

# ---------------------------------------------------------------------------------------------
# Cases, modes, peers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    axis: int
    layout: str
    large: bool = False  # several hundred MB per array: pytest marker "large", report --no-large
    quick: bool = False  # part of --quick / --bench-quick

    @property
    def feature_axis(self):
        return self.axis % len(self.shape)

    @property
    def channels(self):
        return self.shape[self.feature_axis]

    @property
    def reduce_axes(self):
        return tuple(i for i in range(len(self.shape)) if i != self.feature_axis)

    @property
    def broadcast_shape(self):
        """Shape of a per-channel vector broadcast against x."""
        return tuple(self.channels if i == self.feature_axis else 1 for i in range(len(self.shape)))

    def describe(self):
        return "%s axis=%d" % ("x".join(map(str, self.shape)), self.axis)


CASES = (
    Case("nhwc", (32, 56, 56, 64), -1, "NHWC", quick=True),
    Case("nchw", (32, 64, 56, 56), 1, "NCHW", quick=True),
    Case("dense", (256, 1024), -1, "(N, C)", quick=True),
    Case("ntc", (64, 128, 256), -1, "(N, T, C)", quick=True),
    Case("nct", (64, 256, 128), 1, "(N, C, T)"),
    Case("nhwc_large", (64, 112, 112, 64), -1, "NHWC", large=True),
    Case("tiny", (32, 64), -1, "(N, C)", quick=True),
)
CASES_BY_NAME = {case.name: case for case in CASES}
DTYPES = ("float32", "float64")
THREADS = (1, 2)
MODES = ("train", "infer", "backward", "moments")
MODE_TITLES = {
    "train": "Training forward (batch_norm_train: statistics + normalize)",
    "infer": "Inference (batch_norm with given mean/variance)",
    "backward": "Backward, training mode (batch_norm_backward)",
    "moments": "Moments alone (moments)",
}
#: the implementations compared in each mode (the floors come on top)
PEERS = {
    "train": ("bn_cy", "bn_cy_out", "numpy", "torch", "keras"),
    "infer": ("bn_cy", "bn_cy_out", "numpy", "torch", "keras"),
    "backward": ("bn_cy", "bn_cy_out", "numpy", "torch"),
    "moments": ("bn_cy", "numpy", "torch", "keras"),
}
#: the two ways of measuring the streaming floor (the report keeps the faster per pass)
FLOOR_PEERS = ("floor_torch", "floor_numpy")
#: the streaming passes that make up each mode's floor
FLOOR_PASSES = {
    "train": ("read_x", "copy"),
    "infer": ("copy",),
    "backward": ("read_x", "read_dy", "add"),
    "moments": ("read_x",),
}
PEER_LABELS = {
    "bn_cy": "bn_cy",
    "bn_cy_out": "bn_cy out=",
    "numpy": "numpy",
    "torch": "torch",
    "keras": "keras",
    "floor": "floor",
}


class Unavailable(Exception):
    """A peer that cannot run here (its package is not installed, or the mode has no such call)."""


def group_name(mode, inputs, threads):
    return "%s %s %s %dthr" % (mode, inputs.case.name, inputs.dtype.name, threads)


# ---------------------------------------------------------------------------------------------
# Optional peers
# ---------------------------------------------------------------------------------------------

_optional = {}


def torch_module():
    """torch, or None when it is not installed (imported once)."""
    if "torch" not in _optional:
        try:
            import torch
        except Exception:  # ImportError, or a broken installation
            torch = None
        _optional["torch"] = torch
    return _optional["torch"]


def keras_module():
    """keras on the torch backend, or None (Keras is imported with KERAS_BACKEND=torch unless the
    environment chose a backend already; any other backend is not a peer here)."""
    if "keras" not in _optional:
        keras = None
        if torch_module() is not None:
            os.environ.setdefault("KERAS_BACKEND", "torch")
            try:
                import keras as keras_

                if keras_.backend.backend() == "torch":
                    keras = keras_
            except Exception:
                keras = None
        _optional["keras"] = keras
    return _optional["keras"]


def set_torch_threads(threads):
    torch = _optional.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _version(name):
    module = {"torch": torch_module, "keras": keras_module}.get(name, lambda: None)()
    if module is None:
        try:
            from importlib.metadata import version

            return version(name) + " (not importable as a peer)"
        except Exception:
            return "not installed"
    return module.__version__


# ---------------------------------------------------------------------------------------------
# Inputs (made once per case and dtype, shared by every peer and thread count)
# ---------------------------------------------------------------------------------------------


# Where in a 4 KiB page the big arrays start. NumPy's own placement depends on the process's
# allocation history (a 1 MB array comes from mmap at offset 16, or from the heap at any multiple
# of 16), and the placement changes the speed of a pass: a vector copy that does not align its
# stores splits lines unless the output is cache-line aligned, and two streams whose addresses
# agree in their low 12 bits slow each other down (4K aliasing: a load waits for an earlier store
# that only looks like it overlaps). On this benchmark's first machine the copy floor of the 1 MB
# case moved by 2x between runs from that alone. So every run places x, dy and the output at
# these fixed, distinct offsets, each 16 bytes past a cache line like numpy's usual 16-byte
# alignment (no peer gets cache-line-aligned data it would not get from numpy).
# `--aligned` takes cache-line-aligned offsets instead: a vector copy that does not align its
# stores itself (PyTorch's, NumPy's) is faster there, so the floor is lower.
PAGE_OFFSETS = {"x": 16, "dy": 1360, "out": 2704}
ALIGNED_PAGE_OFFSETS = {"x": 0, "dy": 1344, "out": 2688}


def placed_empty(shape, dtype, offset):
    """An uninitialized C-contiguous array of `shape` starting `offset` bytes past a page."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 2 * 4096, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class Inputs:
    """The arrays of one (case, dtype): x = 0.5 + 2*N(0, 1), dy = N(0, 1), gamma, beta, the batch
    statistics of x, and a pre-faulted output array for the ``out=`` peers and the floors; x, dy
    and the output start at the fixed page offsets `offsets` (default PAGE_OFFSETS)."""

    def __init__(self, case, dtype, offsets=None):
        offsets = PAGE_OFFSETS if offsets is None else offsets
        self.case = case
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(20240229)
        c = case.channels
        self.x = placed_empty(case.shape, self.dtype, offsets["x"])
        rng.standard_normal(dtype=self.dtype, out=self.x)
        self.x *= 2
        self.x += 0.5
        self.dy = placed_empty(case.shape, self.dtype, offsets["dy"])
        rng.standard_normal(dtype=self.dtype, out=self.dy)
        self.gamma = rng.uniform(0.5, 1.5, c).astype(self.dtype)
        self.beta = rng.standard_normal(c).astype(self.dtype)
        self.mean, self.var = bn_cy.moments(self.x, axis=case.axis)
        self.mean = self.mean.astype(self.dtype)
        self.var = self.var.astype(self.dtype)
        self.out = placed_empty(case.shape, self.dtype, offsets["out"])
        self.out[...] = 0  # writes every page: no page faults when timed
        self._torch = None
        self._keras = {}
        self._numpy_pools = {}

    @property
    def nbytes(self):
        return self.x.nbytes

    def torch_tensors(self):
        torch = torch_module()
        if torch is None:
            raise Unavailable("torch is not installed")
        if self._torch is None:
            t = {}
            ax = self.case.feature_axis
            t["x"] = torch.from_numpy(self.x)
            t["x1"] = torch.movedim(t["x"], ax, 1)  # a view: the channel at dim 1, as torch wants
            t["dy1"] = torch.movedim(torch.from_numpy(self.dy), ax, 1)
            t["x_flat"] = torch.from_numpy(self.x.reshape(-1))
            t["dy_flat"] = torch.from_numpy(self.dy.reshape(-1))
            t["out_flat"] = torch.from_numpy(self.out.reshape(-1))
            for name in ("gamma", "beta", "mean", "var"):
                t[name] = torch.from_numpy(getattr(self, name))
            with torch.no_grad():
                _, t["save_mean"], t["save_invstd"] = torch.native_batch_norm(
                    t["x1"], t["gamma"], t["beta"], None, None, True, 0.0, EPSILON
                )
            self._torch = t
        return self._torch

    def keras_layer(self, key):
        keras = keras_module()
        if keras is None:
            raise Unavailable("keras (torch backend) is not installed")
        if key not in self._keras:
            layer = keras.layers.BatchNormalization(
                axis=self.case.axis, epsilon=EPSILON, dtype=self.dtype.name
            )
            layer.build(self.case.shape)
            self._keras[key] = layer
        return self._keras[key]

    def numpy_pool(self, threads):
        if threads not in self._numpy_pools:
            self._numpy_pools[threads] = ThreadPoolExecutor(threads) if threads > 1 else None
        return self._numpy_pools[threads]

    def close(self):
        for pool in self._numpy_pools.values():
            if pool is not None:
                pool.shutdown()
        self._numpy_pools.clear()
        self._torch = None
        self._keras.clear()


# ---------------------------------------------------------------------------------------------
# NumPy two-pass reference (what a NumPy user writes; not tuned)
# ---------------------------------------------------------------------------------------------


def numpy_train(x, gamma, beta, axes, bshape, epsilon):
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    var = np.mean(np.square(xc), axis=axes, keepdims=True)
    y = xc * (gamma.reshape(bshape) / np.sqrt(var + epsilon))
    y += beta.reshape(bshape)
    return y, mean.reshape(-1), var.reshape(-1)


def numpy_infer(x, mean, var, gamma, beta, bshape, epsilon):
    scale = gamma / np.sqrt(var + epsilon)
    return (x - mean.reshape(bshape)) * scale.reshape(bshape) + beta.reshape(bshape)


def numpy_backward(dy, x, mean, var, gamma, axes, bshape, epsilon):
    n = x.size // max(1, gamma.size)
    inv = 1.0 / np.sqrt(var + epsilon)
    xhat = (x - mean.reshape(bshape)) * inv.reshape(bshape)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xhat = np.sum(dy * xhat, axis=axes)
    dx = dy - (sum_dy / n).reshape(bshape) - xhat * (sum_dy_xhat / n).reshape(bshape)
    dx *= (gamma * inv).reshape(bshape)
    return dx, sum_dy_xhat, sum_dy


def numpy_moments(x, axes):
    mean = x.mean(axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes)
    return mean.reshape(-1), var


# ---------------------------------------------------------------------------------------------
# Floors: streaming passes
# ---------------------------------------------------------------------------------------------


def _split(a, parts):
    return np.array_split(a.reshape(-1), parts)


def floor_pass(name, impl, inputs, threads):
    """A callable doing one streaming pass ("read_x", "read_dy", "copy", "add") with `threads`
    threads, by "torch" or "numpy" (NumPy over a pool of Python threads)."""
    if impl == "torch":
        t = inputs.torch_tensors()
        set_torch_threads(threads)
        if name == "read_x":
            return t["x_flat"].sum
        if name == "read_dy":
            return t["dy_flat"].sum
        if name == "copy":
            return functools.partial(t["out_flat"].copy_, t["x_flat"])
        if name == "add":
            torch = torch_module()
            return functools.partial(torch.add, t["x_flat"], t["dy_flat"], out=t["out_flat"])
    elif impl == "numpy":
        pool = inputs.numpy_pool(threads)
        parts = max(1, threads)
        xs, dys, outs = _split(inputs.x, parts), _split(inputs.dy, parts), _split(inputs.out, parts)
        if name in ("read_x", "read_dy"):
            fn, args = np.add.reduce, ((xs if name == "read_x" else dys),)
        elif name == "copy":
            fn, args = np.copyto, (outs, xs)
        elif name == "add":
            fn, args = (lambda a, b, o: np.add(a, b, out=o)), (xs, dys, outs)
        else:
            raise ValueError(name)
        if pool is None:
            return functools.partial(fn, *[a[0] for a in args])
        return lambda: list(pool.map(fn, *args))
    raise ValueError("unknown floor pass %r/%r" % (name, impl))


def floor_function(mode, impl, inputs, threads):
    passes = [floor_pass(name, impl, inputs, threads) for name in FLOOR_PASSES[mode]]

    def floor():
        for p in passes:
            p()

    return floor


# ---------------------------------------------------------------------------------------------
# Peer callables
# ---------------------------------------------------------------------------------------------


def bn_cy_function(lib, mode, inputs, threads, out=False):
    """A zero-argument callable running `lib`'s call for `mode` (`lib` is bn_cy, or a copy of it
    under another name: benchmarks/ab.py) on `inputs` with `threads` threads, into the
    preallocated output with `out` (moments have none)."""
    d = inputs
    kw = dict(axis=d.case.axis, n_threads=threads)
    if out and mode != "moments":
        kw["out"] = d.out
    if mode == "train":
        return functools.partial(lib.batch_norm_train, d.x, d.gamma, d.beta, epsilon=EPSILON, **kw)
    if mode == "infer":
        return functools.partial(
            lib.batch_norm, d.x, d.mean, d.var, d.gamma, d.beta, epsilon=EPSILON, **kw
        )
    if mode == "backward":
        return functools.partial(
            lib.batch_norm_backward, d.dy, d.x, d.mean, d.var, d.gamma, epsilon=EPSILON, **kw
        )
    if mode == "moments":
        return functools.partial(lib.moments, d.x, **kw)
    raise ValueError("unknown mode %r" % (mode,))


def peer_function(mode, peer, inputs, threads):
    """A zero-argument callable running `peer` in `mode` on `inputs` with `threads` threads.
    Raises Unavailable when the peer cannot run here."""
    if mode not in PEERS:
        raise ValueError("unknown mode %r" % (mode,))
    if peer in FLOOR_PEERS:
        return floor_function(mode, peer.split("_", 1)[1], inputs, threads)
    if peer not in PEERS[mode]:
        raise Unavailable("no %s peer for %s" % (peer, mode))
    case, d = inputs.case, inputs
    set_torch_threads(threads)
    if peer in ("bn_cy", "bn_cy_out"):
        return bn_cy_function(bn_cy, mode, inputs, threads, out=peer == "bn_cy_out")
    axes, bshape = case.reduce_axes, case.broadcast_shape
    if peer == "numpy":
        if mode == "train":
            return functools.partial(numpy_train, d.x, d.gamma, d.beta, axes, bshape, EPSILON)
        if mode == "infer":
            return functools.partial(numpy_infer, d.x, d.mean, d.var, d.gamma, d.beta, bshape, EPSILON)
        if mode == "backward":
            return functools.partial(
                numpy_backward, d.dy, d.x, d.mean, d.var, d.gamma, axes, bshape, EPSILON
            )
        return functools.partial(numpy_moments, d.x, axes)
    if peer == "torch":
        t = d.torch_tensors()
        torch = torch_module()
        set_torch_threads(threads)
        F = torch.nn.functional
        if mode == "train":
            return functools.partial(
                F.batch_norm, t["x1"], None, None, t["gamma"], t["beta"], True, 0.0, EPSILON
            )
        if mode == "infer":
            return functools.partial(
                F.batch_norm, t["x1"], t["mean"], t["var"], t["gamma"], t["beta"], False, 0.0, EPSILON
            )
        if mode == "backward":
            return functools.partial(
                torch.ops.aten.native_batch_norm_backward,
                t["dy1"], t["x1"], t["gamma"], None, None, t["save_mean"], t["save_invstd"],
                True, EPSILON, [True, True, True],
            )
        return functools.partial(torch.var_mean, t["x"], dim=axes, correction=0)
    if peer == "keras":
        keras = keras_module()
        if keras is None:
            raise Unavailable("keras (torch backend) is not installed")
        torch = torch_module()
        set_torch_threads(threads)
        xk = d.torch_tensors()["x"]
        if mode == "moments":
            return functools.partial(keras.ops.moments, xk, axes=list(axes))
        layer = d.keras_layer(mode)
        training = mode == "train"

        def keras_call():
            with torch.no_grad():
                return layer(xk, training=training)

        return keras_call
    raise Unavailable("no %s peer for %s" % (peer, mode))


@contextlib.contextmanager
def layer_threads(fn):
    """Runs a layer call of layer_functions() with its thread count in effect."""
    threads = getattr(fn, "bn_cy_threads", None)
    if threads is None:
        yield
        return
    previous = bn_cy.set_num_threads(threads)
    try:
        yield
    finally:
        bn_cy.set_num_threads(previous)


def layer_functions(inputs, threads):
    """Layer calls on `inputs` (training=True, no grad): bn_cy, keras and torch.nn.BatchNorm."""
    out = {}
    layer_cls = getattr(bn_cy, "BatchNormalization", None)
    if layer_cls is None:
        try:
            from bn_cy.layer import BatchNormalization as layer_cls
        except ImportError:
            layer_cls = None
    case, x = inputs.case, inputs.x
    if layer_cls is not None:
        bn_layer = layer_cls(axis=case.axis, epsilon=EPSILON, dtype=inputs.dtype.name)
        previous = bn_cy.set_num_threads(threads)
        bn_layer(x, training=True)
        bn_cy.set_num_threads(previous)

        def bn_cy_layer():
            return bn_layer(x, training=True)

        # timed with bn_cy.set_num_threads(threads) in effect (see Report.measure_case), as
        # torch's module is timed with torch.set_num_threads(threads)
        bn_cy_layer.bn_cy_threads = threads
        out["bn_cy"] = bn_cy_layer
    try:
        out["keras"] = peer_function("train", "keras", inputs, threads)
    except Unavailable:
        pass
    torch = torch_module()
    if torch is not None and len(case.shape) in (2, 3, 4):
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(case.shape)]
        module = cls(case.channels, eps=EPSILON, dtype=getattr(torch, inputs.dtype.name)).train()
        x1 = inputs.torch_tensors()["x1"]
        set_torch_threads(threads)

        def torch_layer():
            with torch.no_grad():
                return module(x1)

        out["torch"] = torch_layer
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def best_times(fns, repeat=15, budget=1.0, target=2e-4):
    """Best time of one call of each function in `fns` (a dict), in seconds, measured round-robin.

    A warm-up call each, then rounds: in every round each function still being measured gets one
    measurement, looping the call enough times to last about `target` seconds (so the timer's
    resolution does not matter), right after one untimed call of its own (so each measurement
    finds the caches as the function's previous call left them, as it would in a loop of its
    own). Interleaving makes the ratios between the functions robust to the machine's speed
    drifting during the run. A function leaves the rounds after `repeat` measurements once half
    its `budget` seconds of measured time is spent (or after 10*repeat), or after 3 once the whole
    budget is spent -- on a busy machine the minimum of many short samples is the one that escaped
    interference. The garbage collector is off, as in timeit.
    """
    state = {}
    for key, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        state[key] = {"number": max(1, int(target / max(first, 1e-7))), "best": first, "n": 0,
                      "spent": 0.0}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        active = list(fns)
        while active:
            for key in list(active):
                fn, st = fns[key], state[key]
                fn()
                t0 = time.perf_counter()
                for _ in range(st["number"]):
                    fn()
                t1 = time.perf_counter()
                st["best"] = min(st["best"], (t1 - t0) / st["number"])
                st["n"] += 1
                st["spent"] += t1 - t0
                n, spent = st["n"], st["spent"]
                if (n >= 3 and spent > budget) or (
                        n >= repeat and (spent > budget / 2 or n >= 10 * repeat)):
                    active.remove(key)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: st["best"] for key, st in state.items()}


def extra_memory(fn, output_bytes):
    """Peak memory a call allocates beyond its outputs, as tracemalloc sees it (NumPy's
    allocations are traced; memory the C kernels take with malloc is not)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return peak - base - output_bytes


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_model():
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_sizes():
    """{"L1d": "32K", ...} of cpu0 (per instance), from sysfs; {} elsewhere."""
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return caches
    for name in names:
        if not name.startswith("index"):
            continue
        level = _read(os.path.join(base, name, "level")).strip()
        kind = _read(os.path.join(base, name, "type")).strip()
        size = _read(os.path.join(base, name, "size")).strip()
        if level and size and kind != "Instruction":
            caches["L%s%s" % (level, "d" if kind == "Data" else "")] = size
    return caches


def _size_bytes(text):
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    try:
        return int(text)
    except ValueError:
        return 0


def last_level_cache_bytes():
    sizes = cache_sizes()
    for key in ("L3", "L2"):
        if key in sizes:
            return _size_bytes(sizes[key])
    return 8 << 20


def memory_total():
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return "%.1f GiB" % (int(line.split()[1]) / (1 << 20))
    return "unknown"


def core_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bn_cy_origin(package_dir=None, repo=None):
    """Where the measured bn_cy was imported from, in words that name no path of the machine (the
    report is meant to be committed): this repository's source tree, an installed copy, or
    some other directory (a build folder of the repository among them)."""
    if package_dir is None:
        package_dir = os.path.dirname(os.path.abspath(bn_cy.__file__))
    if repo is None:
        repo = REPO
    package_dir, repo = os.path.normcase(package_dir), os.path.normcase(repo)
    if os.path.dirname(package_dir) == repo:
        return "this repository's source tree (built in place)"
    parts = package_dir.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return "an installed copy (site-packages)"
    return "another directory (neither the source tree nor site-packages)"


def machine_lines():
    info = bn_cy.build_info()
    caches = ", ".join("%s %s" % kv for kv in cache_sizes().items()) or "unknown"
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "unknown"
    return [
        ("CPU", cpu_model()),
        ("cores", "%d usable (os.cpu_count() = %s)" % (core_count(), os.cpu_count())),
        ("caches (per instance)", caches),
        ("memory", memory_total()),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("numpy", np.__version__),
        ("torch", _version("torch")),
        ("keras", _version("keras") + (" (backend torch)" if keras_module() is not None else "")),
        ("bn_cy", "%s from %s" % (info.get("version"), bn_cy_origin())),
        (
            "bn_cy build",
            "compiler %s, OpenMP %s, SIMD %s (compiled: %s)"
            % (
                info.get("compiler"),
                "on" if info.get("openmp") else "OFF",
                info.get("simd"),
                ", ".join(info.get("simd_compiled") or []),
            ),
        ),
        ("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "(unset)")),
        ("load average at start", load),
    ]


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------


def fmt_ms(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    for limit, fmt in ((100, "%.0f"), (10, "%.1f"), (1, "%.2f"), (0.01, "%.3f")):
        if ms >= limit:
            return fmt % ms
    return "%.4f" % ms


def fmt_ratio(value):
    return "-" if value is None or not math.isfinite(value) else "%.2f" % value


def _ratio(a, b):
    return a / b if a is not None and b else None


def markdown_table(header, rows):
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_looks_numeric(row[i]) for row in cells[1:]) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)
        ) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)
    ) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _looks_numeric(text):
    if text == "-":
        return True
    try:
        float(text.rstrip("x"))
        return True
    except ValueError:
        return False


class Report:
    def __init__(self, args, command):
        self.args = args
        self.command = command
        self.times = {}  # (mode, case, dtype, threads) -> {peer: seconds or None}
        self.passes = {}  # (case, dtype, threads) -> {pass: (seconds, impl)}
        self.layer_times = {}  # (case, dtype, threads) -> {peer: seconds}
        self.scaling = {}  # (mode, case, dtype, threads) -> bn_cy at fewest threads / at threads
        self.memory = []  # rows
        self.notes = []
        self.lines = []
        self.offsets = ALIGNED_PAGE_OFFSETS if getattr(args, "aligned", False) else PAGE_OFFSETS

    # -- measuring -------------------------------------------------------------------------

    def _times(self, fns):
        return best_times(fns, repeat=self.args.repeat, budget=self.args.budget)

    def _say(self, text):
        if not self.args.silent:
            print(text, file=sys.stderr, flush=True)

    def measure_case(self, case, dtype):
        args = self.args
        self._say("  %s %s %s ..." % (case.name, case.describe(), dtype))
        inputs = Inputs(case, dtype, self.offsets)
        try:
            # The floor with `threads` threads is the fastest way measured to stream the data with
            # at most that many: on cached data a 2-thread pass can lose to a 1-thread one.
            best_passes = {}
            for threads in args.threads:
                # every floor pass and every peer of every mode at this thread count, timed
                # round-robin (best_times): their ratios are side by side
                fns = {}
                for name in sorted({p for m in args.modes for p in FLOOR_PASSES[m]}):
                    for impl in ("torch", "numpy"):
                        if impl == "torch" and (args.no_torch or torch_module() is None):
                            continue
                        fns[("pass", name, impl)] = floor_pass(name, impl, inputs, threads)
                for mode in args.modes:
                    for peer in PEERS[mode]:
                        if peer in ("torch", "keras") and args.no_torch:
                            continue
                        if peer == "keras" and args.no_keras:
                            continue
                        try:
                            fns[(mode, peer)] = peer_function(mode, peer, inputs, threads)
                        except Unavailable:
                            continue
                times = self._times(fns)
                for key, t in list(times.items()):
                    # every callable also back to back with itself, the faster counts: between
                    # the others' calls its arrays may or may not still be in the last-level
                    # cache (which of them depends on the order), when it repeats itself they
                    # are as its own loop leaves them; for the floor passes this is the strictest
                    # floor, and the peers get the same rule
                    t = times[key] = min(t, self._times({key: fns[key]})[key])
                    if key[0] == "pass":
                        name = key[1]
                        if name not in best_passes or t < best_passes[name][0]:
                            best_passes[name] = (t, "%s, %d thr" % (key[2], threads))
                passes = dict(best_passes)
                self.passes[(case.name, dtype, threads)] = passes
                for mode in args.modes:
                    row = {peer: times[(mode, peer)] for peer in PEERS[mode]
                           if (mode, peer) in times}
                    row["floor"] = sum(passes[p][0] for p in FLOOR_PASSES[mode])
                    self.times[(mode, case.name, dtype, threads)] = row
                if case.name == "tiny" and args.layer:
                    fns = layer_functions(inputs, threads)
                    if args.no_torch:
                        fns = {k: v for k, v in fns.items() if k == "bn_cy"}
                    if args.no_keras:
                        fns.pop("keras", None)
                    with layer_threads(fns.get("bn_cy")):
                        times = self._times(fns)
                    self.layer_times[(case.name, dtype, threads)] = times
            if len(args.threads) > 1:
                self.measure_scaling(inputs)
            if args.memory and not case.large:
                self.measure_memory(inputs)
        finally:
            inputs.close()
            del inputs
            gc.collect()

    def measure_scaling(self, inputs):
        """bn_cy's speedup per mode: its call (out= where the mode has one) at each thread count,
        timed round-robin in one set, so that the machine's speed drifting between the
        per-thread-count sets above does not enter the ratio."""
        case, dtype, threads = inputs.case, inputs.dtype.name, self.args.threads
        for mode in self.args.modes:
            peer = "bn_cy_out" if "bn_cy_out" in PEERS[mode] else "bn_cy"
            fns = {t: peer_function(mode, peer, inputs, t) for t in threads}
            times = self._times(fns)
            for t in threads:
                if t != min(threads):
                    self.scaling[(mode, case.name, dtype, t)] = _ratio(times[min(threads)],
                                                                       times[t])

    def measure_memory(self, inputs):
        case, threads = inputs.case, max(self.args.threads)
        d = inputs
        kw = dict(axis=case.axis, n_threads=threads)
        calls = [
            ("batch_norm_train",
             lambda: bn_cy.batch_norm_train(d.x, d.gamma, d.beta, **kw), d.nbytes),
            ("batch_norm_train out=",
             lambda: bn_cy.batch_norm_train(d.x, d.gamma, d.beta, out=d.out, **kw), 0),
            ("batch_norm out=",
             lambda: bn_cy.batch_norm(d.x, d.mean, d.var, d.gamma, d.beta, out=d.out, **kw), 0),
            ("batch_norm_backward",
             lambda: bn_cy.batch_norm_backward(d.dy, d.x, d.mean, d.var, d.gamma, **kw), d.nbytes),
        ]
        for name, fn, output_bytes in calls:
            fn()
            extra = extra_memory(fn, output_bytes)
            self.memory.append((case, inputs.dtype.name, threads, name, extra))

    def run(self):
        args = self.args
        self._say("bn_cy benchmark report: %d case(s) x %s x threads %s, modes %s"
                  % (len(args.cases), "/".join(args.dtypes), args.threads, ", ".join(args.modes)))
        for case in args.cases:
            for dtype in args.dtypes:
                self.measure_case(case, dtype)

    # -- reporting ---------------------------------------------------------------------------

    def _bn_best(self, row):
        """bn_cy's time against the floor: the out= call where the mode has one."""
        return row.get("bn_cy_out", row.get("bn_cy"))

    def speedup(self, mode, case, dtype, threads):
        return self.scaling.get((mode, case, dtype, threads))  # None at the fewest threads

    def mode_table(self, mode):
        peers = [p for p in PEERS[mode] if any(p in r for (m, *_), r in self.times.items() if m == mode)]
        has_out = "bn_cy_out" in peers
        header = ["case", "shape, axis", "dtype", "thr", "MB"] + ["%s ms" % PEER_LABELS[p] for p in peers]
        header += ["floor ms", "bn_cy/torch", ("out=/floor" if has_out else "bn_cy/floor"), "speedup"]
        rows = []
        for case in self.args.cases:
            for dtype in self.args.dtypes:
                for threads in self.args.threads:
                    row = self.times.get((mode, case.name, dtype, threads))
                    if row is None:
                        continue
                    mb = math.prod(case.shape) * np.dtype(dtype).itemsize / 1e6
                    cells = [case.name, case.describe(), dtype, threads, "%.3g" % mb]
                    cells += [fmt_ms(row.get(p)) for p in peers]
                    speed = self.speedup(mode, case.name, dtype, threads)
                    cells += [
                        fmt_ms(row["floor"]),
                        fmt_ratio(_ratio(row.get("bn_cy"), row.get("torch"))),
                        fmt_ratio(_ratio(self._bn_best(row), row["floor"])),
                        "-" if speed is None else "%.2fx" % speed,
                    ]
                    rows.append(cells)
        return markdown_table(header, rows)

    def passes_table(self):
        names = ("read_x", "read_dy", "copy", "add")
        header = ["case", "dtype", "thr"] + ["%s ms" % p.replace("_", " ") for p in names]
        rows = []
        for (case, dtype, threads), passes in self.passes.items():
            cells = [case, dtype, threads]
            for name in names:
                if name in passes:
                    cells.append("%s (%s)" % (fmt_ms(passes[name][0]), passes[name][1]))
                else:
                    cells.append("-")
            rows.append(cells)
        return markdown_table(header, rows)

    def layer_table(self):
        header = ["case", "dtype", "thr", "bn_cy layer us", "keras layer us", "torch nn.BatchNorm us"]
        rows = []
        for (case, dtype, threads), t in self.layer_times.items():
            rows.append([case, dtype, threads] + [
                "-" if t.get(p) is None else "%.1f" % (t[p] * 1e6) for p in ("bn_cy", "keras", "torch")
            ])
        return markdown_table(header, rows)

    def memory_table(self):
        header = ["case", "dtype", "thr", "call", "extra KiB", "channels", "extra B/(channel*thread)"]
        rows = []
        for case, dtype, threads, name, extra in self.memory:
            rows.append([case.name, dtype, threads, name, "%.1f" % (extra / 1024), case.channels,
                         "%.1f" % (extra / (case.channels * threads))])
        return markdown_table(header, rows)

    def targets(self):
        """Issue 4's targets, checked against this run's float32 rows at the most threads."""
        threads = max(self.args.threads)
        dtype = "float32"
        if dtype not in self.args.dtypes:
            return ["(the targets are stated for float32, which this run did not measure)"]
        lines = []

        def rows(mode):
            for case in self.args.cases:
                row = self.times.get((mode, case.name, dtype, threads))
                if row is not None:
                    yield case, row

        def verdict(ok):
            return "PASS" if ok else "MISS"

        def listing(items, fmt):
            return ", ".join(("%s " + fmt) % (c.name, v) for c, v in items)

        for mode, limit in (("train", 1.15), ("infer", 1.05), ("backward", 1.2)):
            items = [(c, r["bn_cy_out"] / r["floor"]) for c, r in rows(mode)
                     if math.prod(c.shape) * 4 >= 1e6 and r.get("bn_cy_out") and r["floor"]]
            if items:
                case, worst = max(items, key=lambda it: it[1])
                lines.append("- %s with out= <= %.2fx the floor on cases >= 1 MB: %s (worst %.2fx on %s; %s)"
                             % (mode, limit, verdict(worst <= limit), worst, case.name,
                                listing(items, "%.2f")))
        for mode in MODES:
            items = [(c, r["bn_cy"] / r["torch"]) for c, r in rows(mode) if r.get("bn_cy") and r.get("torch")]
            if not items:
                continue
            case, worst = max(items, key=lambda it: it[1])
            line = ("- %s, allocating call faster than torch on every case: %s (worst bn_cy/torch %.2f on %s)"
                    % (mode, verdict(worst < 1), worst, case.name))
            if mode == "train":
                median = statistics.median(v for _, v in items)
                line += "; median bn_cy/torch %.2f, target <= 0.5: %s" % (median, verdict(median <= 0.5))
            lines.append(line)
        tiny = self.times.get(("train", "tiny", dtype, threads), {}).get("bn_cy")
        if tiny:
            lines.append("- functional call (batch_norm_train) on (32, 64) <= 3 us: %s (%.2f us)"
                         % (verdict(tiny <= 3e-6), tiny * 1e6))
        layer = self.layer_times.get(("tiny", dtype, threads), {}).get("bn_cy")
        if layer:
            lines.append("- layer call on (32, 64) <= 8 us: %s (%.2f us)"
                         % (verdict(layer <= 8e-6), layer * 1e6))
        if min(self.args.threads) == 1 and threads > 1:
            cache = last_level_cache_bytes()
            items = []
            for case in self.args.cases:
                working_set = 2 * math.prod(case.shape) * 4  # x and y
                speed = self.speedup("train", case.name, dtype, threads)
                if 256 * 1024 <= working_set <= cache // 2 and speed is not None:
                    items.append((case, speed))
            if items:
                case, worst = min(items, key=lambda it: it[1])
                line = ("- thread scaling (training forward with out=, %d threads vs 1) >= 1.8x "
                        "where x and y fit in half the last-level cache (%d MiB): %s "
                        "(worst %.2fx on %s; %s)"
                        % (threads, cache >> 20, verdict(worst >= 1.8), worst, case.name,
                           listing(items, "%.2fx")))
                # context, not part of the verdict: how the floor's own passes scaled in this run
                floors = []
                for c, _ in items:
                    a = self.times.get(("train", c.name, dtype, min(self.args.threads)), {})
                    b = self.times.get(("train", c.name, dtype, threads), {})
                    if a.get("floor") and b.get("floor"):
                        floors.append((c, a["floor"] / b["floor"]))
                if floors:
                    line += "; the floor's passes themselves: %s" % listing(floors, "%.2fx")
                lines.append(line)
        if self.memory:
            def excess(m):
                case, _, nthreads, _, extra = m
                return extra - (256 * case.channels * nthreads + 64 * 1024)

            worst = max(self.memory, key=excess)
            lines.append("- memory beyond the output <= O(channels x threads), taken as 256 B per "
                         "channel and thread + 64 KiB: %s (closest: %.1f KiB extra for %s on %s)"
                         % (verdict(excess(worst) <= 0), worst[4] / 1024, worst[3], worst[0].name))
        return lines

    def placement_line(self):
        o = self.offsets
        kind = ("cache-line aligned, `--aligned`" if o == ALIGNED_PAGE_OFFSETS else
                "16 bytes past a cache line, as numpy's 16-byte alignment often gives")
        return ("- x, dy and the preallocated output start %d, %d and %d bytes into a 4 KiB page "
                "(%s): no two of them alias in the low 12 address bits, and the run does not "
                "depend on where the allocator happened to put them.\n"
                % (o["x"], o["dy"], o["out"], kind))

    def render(self):
        out = []
        out.append("# bn_cy benchmarks\n")
        out.append(
            "Made by `%s` on %s. Every number below was measured in that one run: per peer, the "
            "best of %d or more measurements (at least 3 where its %.1f s budget ran out), short "
            "calls looped to about 0.2 ms per measurement, `time.perf_counter`. The peers and "
            "floor passes of one case and thread count are measured in turn, round by round, "
            "each measurement right after an untimed call of its own; each of them is also "
            "measured back to back with itself, and the faster of both counts."
            % (self.command, datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), self.args.repeat,
               self.args.budget)
        )
        out.append("")
        out.append("## Machine\n")
        out.append(markdown_table(["", ""], machine_lines()))
        out.append("")
        out.append("## How to read the tables\n")
        out.append(
            "Times in milliseconds (lower is better).\n\n"
            "- `bn_cy` is the allocating call; `bn_cy out=` writes into a preallocated array.\n"
            "- `numpy` is a NumPy two-pass reference (one thread whatever thr).\n"
            "- `torch` is PyTorch CPU given the same memory (channel moved to dim 1 by a permuted "
            "view), with `torch.set_num_threads(thr)`.\n"
            "- `keras` is `keras.layers.BatchNormalization` on the torch backend; Keras has no "
            "standalone backward, so none is timed.\n"
            "- `floor` is the streaming floor with at most thr threads: training forward = read x + "
            "copy x->y; inference = copy; backward = read x + read dy + (x, dy) -> dx; moments = read "
            "x. Each pass is the fastest of PyTorch's multithreaded `sum`/`copy_`/`add(out=)` and "
            "NumPy over a pool of Python threads, at any thread count up to thr (the passes table "
            "says which), timed round-robin with the peers or back to back, whichever was "
            "faster.\n"
            + self.placement_line()
            + "- `bn_cy/torch` compares the allocating calls; `out=/floor` uses the out= call; "
            "`speedup` is bn_cy's time (out= where it exists) at 1 thread over thr threads, "
            "both timed round-robin in one set of their own."
        )
        out.append("")
        for mode in self.args.modes:
            out.append("## %s\n" % MODE_TITLES[mode])
            out.append(self.mode_table(mode))
            out.append("")
        if self.layer_times:
            out.append("## Layer call, training=True (microseconds)\n")
            out.append(self.layer_table())
            out.append("")
        out.append("## Streaming passes behind the floors\n")
        out.append(self.passes_table())
        out.append("")
        if self.memory:
            out.append("## Extra memory of a call, as tracemalloc sees it\n")
            out.append("Peak traced allocation during one call minus its outputs. tracemalloc sees NumPy's "
                       "allocations, not memory the C kernels take with malloc.\n")
            out.append(self.memory_table())
            out.append("")
        out.append("## Targets of issue 4 (float32, %d threads)\n" % max(self.args.threads))
        out.extend(self.targets())
        out.append("")
        return "\n".join(out)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time bn_cy against NumPy, PyTorch, Keras and the streaming floor; print one table "
        "per mode and write BENCHMARKS.md.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="the quick cases only, float32 unless --dtype is given, fewer repeats")
    parser.add_argument("--dtype", dest="dtypes", nargs="+", choices=DTYPES, help="dtypes (default: both)")
    parser.add_argument("--threads", nargs="+", type=int, help="thread counts (default: 1 2)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES_BY_NAME), help="cases (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="modes (default: all)")
    parser.add_argument("--no-large", action="store_true", help="skip the large NHWC case")
    parser.add_argument("--no-torch", action="store_true",
                        help="no PyTorch or Keras peers (floor from NumPy threads)")
    parser.add_argument("--no-keras", action="store_true", help="no Keras peer")
    parser.add_argument("--no-layer", dest="layer", action="store_false", help="skip the layer-call table")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the tracemalloc table")
    parser.add_argument("--repeat", type=int,
                        help="measurements per peer, best kept (default 15, quick 5; fewer, but at "
                        "least 3, where --budget runs out)")
    parser.add_argument("--budget", type=float,
                        help="seconds per peer before stopping early (default 1.5, quick 0.3)")
    parser.add_argument("--output", default=None,
                        help="markdown file to write (default: BENCHMARKS.md at the repository "
                        "root; '-' for none)")
    parser.add_argument("--aligned", action="store_true",
                        help="x, dy and the output cache-line aligned (default: 16 bytes past a "
                             "line, as numpy often allocates)")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.quick else list(DTYPES)
    if args.threads is None:
        args.threads = list(THREADS)
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be positive")
    args.threads = sorted(set(args.threads))
    if args.cases:
        args.cases = [CASES_BY_NAME[n] for n in args.cases]
    else:
        args.cases = [c for c in CASES if (c.quick or not args.quick)
                      and not (c.large and (args.no_large or args.quick))]
    args.modes = list(args.modes or MODES)
    if args.repeat is None:
        args.repeat = 5 if args.quick else 15
    if args.budget is None:
        args.budget = 0.3 if args.quick else 1.5
    if args.output is None:
        args.output = os.path.join(REPO, "BENCHMARKS.md")
    return args


def main(argv=None, prog=None, command=None):
    """Run the report; `command` is how the run is described in BENCHMARKS.md."""
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv, prog=prog)
    if command is None:
        command = os.environ.get("BN_CY_BENCH_COMMAND")
        command = command or " ".join(["python benchmarks/report.py"] + list(argv))
    if not args.no_torch:
        torch_module()  # import before timing anything, so its start-up cost stays out
        if not args.no_keras:
            keras_module()
    try:
        load, cores = os.getloadavg()[0], core_count()
        if load > 0.5 * cores:
            print("warning: load average %.2f on %d cores: other processes compete for the cores and "
                  "multi-threaded timings will be distorted" % (load, cores), file=sys.stderr)
    except (AttributeError, OSError):
        pass
    report = Report(args, command)
    report.run()
    text = report.render()
    print(text)
    if args.output and args.output != "-":
        with open(args.output, "w") as f:
            f.write(text)
        print("\nwrote %s" % args.output, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
