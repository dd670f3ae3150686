"""Data-parallel batch normalization over MPI: every rank holds a shard of the global batch.

    mpiexec -n 3 python examples/data_parallel.py

Each rank normalizes its own shard with statistics computed over every shard
(synchronized=True), back-propagates, and checks the result against one process that sees the
whole batch.
"""

import numpy as np
from mpi4py import MPI

import bn_cy

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

# the same global batch on every rank (fixed seed); rank r keeps rows r, r + size, ...
rng = np.random.default_rng(0)
x_all = (5.0 + rng.standard_normal((96, 16, 8))).astype(np.float32)  # (N, T, C), features last
dy_all = rng.standard_normal(x_all.shape).astype(np.float32)
x, dy = x_all[rank::size], dy_all[rank::size]
gamma = np.linspace(0.5, 1.5, 8)

y, mean, var = bn_cy.batch_norm_train(x, gamma, synchronized=True)
dx, dgamma, dbeta = bn_cy.batch_norm_backward(dy, x, mean, var, gamma, synchronized=True)
dgamma = comm.allreduce(dgamma)  # parameter gradients: each rank holds its share

# one process on the whole batch
y_ref, mean_ref, var_ref = bn_cy.batch_norm_train(x_all, gamma)
dx_ref, dgamma_ref, _ = bn_cy.batch_norm_backward(dy_all, x_all, mean_ref, var_ref, gamma)
errors = [
    np.abs(mean - mean_ref).max(),
    np.abs(y - y_ref[rank::size]).max(),
    np.abs(dx - dx_ref[rank::size]).max(),
    np.abs(dgamma - dgamma_ref).max(),
]
worst = comm.allreduce(max(float(e) for e in errors), op=MPI.MAX)
if rank == 0:
    print("%d ranks, %d rows each: global mean[:3] = %s" % (size, len(x), np.round(mean[:3], 4)))
    print("largest difference from one process on the whole batch: %.2e" % worst)
