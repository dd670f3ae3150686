"""Drives the bad-input table (tests/bad_inputs.py): every row raises exactly its exception with
its phrase in the message, leaves every input array (and a layer's weights) unchanged, and
docs/bad_inputs.md -- the README's table -- is the rendering of that data."""

import inspect
import os

import numpy as np
import pytest

import bad_inputs
import bn_cy
from conftest import assert_unchanged, snapshot

ROWS = bad_inputs.rows()


def _row_id(r, op=None):
    bad = "".join(ch if ch.isalnum() else "-" for ch in r.bad.lower())[:40].strip("-")
    arg = r.argument.replace(" ", "").replace("*", "any").replace("(", "").replace(")", "")
    where = op or r.where[0].split("(")[0]
    return "%s-%s-%s" % (where, arg, bad)


def _params():
    params = []
    for r in ROWS:
        if r.changes is not None:
            params += [pytest.param(r, op, id=_row_id(r, op)) for op in r.where]
        else:
            params.append(pytest.param(r, None, id=_row_id(r)))
    return params


def _arrays(values):
    return [v for v in values if isinstance(v, np.ndarray)]


def _layer_state(objs):
    state = []
    for o in objs:
        if hasattr(o, "get_weights"):
            state += [np.array(w, copy=True) for w in o.get_weights()]
            state.append(np.array(getattr(o, "num_batches_tracked", 0)))
    return state


@pytest.mark.parametrize("row,op", _params())
def test_bad_input_raises_as_documented(row, op):
    a = bad_inputs.base_args()
    if row.changes is not None:
        for key, value in row.changes.items():  # callables see the arguments changed so far
            a[key] = value(a) if callable(value) else value
        fn, args, kwargs = bad_inputs.op_call(op, a)
        stateful = []
    else:
        fn, args, kwargs, stateful = row.call(a)
    inputs = _arrays(list(args) + list(kwargs.values()) + list(a.values()))
    before = snapshot(*inputs)
    state = _layer_state(stateful)
    threads = bn_cy.get_num_threads()
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    exc = info.value
    assert type(exc) is row.exception, "raised %s (%s), the table says %s" % (
        type(exc).__name__, exc, row.exception.__name__)
    assert row.phrase in str(exc), "message %r lacks %r" % (str(exc), row.phrase)
    assert_unchanged(before, inputs)
    after = _layer_state(stateful)
    assert len(after) == len(state) and all(
        p.dtype == q.dtype and p.tobytes() == q.tobytes() for p, q in zip(state, after)), \
        "a failing call changed the layer's weights or counters"
    assert bn_cy.get_num_threads() == threads


@pytest.mark.parametrize("op", bad_inputs.OPS)
def test_base_arguments_are_valid(op):
    """Each row breaks one thing: the arguments it starts from are a valid call."""
    fn, args, kwargs = bad_inputs.op_call(op, bad_inputs.base_args())
    fn(*args, **kwargs)


# arguments that accept any value (their truthiness): no bad input exists
NO_BAD_INPUT = {"training", "synchronized"}


@pytest.mark.parametrize("op", bad_inputs.OPS)
def test_every_argument_of_every_op_has_a_row(op):
    params = set(inspect.signature(getattr(bn_cy, op)).parameters) - NO_BAD_INPUT
    covered = {r.argument for r in ROWS if r.changes is not None and op in r.where}
    assert params <= covered, "no bad-input row for %s(%s)" % (op, sorted(params - covered))


@pytest.mark.skipif(not hasattr(bn_cy, "BatchNormalization"), reason="no layer exported")
def test_every_constructor_argument_has_a_row():
    params = set(inspect.signature(bn_cy.BatchNormalization.__init__).parameters) - {"self"}
    ctor = [r for r in ROWS if r.where == ("BatchNormalization()",)]
    covered = set()
    for r in ctor:
        covered |= {p for p in params if p == r.argument
                    or (r.argument.startswith("*") and p.endswith(r.argument[1:]))}
    assert params <= covered, "no bad-input row for BatchNormalization(%s)" % sorted(
        params - covered)


def _docs_path():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "bad_inputs.md")


def test_docs_table_matches_the_data():
    path = _docs_path()
    if not os.path.exists(path):
        pytest.skip("docs/bad_inputs.md is not beside tests/ here (a copy of tests/ alone); "
                    "the check runs in the repository")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    expected = bad_inputs.render_markdown()
    assert text == expected, (
        "docs/bad_inputs.md differs from tests/bad_inputs.py; regenerate it with "
        "`python tests/bad_inputs.py > docs/bad_inputs.md`")


def test_readme_table_matches_the_data():
    path = os.path.join(os.path.dirname(_docs_path()), os.pardir, "README.md")
    if not os.path.exists(path):
        pytest.skip("README.md is not beside tests/ here; the check runs in the repository")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = text.split("<!-- bad-inputs:begin -->\n", 1)[1].split("<!-- bad-inputs:end -->", 1)[0]
    rendered = bad_inputs.render_markdown()
    assert block == rendered[rendered.index("| where | argument"):].rstrip() + "\n", (
        "README.md's bad-input table differs from tests/bad_inputs.py")


def test_table_rows_are_unique_and_complete():
    seen = set()
    for r in ROWS:
        key = (r.where, r.argument, r.bad)
        assert key not in seen, key
        seen.add(key)
        assert issubclass(r.exception, Exception) and r.phrase
        assert (r.changes is None) != (r.call is None)
