"""Inference: batch_norm with given statistics (allocating and out=) against its peers and the floor (copy)."""

import pytest

import report as bench


@pytest.mark.parametrize("threads", bench.THREADS, ids=lambda t: "%dthr" % t)
@pytest.mark.parametrize("peer", bench.PEERS["infer"] + bench.FLOOR_PEERS)
def test_infer(run_peer, inputs, peer, threads):
    run_peer("infer", peer, inputs, threads)
