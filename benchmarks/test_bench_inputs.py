"""The benchmark inputs themselves: where the big arrays sit in memory (report.PAGE_OFFSETS)."""

import os

import numpy as np
import pytest

import report as bench


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("offset", sorted(bench.PAGE_OFFSETS.values()))
def test_placed_empty(dtype, offset):
    a = bench.placed_empty((3, 5, 7), dtype, offset)
    assert a.shape == (3, 5, 7) and a.dtype == np.dtype(dtype)
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % 4096 == offset
    a[...] = 1.0  # the whole array lies inside its buffer
    assert a.sum() == a.size


def test_inputs_are_placed_apart():
    data = bench.Inputs(bench.CASES[0], "float32")
    try:
        offsets = {name: getattr(data, name).ctypes.data % 4096 for name in ("x", "dy", "out")}
        assert offsets == bench.PAGE_OFFSETS
        assert len(set(offsets.values())) == 3
        assert not data.out.any()
        assert abs(float(data.x.mean()) - 0.5) < 0.05  # x = 0.5 + 2 N(0, 1)
    finally:
        data.close()


@pytest.mark.parametrize(
    "package_dir,expected",
    [
        (os.path.join("r", "bn_cy"), "this repository's source tree (built in place)"),
        (os.path.join("v", "lib", "python3.11", "site-packages", "bn_cy"),
         "an installed copy (site-packages)"),
        (os.path.join("r", "build", "bn_cy"),
         "another directory (neither the source tree nor site-packages)"),
    ],
)
def test_bn_cy_origin_names_no_path(package_dir, expected):
    """The machine table says where bn_cy came from without this machine's paths."""
    repo = os.path.abspath("r")
    got = bench.bn_cy_origin(os.path.abspath(package_dir), repo)
    assert got == expected
    assert repo not in got


def test_machine_lines_name_no_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for _, value in bench.machine_lines():
        assert os.path.dirname(here) not in value
