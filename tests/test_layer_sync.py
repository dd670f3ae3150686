"""BatchNormalization(synchronized=True) in one process (the mpiexec checks are in
tests/mpi/layer_sync_checks.py, run by tests/test_distributed.py)."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from bn_cy import BatchNormalization

try:
    from mpi4py import MPI

    HAVE_MPI = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_MPI = False

needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpi4py not installed")


def _train(layer, x, dy, mask=None, steps=2):
    out = []
    for _ in range(steps):
        out.append(layer(x, training=True, mask=mask))
        out.append(layer.backward(dy))
        out.extend(layer.gradients)
    return out + layer.get_weights()


@needs_mpi
@pytest.mark.parametrize("axis, mask_shape", [(-1, None), (-1, (12, 5)), (1, (12, 3)),
                                              (1, (12, 5))])
def test_single_process_synchronized_equals_unsynchronized(axis, mask_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 4 if axis == -1 else 5)).astype(np.float32)
    if axis == -1:
        x = x.reshape(12, 3, -1)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mask = None if mask_shape is None else rng.random(mask_shape if axis == 1 else (12, 3)) > .4
    a = BatchNormalization(axis=axis, synchronized=True, renorm=axis == 1)
    b = BatchNormalization(axis=axis, renorm=axis == 1)
    for got, want in zip(_train(a, x, dy, mask), _train(b, x, dy, mask)):
        np.testing.assert_array_equal(got, want)


@needs_mpi
def test_explicit_communicator_single_process():
    layer = BatchNormalization(synchronized=True)
    layer.communicator = MPI.COMM_SELF
    assert layer.communicator is MPI.COMM_SELF
    x = np.random.default_rng(1).standard_normal((8, 2))
    ref = BatchNormalization()
    np.testing.assert_array_equal(layer(x, training=True), ref(x, training=True))
    assert "communicator" not in layer.get_config()
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.communicator is None and clone.synchronized


def test_communicator_validation():
    layer = BatchNormalization(synchronized=True)
    assert layer.communicator is None
    with pytest.raises(TypeError, match="communicator"):
        layer.communicator = "COMM_WORLD"
    with pytest.raises(TypeError, match="communicator"):
        layer.communicator = object()
    layer.communicator = None


def test_missing_mpi4py_raises_on_synchronized_training_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    layer = BatchNormalization(synchronized=True)  # construction: fine
    x = np.ones((4, 3), np.float32)
    layer(x, training=False)  # inference: fine
    with pytest.raises(ImportError, match=r"bn_cy\[mpi\]"):
        layer(x, training=True)
    BatchNormalization()(x, training=True)  # unsynchronized: fine
    frozen = BatchNormalization(synchronized=True, trainable=False)
    frozen(x, training=True)  # frozen layers never compute batch statistics


def test_construction_and_inference_do_not_import_mpi4py():
    code = ("import sys, numpy as np; from bn_cy import BatchNormalization as B; "
            "l = B(synchronized=True); l(np.ones((3, 2)), training=False); "
            "l.get_config(); assert 'mpi4py' not in sys.modules, 'imported'")
    import os

    import bn_cy

    env = dict(os.environ)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(bn_cy.__file__)))
    env["PYTHONPATH"] = parent + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


class _FakeComm:
    """Two ranks seen from rank 0: the other rank holds `other` (a fixed partial)."""

    def __init__(self, other):
        self.other = other

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, item):
        return [item, self.other(item)]


def test_fake_two_rank_communicator_doubles_the_batch():
    # The other rank sends exactly this rank's partials: the global batch is x twice, whose
    # statistics equal x's; the backward sums double, and so does the total weight.
    x = np.random.default_rng(3).standard_normal((10, 4))
    dy = np.random.default_rng(4).standard_normal((10, 4))
    layer = BatchNormalization(synchronized=True, dtype="float64")
    layer.communicator = _FakeComm(lambda item: item)
    ref = BatchNormalization(dtype="float64")
    np.testing.assert_allclose(layer(x, training=True), ref(x, training=True), atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, ref.moving_variance, atol=1e-12)
    # dx of the batch [x, x] with gradient [dy, dy], restricted to the first copy
    big = BatchNormalization(dtype="float64")
    big(np.concatenate([x, x]), training=True)
    want = big.backward(np.concatenate([dy, dy]))[:10]
    np.testing.assert_allclose(layer.backward(dy), want, atol=1e-12)
