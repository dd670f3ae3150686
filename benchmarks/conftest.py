"""pytest-benchmark suites for bn_cy (issue 4): ``pytest benchmarks`` (not part of the normal test
run: pyproject's ``testpaths`` is ``tests``).

One test per (mode, peer, case, dtype, thread count); the peers of one (mode, case, dtype, threads)
share a benchmark ``group``, so ``--benchmark-group-by=group`` (the default) puts them side by side.
The cases, peers and floors live in ``report.py`` (also the ratio report); inputs are made once per
(case, dtype) by a session fixture, and pytest orders the tests so that each is made only once.

Options: ``--bench-quick`` (the quick cases, float32), ``-m "not large"`` (skip the large NHWC case),
``--benchmark-disable`` (run every callable once, time nothing: a smoke test).
"""

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # report.py is imported as a plain module, whatever the import mode
    sys.path.insert(0, _HERE)

import report as bench  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("bn_cy benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="only the quick cases (see benchmarks/report.py), float32")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: needs several GB of memory")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--bench-quick"):
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("inputs") if callspec else None
        if param is not None and not (param[0].quick and param[1] == "float32"):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_INPUT_PARAMS = [
    pytest.param((case, dtype), id="%s-%s" % (case.name, dtype),
                 marks=[pytest.mark.large] if case.large else [])
    for case in bench.CASES
    for dtype in bench.DTYPES
]


@pytest.fixture(scope="session", params=_INPUT_PARAMS)
def inputs(request):
    """The arrays of one (case, dtype), shared by every peer and thread count."""
    case, dtype = request.param
    data = bench.Inputs(case, dtype)
    yield data
    data.close()


@pytest.fixture
def run_peer(benchmark):
    """run_peer(mode, peer, inputs, threads): benchmark one peer's callable in its group."""

    def run(mode, peer, inputs, threads):
        try:
            fn = bench.peer_function(mode, peer, inputs, threads)
        except bench.Unavailable as exc:
            pytest.skip(str(exc))
        benchmark.group = bench.group_name(mode, inputs, threads)
        benchmark.extra_info.update(
            mode=mode, peer=peer, case=inputs.case.name, shape=list(inputs.case.shape),
            axis=inputs.case.axis, dtype=inputs.dtype.name, threads=threads, nbytes=inputs.nbytes,
        )
        benchmark(fn)

    return run
