"""Layer calls (training=True) on the small cases, where per-call overhead dominates:
bn_cy.BatchNormalization, keras.layers.BatchNormalization (torch backend), torch.nn.BatchNorm."""

import pytest

import report as bench

_SMALL = ("tiny", "dense")


@pytest.mark.parametrize("threads", bench.THREADS, ids=lambda t: "%dthr" % t)
@pytest.mark.parametrize("peer", ("bn_cy", "keras", "torch"))
def test_layer(benchmark, inputs, peer, threads):
    if inputs.case.name not in _SMALL:
        pytest.skip("layer calls are timed on the small cases only")
    fn = bench.layer_functions(inputs, threads).get(peer)
    if fn is None:
        pytest.skip("%s layer is not available" % peer)
    benchmark.group = bench.group_name("layer", inputs, threads)
    benchmark.extra_info.update(mode="layer", peer=peer, case=inputs.case.name, dtype=inputs.dtype.name,
                                threads=threads)
    with bench.layer_threads(fn):
        benchmark(fn)
