"""Synchronized batch statistics across processes over MPI (mpi4py).

Each rank reduces its own data to per-channel partial states -- total weight, mean and sum of
squared deviations (Chan et al.) -- and one ``allgather`` brings every rank's partials to every
rank, where they are merged in rank order. So every rank computes bitwise the same global mean and
variance, equal (to float64 rounding) to what one process would get on the concatenated batch:
uneven batches, empty batches and masks are weighted by their true weight.

The backward pass gathers the per-channel sums sum(dy) and sum(dy * (x - mean)) the same way.

mpi4py is imported only when synchronization is used (``pip install 'bn_cy[mpi]'``).
"""

import numpy as np

__all__ = ["resolve_comm", "merge_partials", "sum_grad_sums"]


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "synchronized batch normalization needs mpi4py and an MPI library: "
            "pip install 'bn_cy[mpi]'"
        ) from exc
    return MPI


def resolve_comm(comm):
    """The communicator to use: `comm`, or ``MPI.COMM_WORLD`` when it is None."""
    if comm is None:
        return _mpi().COMM_WORLD
    if not (hasattr(comm, "allgather") and hasattr(comm, "Get_rank")):
        raise TypeError("comm must be an mpi4py communicator, got %s" % type(comm).__name__)
    return comm


def _gather_checked(comm, what, channels, payload):
    """Allgather `payload` from every rank (one collective). Every rank raises the same error
    when the ranks disagree on the number of channels, so none is left waiting."""
    parts = comm.allgather((int(channels), payload))
    counts = [p[0] for p in parts]
    if any(c != counts[0] for c in counts):
        raise ValueError(
            "synchronized %s: the ranks have different numbers of channels %s (rank order)"
            % (what, counts)
        )
    return [p[1] for p in parts]


def merge_partials(comm, wsum, mean, m2):
    """Merge every rank's per-channel (weight, mean, M2) in rank order; returns global ones."""
    parts = _gather_checked(comm, "statistics", len(mean), (wsum, mean, m2))
    w_tot = np.zeros(len(mean))
    m_tot = np.zeros(len(mean))
    m2_tot = np.zeros(len(mean))
    for wb, mb, m2b in parts:
        wb, mb, m2b = (np.asarray(a, dtype=np.float64) for a in (wb, mb, m2b))
        first = w_tot == 0.0
        skip = wb == 0.0
        w_new = w_tot + wb
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(skip, 0.0, wb / np.where(w_new == 0.0, 1.0, w_new))
        delta = mb - m_tot
        merged_m = m_tot + delta * frac
        merged_m2 = m2_tot + m2b + delta * delta * (w_tot * frac)
        m_tot = np.where(skip, m_tot, np.where(first, mb, merged_m))
        m2_tot = np.where(skip, m2_tot, np.where(first, m2b, merged_m2))
        w_tot = w_new
    return w_tot, m_tot, m2_tot


def sum_grad_sums(comm, wtotal, sdy, sdyx):
    """Sum every rank's total weight and per-channel backward sums, in rank order."""
    parts = _gather_checked(comm, "backward", len(sdy), (float(wtotal), sdy, sdyx))
    w = 0.0
    a = np.zeros(len(sdy))
    b = np.zeros(len(sdy))
    for wr, ar, br in parts:
        w += wr
        a = a + np.asarray(ar, dtype=np.float64)
        b = b + np.asarray(br, dtype=np.float64)
    return w, a, b
