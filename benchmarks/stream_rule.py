#!/usr/bin/env python3
"""Streaming stores on or off: the out= calls timed in child processes that alternate between
the default rule (bncy_stream_pass), every output streamed and no output streamed.

    python benchmarks/stream_rule.py [--rounds 5] [--threads 1 2] [--cases ntc nct] [--modes ...]

The cases are report.py's. The kernels read ``BN_CY_STREAM_MIN_BYTES`` once per process, so each setting runs in its own
process: ``0`` streams every output, ``1e18`` none, unset is the default rule. Each child times
every (case, mode, thread count) as the report's back-to-back measurement does (best of a loop
of the call with itself, inputs and output as its own loop leaves them in the caches); the
settings take turns, round after round, so a slow spell of a shared machine falls on all of
them. Printed: each setting's median over the rounds, in ms, and in how many rounds streaming
was faster than not streaming.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from report import CASES_BY_NAME

SETTINGS = {"default": None, "stream": "0", "no-stream": "1e18"}
MODES = ("infer", "train", "backward")

CHILD = r"""
import json, sys, time
import numpy as np
import bn_cy

cases, modes, threads, repeat = json.loads(sys.argv[1])
out = {}
rng = np.random.default_rng(0)
for name, (shape, axis) in cases.items():
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y = np.zeros_like(x)
    mean, var = bn_cy.moments(x, axis=axis)
    calls = {
        "infer": lambda: bn_cy.batch_norm(x, mean, var, axis=axis, out=y),
        "train": lambda: bn_cy.batch_norm_train(x, axis=axis, out=y),
        "backward": lambda: bn_cy.batch_norm_backward(dy, x, mean, var, axis=axis, out=y),
    }
    for nt in threads:
        bn_cy.set_num_threads(nt)
        for mode in modes:
            f = calls[mode]
            f()
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t)
            out["%s %s %d" % (name, mode, nt)] = best
print(json.dumps(out))
"""


def run_child(setting, cases, modes, threads, repeat):
    env = dict(os.environ)
    env.pop("BN_CY_STREAM_MIN_BYTES", None)
    if SETTINGS[setting] is not None:
        env["BN_CY_STREAM_MIN_BYTES"] = SETTINGS[setting]
    shapes = {c: (CASES_BY_NAME[c].shape, CASES_BY_NAME[c].axis) for c in cases}
    arg = json.dumps([shapes, modes, threads, repeat])
    res = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise SystemExit("child (%s) failed:\n%s" % (setting, res.stderr[-2000:]))
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="turns of each setting (default 5)")
    ap.add_argument("--repeat", type=int, default=40, help="calls per measurement (best of)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=["ntc", "nct"], choices=sorted(CASES_BY_NAME))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1 or min(args.threads) < 1:
        ap.error("--rounds, --repeat and --threads must be >= 1")
    runs = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for s in SETTINGS:
            runs[s].append(run_child(s, args.cases, args.modes, args.threads, args.repeat))
        print("round %d/%d done" % (r + 1, args.rounds), file=sys.stderr, flush=True)
    print("%-22s %10s %10s %10s   stream faster" % ("case mode threads", *SETTINGS))
    for key in runs["default"][0]:
        med = {s: statistics.median(run[key] for run in runs[s]) * 1e3 for s in SETTINGS}
        wins = sum(runs["stream"][i][key] < runs["no-stream"][i][key] for i in range(args.rounds))
        print("%-22s %10.3f %10.3f %10.3f   %d/%d" % (key, med["default"], med["stream"],
                                                     med["no-stream"], wins, args.rounds))


if __name__ == "__main__":
    main()
