"""Training forward: batch_norm_train (allocating and out=) against its peers and the floor (read x + copy)."""

import pytest

import report as bench


@pytest.mark.parametrize("threads", bench.THREADS, ids=lambda t: "%dthr" % t)
@pytest.mark.parametrize("peer", bench.PEERS["train"] + bench.FLOOR_PEERS)
def test_train(run_peer, inputs, peer, threads):
    run_peer("train", peer, inputs, threads)
