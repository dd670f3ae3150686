"""``python -m bn_cy [info|compare|bench|demo]``

* no command: the build facts, then a short timing comparison with NumPy (``info`` + ``compare``);
* ``info``: :func:`bn_cy.build_info` (compiler, OpenMP, SIMD level chosen at run time, threads);
* ``compare``: :func:`bn_cy.batch_norm_train` against a NumPy two-pass reference on a few shapes --
  best-of-N times, their ratio, and each one's max abs error against float64 math on the same data;
* ``bench``: the full benchmark report (``benchmarks/report.py`` of a source checkout; extra
  arguments go to it, e.g. ``python -m bn_cy bench --quick``);
* ``demo``: fits gamma and beta by gradient descent with the functional API, then shows a layer call.

Only bn_cy's public API is used here.
"""

import argparse
import gc
import importlib.util
import os
import sys
import time

import numpy as np

import bn_cy

EPSILON = 1e-3

#: (label, shape, feature axis) of the short comparison
COMPARE_SHAPES = (
    ("dense", (256, 1024), -1),
    ("NHWC", (16, 56, 56, 64), -1),
    ("NCHW", (16, 64, 56, 56), 1),
    ("(N, T, C)", (32, 128, 256), -1),
    ("tiny", (32, 64), -1),
)


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def cmd_info(args=None):
    info = bn_cy.build_info()
    print("bn_cy %s  (%s)" % (info.get("version", bn_cy.__version__), os.path.dirname(bn_cy.__file__)))
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        print("  %-*s  %s" % (width, key, value))
    if not info.get("openmp"):
        print("  (built without OpenMP: every call runs on one thread)")
    print("  python%s  %s" % (" " * max(0, width - 6), sys.version.split()[0]))
    return 0


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def numpy_batch_norm_train(x, gamma, beta, axis, epsilon=EPSILON):
    """The NumPy two-pass reference: mean, then the variance of the centred data."""
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    bshape = tuple(x.shape[i] if i == axis else 1 for i in range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    var = np.mean(np.square(xc), axis=axes, keepdims=True)
    y = xc * (gamma.reshape(bshape) / np.sqrt(var + epsilon)) + beta.reshape(bshape)
    return y, mean.reshape(-1), var.reshape(-1)


def best_of(fn, repeat, budget=1.0):
    """Best time of one call (s): a warm-up, then at least `repeat` measurements (3 once `budget`
    seconds are spent), each looped to ~0.2 ms; short calls get up to 10*repeat measurements
    while half the budget lasts (the minimum of many samples resists a busy machine)."""
    fn()
    t0 = time.perf_counter()
    fn()
    number = max(1, int(2e-4 / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    n = 0
    start = time.perf_counter()
    gc.disable()
    try:
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            t1 = time.perf_counter()
            best = min(best, (t1 - t0) / number)
            n += 1
            if n >= min(3, repeat) and t1 - start > budget:
                break
            if n >= repeat and (t1 - start > budget / 2 or n >= 10 * repeat):
                break
    finally:
        gc.enable()
    return best


def _fmt_ms(seconds):
    ms = seconds * 1e3
    return "%.3f" % ms if ms < 10 else "%.1f" % ms


def busy_warning():
    """A line warning that other processes load the cores (multi-threaded timings suffer), or None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return ("note: load average %.2f on %d cores -- other processes compete for the cores, so "
                "multi-threaded timings are distorted; time on an idle machine" % (load, cores))
    return None


def cmd_compare(args):
    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    threads = bn_cy.get_num_threads() if args.threads is None else args.threads
    print()
    print("batch_norm_train vs a NumPy two-pass reference: %s, x = %g + N(0, 1), epsilon %g, "
          "bn_cy on %d thread(s), best of %d+ runs" % (dtype.name, args.offset, EPSILON, threads, args.repeat))
    print("max|err| = max abs error of y against float64 math on the same %s values" % dtype.name)
    header = ("shape", "axis", "bn_cy ms", "numpy ms", "numpy/bn_cy", "bn_cy max|err|", "numpy max|err|")
    rows = []
    for label, shape, axis in COMPARE_SHAPES:
        x = (rng.standard_normal(shape) + args.offset).astype(dtype)
        c = shape[axis]
        gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
        beta = rng.standard_normal(c).astype(dtype)
        y, _, _ = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=EPSILON, n_threads=threads)
        y_np, _, _ = numpy_batch_norm_train(x, gamma, beta, axis)
        y64, _, _ = numpy_batch_norm_train(x.astype(np.float64), gamma.astype(np.float64),
                                           beta.astype(np.float64), axis)
        err = float(np.max(np.abs(y.astype(np.float64) - y64)))
        err_np = float(np.max(np.abs(y_np.astype(np.float64) - y64)))
        del y, y_np, y64
        t_bn = best_of(lambda: bn_cy.batch_norm_train(x, gamma, beta, axis=axis, epsilon=EPSILON,
                                                      n_threads=threads), args.repeat)
        t_np = best_of(lambda: numpy_batch_norm_train(x, gamma, beta, axis), args.repeat)
        rows.append(("%s %s" % (label, "x".join(map(str, shape))), str(axis), _fmt_ms(t_bn), _fmt_ms(t_np),
                     "%.1fx" % (t_np / t_bn), "%.2g" % err, "%.2g" % err_np))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for n, row in enumerate([header] + rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
    warning = busy_warning()
    if warning:
        print(warning)
    print("(full report with PyTorch, Keras and the memory-bandwidth floor: python -m bn_cy bench)")
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def find_report():
    """benchmarks/report.py of a source checkout: $BN_CY_BENCHMARKS, beside the package (an
    in-place or editable build), or under the current directory."""
    candidates = []
    if os.environ.get("BN_CY_BENCHMARKS"):
        candidates.append(os.environ["BN_CY_BENCHMARKS"])
    package_dir = os.path.dirname(os.path.abspath(bn_cy.__file__))
    candidates.append(os.path.join(os.path.dirname(package_dir), "benchmarks"))
    candidates.append(os.path.join(os.getcwd(), "benchmarks"))
    for folder in candidates:
        path = folder if folder.endswith(".py") else os.path.join(folder, "report.py")
        if os.path.isfile(path):
            return path
    return None


def cmd_bench(args, extra):
    path = find_report()
    if path is None:
        print("python -m bn_cy bench needs benchmarks/report.py from bn_cy's source tree: run it from "
              "the repository root (or set BN_CY_BENCHMARKS=<repo>/benchmarks). A quick comparison "
              "with NumPy needs no checkout: python -m bn_cy compare", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("bn_cy_benchmarks_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(extra, prog="python -m bn_cy bench",
                       command=" ".join(["python -m bn_cy bench"] + list(extra)))


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def cmd_demo(args):
    rng = np.random.default_rng(1)
    n, c = 512, 8
    x = (rng.standard_normal((n, c)) * rng.uniform(1, 10, c) + rng.uniform(-50, 50, c)).astype(np.float32)
    target_scale = np.linspace(0.5, 2.0, c).astype(np.float32)
    target_shift = np.linspace(-1.0, 1.0, c).astype(np.float32)
    mean, var = bn_cy.moments(x, axis=-1)
    target = (x - mean) / np.sqrt(var + EPSILON) * target_scale + target_shift

    print("Functional API: fit gamma and beta of batch_norm_train to a target by gradient descent")
    print("(x: %d rows x %d channels, channel means in [-50, 50], stds in [1, 10])" % (n, c))
    gamma = np.ones(c, np.float32)
    beta = np.zeros(c, np.float32)
    lr = 0.5
    for step in range(41):
        y, mean, var = bn_cy.batch_norm_train(x, gamma, beta, axis=-1, epsilon=EPSILON)
        diff = y - target
        loss = float(np.mean(diff * diff))
        dy = 2.0 * diff / diff.size
        dx, dgamma, dbeta = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, axis=-1, epsilon=EPSILON)
        if step % 10 == 0:
            print("  step %2d  loss %.3e  |dx| %.2e" % (step, loss, float(np.abs(dx).max())))
        gamma -= lr * c * dgamma
        beta -= lr * c * dbeta
    print("  learned gamma %s" % np.array2string(gamma, precision=3))
    print("  target  gamma %s" % np.array2string(target_scale, precision=3))

    layer_cls = getattr(bn_cy, "BatchNormalization", None)
    if layer_cls is None:
        print("\n(bn_cy.BatchNormalization is not part of this build)")
        return 0
    print("\nLayer: bn_cy.BatchNormalization(axis=-1, momentum=0.9), Keras 3 semantics")
    layer = layer_cls(axis=-1, momentum=0.9)
    steps = 30
    for _ in range(steps):
        y = layer(x, training=True)
    dx = layer.backward(np.ones_like(y) / y.size)
    weights = dict(zip(["gamma", "beta", "moving_mean", "moving_variance"], layer.get_weights()))
    print("  training=True: output per-channel |mean| <= %.1e, std %.4f"
          % (float(np.abs(y.mean(axis=0)).max()), float(y.std(axis=0).mean())))
    print("  moving_mean after %d calls: %s  (batch mean %s; 1 - 0.9**%d = %.0f%% of the way)"
          % (steps, np.array2string(weights["moving_mean"][:3], precision=2),
             np.array2string(x.mean(axis=0)[:3], precision=2), steps, 100 * (1 - 0.9 ** steps)))
    y_inf = layer(x, training=False)
    print("  training=False uses the moving statistics: max|y_inf - y_train| = %.2e"
          % float(np.abs(y_inf - y).max()))
    names = getattr(layer, "trainable_weight_names", ["gamma", "beta"])
    print("  backward(dy): dx %s, layer.gradients for %s" % (dx.shape, ", ".join(names)))
    config = layer.get_config()
    print("  get_config() keys: %s" % ", ".join(config))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bn.npz")
        layer.save(path)
        restored = layer_cls.load(path)
    same = np.array_equal(restored(x, training=False), y_inf)
    print("  save/load round trip: same inference output: %s" % same)
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bn_cy",
        description="bn_cy: build facts, a quick comparison with NumPy, benchmarks, a demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{info,compare,bench,demo}")
    sub.add_parser("info", help="print build_info()")
    compare = sub.add_parser("compare", help="time batch_norm_train against a NumPy two-pass reference")
    sub.add_parser("bench", help="the benchmark report (benchmarks/report.py; arguments pass through)",
                   add_help=False)
    sub.add_parser("demo", help="fit gamma/beta with the functional API; a layer call")
    for p in (parser, compare):
        p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="compare: dtype")
        p.add_argument("--threads", type=int, default=None, help="compare: n_threads (default: bn_cy's)")
        p.add_argument("--repeat", type=int, default=7, help="compare: best of this many (default 7)")
        p.add_argument("--offset", type=float, default=0.0, help="compare: mean of x (default 0)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(None, argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "compare":
        return cmd_compare(args)
    if args.command == "demo":
        return cmd_demo(args)
    status = cmd_info(args)
    return status or cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
