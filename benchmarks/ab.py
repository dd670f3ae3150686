#!/usr/bin/env python3
"""Two builds of bn_cy timed in one process, call for call: is B faster than A?

    python benchmarks/ab.py A B [--cases ntc dense] [--modes train infer backward moments]
                                [--threads 1 2] [--dtype float32] [--rounds 30]
    python benchmarks/ab.py A B --shape 1024x256 64x256x128:1     # shapes of one's own
    python benchmarks/ab.py A --control          # A against a copy of itself: the noise

A and B are each a git revision of this repository (exported and built in place under
``build/ab/<commit>``, once; ``BN_CY_SIMD`` and the other build variables apply) or a directory
holding a built ``bn_cy`` package: a source checkout after ``python setup.py build_ext
--inplace`` (``.`` for this one), or a ``site-packages``. Both packages are copied under names of
their own (``bn_cy_ab_a``, ``bn_cy_ab_b``; the package imports itself relatively) and imported
side by side, so one process times both on the same arrays (report.py's cases and inputs, at
its page offsets).

A round times A then B (B then A in every other round): one untimed call, then a loop of calls
lasting about ``--target-ms``. Each round gives the ratio B/A of its two times; printed per
(case, mode, dtype, thread count) are both medians over the rounds and the median ratio with its
quartiles. Below 1, B is faster. Where the machine is shared, its slow spells fall on both
sides of a round alike: on the 2-core VM where this was written, A's own median time for the
(64, 128, 256) training at 2 threads ranged from 0.56 to 1.12 ms across the runs recorded in
benchmarks/results/ab-tuning-amd-epyc-zen3-2026-12-07.md, while a build against a copy of itself
(``--control``, ntc and dense, every mode, 1 and 2 threads, 30 rounds) gave median ratios of
0.97 - 1.05 with quartiles within 0.89 - 1.12. Run ``--control`` next to a comparison to know how far from 1 a ratio must
be to mean something. The pairing takes out the drift, not a change in the relative cost of two
walks through memory when the machine's other tenants load the shared cache: a comparison of
such changes (schedules, block sizes) needs repeating at different times. The out= calls are
timed (moments have no out=).

``--shape`` times shapes of one's own, made like report.py's inputs: ``4096x256`` (channels
last) or ``64x256x128:1`` (the feature axis after the colon). Given alone, only they are timed;
with ``--cases``, the named cases first.
"""

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import bn_cy  # noqa: F401 -- report.py makes the inputs with it
except ImportError as exc:
    raise SystemExit(
        "benchmarks/ab.py needs an importable bn_cy for report.py's inputs (%s): build this "
        "checkout in place (python setup.py build_ext --inplace) and run with PYTHONPATH set to "
        "it, or install bn_cy" % exc
    ) from None

from report import CASES_BY_NAME, MODES, REPO, Case, Inputs, bn_cy_function  # noqa: E402

#: where revisions are exported and built (git-ignored)
BUILD_ROOT = os.path.join(REPO, "build", "ab")
NAMES = ("bn_cy_ab_a", "bn_cy_ab_b")


class Side:
    """One of the two builds: `label` as given, `package_dir` the built ``bn_cy`` directory."""

    def __init__(self, label, package_dir):
        self.label = label
        self.package_dir = package_dir


def _say(text):
    print(text, file=sys.stderr, flush=True)


def resolve(spec, build_root=BUILD_ROOT):
    """The Side that `spec` names: a directory holding a built bn_cy package, or a revision of
    this repository (built on first use). SystemExit with the reason where it is neither or its
    build fails."""
    if os.path.isdir(spec):
        package = os.path.join(os.path.abspath(spec), "bn_cy")
        if not os.path.isfile(os.path.join(package, "__init__.py")):
            raise SystemExit("%s: no bn_cy package in this directory" % spec)
        if not any(n.startswith("_kernels.") and n.endswith((".so", ".pyd"))
                   for n in os.listdir(package)):
            raise SystemExit("%s: bn_cy is not built there (no compiled _kernels module); run "
                             "`python setup.py build_ext --inplace` in it" % spec)
        return Side(spec, package)
    res = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--verify", "--quiet", spec + "^{commit}"],
        capture_output=True, text=True, check=False,
    )
    if res.returncode != 0:
        raise SystemExit("%s: neither a directory nor a revision of %s" % (spec, REPO))
    commit = res.stdout.strip()
    return Side("%s (%s)" % (spec, commit[:10]), build_revision(commit, build_root))


def build_revision(commit, build_root=BUILD_ROOT):
    """The bn_cy package of `commit`, exported into build_root/<commit> and built in place there
    (kept: a later run reuses it)."""
    tree = os.path.join(build_root, commit)
    done = os.path.join(tree, ".ab-built")
    if os.path.exists(done):
        return os.path.join(tree, "bn_cy")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", commit],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit("git archive %s failed: %s" % (commit, archive.stderr.decode()[-500:]))
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    _say("building %s in %s (a few minutes; the build is kept for later runs) ..."
         % (commit[:10], tree))
    start = time.perf_counter()
    log = os.path.join(tree, "ab-build.log")
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                             stdout=f, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit("building %s failed (log: %s):\n%s" % (commit[:10], log, tail))
    took = time.perf_counter() - start
    with open(done, "w") as f:
        f.write("%.0f s\n" % took)
    _say("built %s in %.0f s" % (commit[:10], took))
    return os.path.join(tree, "bn_cy")


