"""save/load: atomic writes, and clear errors for truncated or tampered files."""

import os

import numpy as np
import pytest

import bn_cy


def _trained_layer():
    layer = bn_cy.BatchNormalization(momentum=0.9, renorm=True)
    x = np.random.default_rng(3).standard_normal((16, 5)).astype(np.float32)
    for _ in range(3):
        layer(x, training=True)
    return layer


def test_round_trip_keeps_everything(tmp_path):
    layer = _trained_layer()
    path = tmp_path / "bn.npz"
    layer.save(path)
    back = bn_cy.BatchNormalization.load(path)
    assert back.get_config() == layer.get_config()
    for a, b in zip(back.get_weights(), layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["bn.npz"], "no temporary file is left behind"


def test_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    old = bn_cy.BatchNormalization(axis=-1)
    old.build((4, 3))
    path = tmp_path / "bn.npz"
    old.save(path)
    before = path.read_bytes()

    real_savez = np.savez

    def crash_midway(f, **arrays):
        real_savez(f, **arrays)
        f.truncate(max(1, f.tell() // 2))  # half the bytes are written...
        raise KeyboardInterrupt("simulated interruption")  # ...then the process is stopped

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        _trained_layer().save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before, "the file under the path is the old, complete one"
    assert sorted(os.listdir(tmp_path)) == ["bn.npz"], "the partial temporary file is removed"
    assert bn_cy.BatchNormalization.load(path).get_config() == old.get_config()


def test_interrupted_first_save_leaves_no_file(tmp_path, monkeypatch):
    def crash(f, **arrays):
        f.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        _trained_layer().save(tmp_path / "new.npz")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    path = tmp_path / "bn.npz"
    _trained_layer().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt|not a readable"):
        bn_cy.BatchNormalization.load(path)


def test_tampered_weights_are_detected(tmp_path):
    """Weights rewritten with a valid archive (no CRC error): the checksum catches it."""
    layer = _trained_layer()
    path = tmp_path / "bn.npz"
    layer.save(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["gamma"] = arrays["gamma"] + 1.0
    with open(path, "wb") as out:
        np.savez(out, **arrays)
    with pytest.raises(ValueError, match="modified after it was saved"):
        bn_cy.BatchNormalization.load(path)


def test_flipped_byte_is_an_error(tmp_path):
    path = tmp_path / "bn.npz"
    _trained_layer().save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        bn_cy.BatchNormalization.load(path)


def test_not_a_layer_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a file written by"):
        bn_cy.BatchNormalization.load(path)
    with pytest.raises(FileNotFoundError):
        bn_cy.BatchNormalization.load(tmp_path / "missing.npz")
