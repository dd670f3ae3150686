"""synchronized=True over MPI: the mpiexec checks, and the single-process behaviour."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bn_cy

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

# CI installs the mpi extra and sets BN_CY_REQUIRE_MPI=1: there a missing MPI is a failure, not a
# skip. Elsewhere the MPI tests are skipped when mpi4py is absent.
REQUIRE_MPI = os.environ.get("BN_CY_REQUIRE_MPI") == "1"
needs_mpi = pytest.mark.skipif(not HAVE_MPI4PY and not REQUIRE_MPI, reason="mpi4py not installed")


def _mpiexec():
    for candidate in (os.path.join(os.path.dirname(sys.executable), "mpiexec"), shutil.which("mpiexec")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.fail("mpiexec not found (install the mpi extra: pip install 'bn_cy[mpi]')")


def _run_mpi(script, ranks):
    env = dict(os.environ)
    # the ranks must import the same bn_cy as this process (installed or in-place build)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(bn_cy.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, os.path.join(HERE, "mpi", script)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "mpiexec -n %d %s failed:\n%s\n%s" % (ranks, script, res.stdout, res.stderr)
    return res.stdout


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_ops_match_concatenated_batch(ranks):
    out = _run_mpi("sync_checks.py", ranks)
    assert "sync checks passed on %d ranks" % ranks in out


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_layer_matches_concatenated_batch(ranks):
    out = _run_mpi("layer_sync_checks.py", ranks)
    assert "passed" in out


@needs_mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_single_process_sync_equals_local(dtype, masked):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 3, 6)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    mask = rng.random((40, 6)) > 0.4 if masked else None
    g = rng.standard_normal(3)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-6)
    m0, v0 = bn_cy.moments(x, axis=1, mask=mask)
    m1, v1 = bn_cy.moments(x, axis=1, mask=mask, synchronized=True)
    np.testing.assert_allclose(m1, m0, **tol)
    np.testing.assert_allclose(v1, v0, **tol)
    y0, mm0, vv0 = bn_cy.batch_norm_train(x, g, axis=1, mask=mask)
    y1, mm1, vv1 = bn_cy.batch_norm_train(x, g, axis=1, mask=mask, synchronized=True)
    np.testing.assert_allclose(y1, y0, **tol)
    d0 = bn_cy.batch_norm_backward(dy, x, mm0, vv0, g, axis=1, mask=mask)
    d1 = bn_cy.batch_norm_backward(dy, x, mm1, vv1, g, axis=1, mask=mask, synchronized=True)
    for a, b in zip(d1, d0):
        np.testing.assert_allclose(a, b, **tol)


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"bn_cy\[mpi\]"):
        bn_cy.moments(np.ones((4, 2)), synchronized=True)
    # nothing synchronized, nothing imported
    bn_cy.moments(np.ones((4, 2)))


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="comm"):
        bn_cy.moments(np.ones((4, 2)), comm=object())


def test_merge_partials_is_chan_in_rank_order():
    """The merge against a fake communicator whose ranks hold slices of one batch."""
    from bn_cy import distributed

    rng = np.random.default_rng(8)
    x = 1e3 + rng.standard_normal((50, 4))
    cuts = [0, 7, 7, 31, 50]  # rank 1 is empty
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        xs = x[a:b]
        n = np.full(4, float(len(xs)))
        mean = xs.mean(0) if len(xs) else np.zeros(4)
        m2 = ((xs - mean) ** 2).sum(0) if len(xs) else np.zeros(4)
        parts.append((4, (n, mean, m2)))

    class FakeComm:
        def allgather(self, obj):
            return parts

        def Get_rank(self):
            return 0

    w, mean, m2 = distributed.merge_partials(FakeComm(), *parts[0][1])
    np.testing.assert_array_equal(w, np.full(4, 50.0))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-15)
    np.testing.assert_allclose(m2 / w, x.var(0), rtol=1e-12)

    parts[2] = (5, parts[2][1])
    with pytest.raises(ValueError, match="different numbers of channels"):
        distributed.merge_partials(FakeComm(), *parts[0][1])