def load(sides, workdir):
    """Each side's package copied into workdir under its name in NAMES and imported."""
    modules = []
    sys.path.insert(0, workdir)
    for side, name in zip(sides, NAMES):
        shutil.copytree(side.package_dir, os.path.join(workdir, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
        modules.append(importlib.import_module(name))
    return modules


def unload(workdir):
    """Forget the copies that load() imported from workdir (the modules and the path entry)."""
    for key in [k for k in sys.modules if k.split(".")[0] in NAMES]:
        del sys.modules[key]
    if workdir in sys.path:
        sys.path.remove(workdir)


def loop_length(fn, target):
    """Calls per measurement so that one lasts about `target` seconds (at least 1)."""
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    return max(1, int(round(target / once)))


def paired_rounds(fa, fb, rounds, target):
    """(times of A, times of B, ratios B/A), one of each per round, in seconds per call."""
    n = min(loop_length(fa, target), loop_length(fb, target))
    ta, tb = [], []
    for r in range(rounds):
        times = {}
        for key in (("a", "b") if r % 2 == 0 else ("b", "a")):
            fn = fa if key == "a" else fb
            fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times[key] = (time.perf_counter() - t) / n
        ta.append(times["a"])
        tb.append(times["b"])
    return ta, tb, [b / a for a, b in zip(ta, tb)]


def summary(ratios):
    """(median, first quartile, third quartile) of the ratios."""
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


def shape_case(text):
    """The Case that ``--shape`` names: sizes joined by ``x``, then ``:axis`` (default -1)."""
    dims, _, axis = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
        axis = int(axis) if axis else -1
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r: expected sizes joined by 'x' and an optional ':axis', e.g. 64x256x128:1"
            % text) from None
    if len(shape) < 2 or min(shape) < 1 or not -len(shape) <= axis < len(shape):
        raise argparse.ArgumentTypeError(
            "%r: two or more sizes >= 1, and an axis within them" % text)
    return Case(dims if axis == -1 else "%s:%d" % (dims, axis), shape, axis, "custom")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Below 1, B is faster; see the module docstring.")
    ap.add_argument("a", help="a revision of this repository, or a directory with a built bn_cy")
    ap.add_argument("b", nargs="?", help="the same for B (omit with --control)")
    ap.add_argument("--control", action="store_true",
                    help="time A against a copy of itself (the noise of the ratio)")
    ap.add_argument("--cases", nargs="*", default=None, choices=sorted(CASES_BY_NAME),
                    help="report.py's cases (default: ntc dense, or none where --shape is given)")
    ap.add_argument("--shape", nargs="+", type=shape_case, default=[], metavar="SHAPE[:AXIS]",
                    help="shapes of one's own, e.g. 1024x256 or 64x256x128:1")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=30, help="paired rounds (default 30)")
    ap.add_argument("--target-ms", type=float, default=1.0,
                    help="length of one measurement's loop of calls (default 1 ms)")
    args = ap.parse_args(argv)
    if args.control == (args.b is not None):
        ap.error("give B, or --control without B")
    if args.rounds < 1 or min(args.threads) < 1 or not args.target_ms > 0:
        ap.error("--rounds and --threads must be >= 1 and --target-ms > 0")
    if args.cases is None:
        args.cases = [] if args.shape else ["ntc", "dense"]
    args.cases = [CASES_BY_NAME[n] for n in args.cases] + args.shape
    if not args.cases:
        ap.error("no case to time: name --cases or give --shape")
    return args


def main(argv=None):
    args = parse_args(argv)
    a = resolve(args.a)
    b = a if args.control else resolve(args.b)
    workdir = tempfile.mkdtemp(prefix="bn_cy_ab_")
    try:
        lib_a, lib_b = load([a, b], workdir)
        print("A: %s\nB: %s%s" % (a.label, b.label, " (a copy of A)" if args.control else ""))
        print("out= calls, %d paired rounds of ~%g ms loops; ms per call: medians over the rounds"
              % (args.rounds, args.target_ms))
        print("%-14s %-9s %-8s %3s %10s %10s %8s %17s" % (
            "case", "mode", "dtype", "thr", "A ms", "B ms", "B/A", "quartiles of B/A"))
        for case in args.cases:
            for dtype in args.dtype:
                arrays = Inputs(case, dtype)
                for threads in args.threads:
                    for mode in args.modes:
                        fa = bn_cy_function(lib_a, mode, arrays, threads, out=True)
                        fb = bn_cy_function(lib_b, mode, arrays, threads, out=True)
                        ta, tb, ratios = paired_rounds(fa, fb, args.rounds, args.target_ms / 1e3)
                        med, q1, q3 = summary(ratios)
                        print("%-14s %-9s %-8s %3d %10.4f %10.4f %8.3f %8.3f - %6.3f" % (
                            case.name, mode, dtype, threads, statistics.median(ta) * 1e3,
                            statistics.median(tb) * 1e3, med, q1, q3), flush=True)
                arrays.close()
    finally:
        unload(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
