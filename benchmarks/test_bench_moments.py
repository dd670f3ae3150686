"""moments alone against its peers and the floor (one read pass)."""

import pytest

import report as bench


@pytest.mark.parametrize("threads", bench.THREADS, ids=lambda t: "%dthr" % t)
@pytest.mark.parametrize("peer", bench.PEERS["moments"] + bench.FLOOR_PEERS)
def test_moments(run_peer, inputs, peer, threads):
    run_peer("moments", peer, inputs, threads)
