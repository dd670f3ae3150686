"""benchmarks/ab.py: its two builds side by side in one process (nothing is timed for a verdict).
The installed bn_cy stands for both builds; building a revision takes minutes and is left to
the tool's own runs."""

import os
import re
import sys

import numpy as np
import pytest

import ab
import bn_cy
from report import CASES_BY_NAME, Inputs

#: the directory that holds the bn_cy under test (a checkout built in place, or site-packages)
HERE = os.path.dirname(os.path.dirname(os.path.abspath(bn_cy.__file__)))

ROW = re.compile(r"(\w+) +(\w+) +(float\d\d) +(\d+) +(\d+\.\d{4}) +(\d+\.\d{4}) +(\d+\.\d{3})"
                 r" +(\d+\.\d{3}) - +(\d+\.\d{3})")


def test_control_prints_a_row_per_call(capsys):
    ab.main([HERE, "--control", "--cases", "tiny", "dense", "--threads", "1", "2",
             "--rounds", "3", "--target-ms", "0.05"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "A: %s" % HERE
    assert out[1] == "B: %s (a copy of A)" % HERE
    rows = [ROW.fullmatch(line) for line in out[4:]]
    assert all(rows), out[4:]
    keys = [(m[1], m[2], m[3], int(m[4])) for m in rows]
    assert keys == [(c, mode, "float32", t) for c in ("tiny", "dense") for t in (1, 2)
                    for mode in ab.MODES]
    for m in rows:
        q1, med, q3 = float(m[8]), float(m[7]), float(m[9])
        assert float(m[5]) > 0 and float(m[6]) > 0
        assert q1 <= med <= q3
    # the copies were imported under their own names and are gone again
    assert not any(k.split(".")[0] in ab.NAMES for k in sys.modules)


def test_both_sides_compute_what_bn_cy_computes(tmp_path):
    side = ab.resolve(HERE)
    lib_a, lib_b = ab.load([side, side], str(tmp_path))
    try:
        assert lib_a is not bn_cy and lib_b is not lib_a
        assert lib_a._kernels is not bn_cy._kernels
        arrays = Inputs(CASES_BY_NAME["dense"], "float32")
        for lib in (lib_a, lib_b):
            for mode in ab.MODES:
                ab.bn_cy_function(lib, mode, arrays, 2, out=True)()
                got = arrays.out.copy()
                ab.bn_cy_function(bn_cy, mode, arrays, 2, out=True)()
                if mode != "moments":  # moments return their result, the others write out=
                    np.testing.assert_array_equal(got, arrays.out)
            m, v = ab.bn_cy_function(lib, "moments", arrays, 2)()
            m0, v0 = bn_cy.moments(arrays.x, axis=-1)
            np.testing.assert_array_equal(m, m0)
            np.testing.assert_array_equal(v, v0)
    finally:
        ab.unload(str(tmp_path))
    assert str(tmp_path) not in sys.path
    assert not any(k.split(".")[0] in ab.NAMES for k in sys.modules)


def test_summary_gives_median_and_quartiles():
    assert ab.summary([2.0]) == (2.0, 2.0, 2.0)
    assert ab.summary([0.9, 1.0, 1.1, 1.2, 1.3]) == pytest.approx((1.1, 1.0, 1.2))


def test_paired_rounds_alternate_and_divide():
    calls = []
    ta, tb, ratios = ab.paired_rounds(lambda: calls.append("a"), lambda: calls.append("b"), 4,
                                      1e-6)
    assert len(ta) == len(tb) == len(ratios) == 4
    assert ratios == pytest.approx([b / a for a, b in zip(ta, tb)])
    # after the loop-length probes (two calls each), each round is one untimed call and the
    # loop of one side, then the other's; the side that goes first alternates
    body = calls[4:]
    k = len(body) // 8
    assert len(body) == 8 * k and k >= 2
    chunks = [body[i:i + k] for i in range(0, len(body), k)]
    assert [set(c) for c in chunks] == [{s} for s in "abbaabba"]


def test_resolve_rejects_what_it_cannot_use(tmp_path):
    with pytest.raises(SystemExit, match="no bn_cy package"):
        ab.resolve(str(tmp_path))
    (tmp_path / "bn_cy").mkdir()
    (tmp_path / "bn_cy" / "__init__.py").write_text("")
    with pytest.raises(SystemExit, match="not built there"):
        ab.resolve(str(tmp_path))
    with pytest.raises(SystemExit, match="neither a directory nor a revision"):
        ab.resolve("no-such-revision-or-directory-here")


@pytest.mark.parametrize("argv", [[], ["x", "y", "--control"], ["x", "--rounds", "0"],
                                  ["x", "y", "--threads", "0"], ["x", "y", "--target-ms", "0"]])
def test_bad_arguments_stop_with_usage(argv):
    with pytest.raises(SystemExit):
        ab.parse_args(argv)


def test_shapes_of_ones_own_are_cases():
    args = ab.parse_args(["x", "y", "--shape", "1024x256", "64x256x128:1"])
    assert [(c.name, c.shape, c.axis, c.channels) for c in args.cases] == [
        ("1024x256", (1024, 256), -1, 256), ("64x256x128:1", (64, 256, 128), 1, 256)]
    args = ab.parse_args(["x", "y", "--cases", "tiny", "--shape", "8x4:0"])
    assert [(c.name, c.channels) for c in args.cases] == [("tiny", 64), ("8x4:0", 8)]
    assert [c.name for c in ab.parse_args(["x", "y"]).cases] == ["ntc", "dense"]


def test_a_shape_is_timed_like_a_case(capsys):
    ab.main([HERE, "--control", "--shape", "300x24:0", "--modes", "infer", "--threads", "2",
             "--rounds", "2", "--target-ms", "0.05"])
    rows = capsys.readouterr().out.strip().splitlines()[4:]
    assert len(rows) == 1 and rows[0].split()[:4] == ["300x24:0", "infer", "float32", "2"]


@pytest.mark.parametrize("text", ["1024", "10x0", "4x4:2", "4x4:-3", "4xa", "4x4:b", ""])
def test_bad_shapes_stop_with_usage(text, capsys):
    with pytest.raises(SystemExit):
        ab.parse_args(["x", "y", "--shape", text])
    assert "--shape" in capsys.readouterr().err


def test_no_case_at_all_stops_with_usage(capsys):
    with pytest.raises(SystemExit):
        ab.parse_args(["x", "y", "--cases"])
    assert "no case to time" in capsys.readouterr().err
