"""Backward in training mode: batch_norm_backward against its peers and the floor (read x + read dy + add)."""

import pytest

import report as bench


@pytest.mark.parametrize("threads", bench.THREADS, ids=lambda t: "%dthr" % t)
@pytest.mark.parametrize("peer", bench.PEERS["backward"] + bench.FLOOR_PEERS)
def test_backward(run_peer, inputs, peer, threads):
    run_peer("backward", peer, inputs, threads)
