"""Checks of BatchNormalization(synchronized=True), run on every rank under mpiexec.

Every rank builds the same global batch from a fixed seed, keeps its own uneven slice (the
last rank an empty one when there are several), and trains a synchronized layer on it; one
process's unsynchronized layer on the whole batch is the reference: outputs, moving averages
after several steps (bitwise equal on every rank), backward dx and the sum over the ranks of
the gamma/beta gradients, masks (both mask rules), renorm, the unbiased estimator, a
sub-communicator. tests/test_distributed.py runs it with mpiexec -n 2 and -n 3.
"""

import sys

import numpy as np
from mpi4py import MPI

from bn_cy import BatchNormalization

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def split_rows(n, size):
    if size == 1:
        return [n]
    weights = np.arange(1, size + 1, dtype=float)[::-1]
    weights[-1] = 0.0
    counts = np.floor(weights / weights.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    return list(counts)


def local_part(a, counts, r, axis=0):
    start = int(sum(counts[:r]))
    return np.take(a, np.arange(start, start + counts[r]), axis=axis)


def same_on_every_rank(a, what, c=comm):
    first = c.bcast(np.asarray(a) if c.Get_rank() == 0 else None, root=0)
    if not np.array_equal(first, np.asarray(a), equal_nan=True):
        raise AssertionError("%s differs between ranks" % what)


def close(got, expected, what, dtype):
    tol = 1e-10 if dtype == "float64" else 3e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected, np.float64),
                               rtol=tol, atol=tol, err_msg=what)


def check(dtype, shape, axis, mask_kind=None, c=comm, steps=3, **kwargs):
    r, n_ranks = c.Get_rank(), c.Get_size()
    counts = split_rows(shape[0], n_ranks)
    ax = axis % len(shape)
    ref = BatchNormalization(axis=axis, momentum=0.8, dtype=dtype, **kwargs)
    syn = BatchNormalization(axis=axis, momentum=0.8, dtype=dtype, synchronized=True, **kwargs)
    if c is not comm:
        syn.communicator = c
    rng = np.random.default_rng(4321)
    for step in range(steps):
        x = (1.5 + 2.0 * rng.standard_normal(shape))
        dy = rng.standard_normal(shape)
        mask = None
        if mask_kind == "positions":
            mask = rng.random(shape[:ax] + shape[ax + 1:]) > 0.3
        elif mask_kind == "keras":  # Keras's rule: the input's shape without the last axis
            mask = rng.random(shape[:-1]) > 0.3
        xl, dyl = local_part(x, counts, r), local_part(dy, counts, r)
        ml = None if mask is None else local_part(mask, counts, r)
        y = syn(xl, training=True, mask=ml)
        ry = ref(x, training=True, mask=mask)
        what = "%s %s axis=%d mask=%s %s step %d" % (dtype, shape, axis, mask_kind, kwargs, step)
        close(y, local_part(ry, counts, r), "y " + what, dtype)
        dx = syn.backward(dyl)
        rdx = ref.backward(dy)
        close(dx, local_part(rdx, counts, r), "dx " + what, dtype)
        for g, rg, name in zip(syn.gradients, ref.gradients, ("gamma", "beta")):
            close(c.allreduce(np.asarray(g, np.float64)), rg, "sum of d%s %s" % (name, what),
                  dtype)
        for name in syn.weight_names:
            if name in ("gamma", "beta"):
                continue
            close(getattr(syn, name), getattr(ref, name), name + " " + what, dtype)
            same_on_every_rank(getattr(syn, name), name + " " + what, c)
    # inference mode is local: the (identical) moving statistics of every rank
    xi = local_part(rng.standard_normal(shape), counts, r)
    close(syn(xi), ref(xi), "inference", dtype)


def check_recompute(c=comm):
    rng = np.random.default_rng(7)
    data = rng.standard_normal((37, 4)) * 3 + 1
    counts = split_rows(37, c.Get_size())
    mine = local_part(data, counts, c.Get_rank())
    layer = BatchNormalization(synchronized=True, dtype="float64")
    layer.build((None, 4))
    layer.recompute_statistics([mine[:5], mine[5:]] if len(mine) else [mine])
    close(layer.moving_mean, data.mean(0), "recompute mean", "float64")
    close(layer.moving_variance, data.var(0), "recompute variance", "float64")
    same_on_every_rank(layer.moving_variance, "recompute variance", c)


def check_mismatched_channels():
    layer = BatchNormalization(synchronized=True)
    try:
        layer(np.ones((4, 3 if rank == 0 else 4)), training=True)
    except ValueError as exc:
        assert "different numbers of channels" in str(exc), exc
    else:
        if size > 1:
            raise AssertionError("mismatched channels were not detected on rank %d" % rank)


def main():
    for dtype in ("float64", "float32"):
        for shape, axis in (((23, 6), -1), ((11, 4, 5, 3), 1), ((9, 3, 7), -1)):
            for mask_kind in (None, "positions", "keras"):
                check(dtype, shape, axis, mask_kind)
    check("float64", (17, 3, 4), 1, None, renorm=True, renorm_clipping={"rmax": 2.0})
    check("float64", (17, 5), -1, "positions", moving_variance_estimator="unbiased")
    check("float64", (13, 3, 4), 1, "keras", moving_variance_estimator="unbiased")
    check("float32", (19, 4), -1, None, steps=2, center=False, scale=False)
    check_recompute()
    check_mismatched_channels()
    sub = comm.Split(color=rank % 2, key=rank)
    check("float64", (15, 4), -1, None, c=sub)
    check("float64", (15, 2, 4), 1, "keras", c=sub)
    check_recompute(sub)
    sub.Free()
    comm.Barrier()
    if rank == 0:
        print("layer sync checks passed on %d ranks" % size)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        comm.Abort(1)
