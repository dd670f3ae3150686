"""Added time of synchronized statistics per call, over MPI.

    mpiexec -n 2 python benchmarks/bench_sync.py [--repeat 30]

Every rank times batch_norm_train (and the training backward) on its own batch, locally and with
synchronized=True, best of N after a warm-up; rank 0 prints the per-call times and the difference.
On one machine the ranks share its cores, so each rank uses one thread.
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

import bn_cy

CASES = [("small (32, 64)", (32, 64), -1), ("large NHWC (8, 56, 56, 64)", (8, 56, 56, 64), -1)]


def best_of(fn, repeat, comm):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # a call is as slow as its slowest rank
    return comm.allreduce(min(times), op=MPI.MAX)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for name, shape, axis in CASES:
        x = np.random.default_rng(rank).standard_normal(shape, dtype=np.float32)
        dy = np.ones_like(x)
        y = np.empty_like(x)
        kw = dict(axis=axis, out=y, n_threads=1)
        _, m, v = bn_cy.batch_norm_train(x, **kw)
        local_f = best_of(lambda: bn_cy.batch_norm_train(x, **kw), args.repeat, comm)
        sync_f = best_of(lambda: bn_cy.batch_norm_train(x, synchronized=True, **kw), args.repeat, comm)
        local_b = best_of(lambda: bn_cy.batch_norm_backward(dy, x, m, v, axis=axis, n_threads=1),
                          args.repeat, comm)
        sync_b = best_of(lambda: bn_cy.batch_norm_backward(dy, x, m, v, axis=axis, n_threads=1,
                                                           synchronized=True), args.repeat, comm)
        rows.append((name, local_f, sync_f, local_b, sync_b))
    if rank == 0:
        print("synchronized vs local, %d ranks, float32, 1 thread per rank, best of %d (ms)"
              % (size, args.repeat))
        print("| case | forward local | forward sync | added | backward local | backward sync | added |")
        print("|---|---|---|---|---|---|---|")
        for name, lf, sf, lb, sb in rows:
            print("| %s | %.3f | %.3f | %+.3f | %.3f | %.3f | %+.3f |"
                  % (name, lf * 1e3, sf * 1e3, (sf - lf) * 1e3, lb * 1e3, sb * 1e3, (sb - lb) * 1e3))


if __name__ == "__main__":
    main()
