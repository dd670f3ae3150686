"""Checks of synchronized batch normalization, run on every rank under mpiexec.

Every rank builds the same global batch from a fixed seed, keeps its own (uneven, possibly
empty) slice of it, and compares the synchronized results with one process's results on the
whole batch. Any failure raises on the rank that sees it; tests/test_distributed.py runs this
script with mpiexec -n 2 and -n 3 and a timeout.
"""

import sys

import numpy as np
from mpi4py import MPI

import bn_cy

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def split_rows(n, size):
    """Uneven row counts; the last rank gets none when there are several ranks."""
    if size == 1:
        return [n]
    weights = np.arange(1, size + 1, dtype=float)[::-1]
    weights[-1] = 0.0
    counts = np.floor(weights / weights.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    return list(counts)


def local_part(a, counts, axis=0):
    start = int(sum(counts[:rank]))
    return np.take(a, np.arange(start, start + counts[rank]), axis=axis)


def same_on_every_rank(a, what, c=comm):
    first = c.bcast(np.asarray(a) if c.Get_rank() == 0 else None, root=0)
    if not np.array_equal(first, np.asarray(a), equal_nan=True):
        raise AssertionError("%s differs between ranks" % what)


def close(got, expected, what, rtol=1e-12, atol=1e-12):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


def check_forward_backward(dtype, shape, axis, masked):
    rng = np.random.default_rng(1234)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ax = axis % len(shape)
    c = shape[ax]
    gamma = rng.standard_normal(c)
    beta = rng.standard_normal(c)
    mask = None
    if masked:
        mask = rng.random(shape[:ax] + shape[ax + 1:]) > 0.3
    counts = split_rows(shape[0], size)
    xl, dyl = local_part(x, counts), local_part(dy, counts)
    ml = None if mask is None else local_part(mask, counts)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)

    mean, var = bn_cy.moments(xl, axis, mask=ml, synchronized=True)
    rmean, rvar = bn_cy.moments(x, axis, mask=mask)
    close(mean, rmean, "moments mean", **tol)
    close(var, rvar, "moments variance", **tol)
    same_on_every_rank(mean, "mean")
    same_on_every_rank(var, "variance")

    y, m, v = bn_cy.batch_norm_train(xl, gamma, beta, axis=axis, mask=ml, comm=comm)
    ry, rm, rv = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, mask=mask)
    close(y, local_part(ry, counts), "y", **tol)
    same_on_every_rank(m, "train mean")

    dx, dg, db = bn_cy.batch_norm_backward(dyl, xl, m, v, gamma, axis=axis, mask=ml, comm=comm)
    rdx, rdg, rdb = bn_cy.batch_norm_backward(dy, x, rm, rv, gamma, axis=axis, mask=mask)
    close(dx, local_part(rdx, counts), "dx", **tol)
    close(comm.allreduce(np.asarray(dg, np.float64)), rdg, "sum of dgamma", **tol)
    close(comm.allreduce(np.asarray(db, np.float64)), rdb, "sum of dbeta", **tol)


def check_subcommunicator():
    sub = comm.Split(color=rank % 2, key=rank)
    rng = np.random.default_rng(99 + rank % 2)
    x = rng.standard_normal((12 * sub.Get_size(), 5))
    xl = x[12 * sub.Get_rank():12 * (sub.Get_rank() + 1)]
    mean, var = bn_cy.moments(xl, comm=sub)
    rmean, rvar = bn_cy.moments(x)
    close(mean, rmean, "sub-communicator mean")
    close(var, rvar, "sub-communicator variance")
    same_on_every_rank(mean, "sub-communicator mean", c=sub)
    sub.Free()


def check_mismatched_channels():
    channels = 3 if rank == 0 else 4
    try:
        bn_cy.moments(np.ones((4, channels)), synchronized=True)
    except ValueError as exc:
        assert "different numbers of channels" in str(exc), exc
    else:
        if size > 1:
            raise AssertionError("mismatched channels were not detected on rank %d" % rank)


def main():
    for dtype in (np.float64, np.float32):
        for shape, axis in (((23, 6), -1), ((11, 4, 5, 3), 1), ((9, 3, 7), -1)):
            for masked in (False, True):
                check_forward_backward(dtype, shape, axis, masked)
    check_subcommunicator()
    check_mismatched_channels()
    comm.Barrier()
    if rank == 0:
        print("sync checks passed on %d ranks" % size)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        comm.Abort(1)
