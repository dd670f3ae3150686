"""benchmarks/stream_rule.py runs end to end (one short round; nothing is timed for a verdict):
its children take each setting of BN_CY_STREAM_MIN_BYTES, and the table has a row per
(case, mode, thread count) with three times."""

import re

import pytest

import stream_rule


def test_stream_rule_prints_a_row_per_call(capsys):
    stream_rule.main(["--rounds", "1", "--repeat", "1", "--cases", "dense", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[-5:] == ["default", "stream", "no-stream", "stream", "faster"]
    rows = lines[1:]
    assert [r.split()[:3] for r in rows] == [["dense", m, "1"] for m in stream_rule.MODES]
    for r in rows:
        assert re.fullmatch(r"dense \w+ 1( +\d+\.\d{3}){3} +[01]/1", r), r


def test_stream_rule_rejects_bad_counts():
    with pytest.raises(SystemExit):
        stream_rule.main(["--rounds", "0"])
