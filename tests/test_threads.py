"""Thread control: bitwise-equal results for every thread count, the global setting, the
environment (in subprocesses), threadpoolctl, and a guard against builds that lost OpenMP."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import bn_cy

THREAD_COUNTS = [1, 2, 3, 4, 7]

# shapes big enough that the kernels split the work (rows and planes families, a long odd one)
CASES = [
    pytest.param((64, 128, 256), -1, np.float32, False, id="64x128x256-ax-1"),
    pytest.param((64, 128, 256), 1, np.float32, False, id="64x128x256-ax1"),
    pytest.param((8, 28, 28, 64), -1, np.float32, True, id="nhwc-mask"),
    pytest.param((8, 64, 28, 28), 1, np.float64, True, id="nchw-f64-mask"),
    pytest.param((300007, 3), -1, np.float32, True, id="300007x3-mask"),
    pytest.param((3, 300007), 0, np.float16, False, id="3x300007-ax0-f16"),
    # one or two samples of channels-first data: statistics units are blocks of channels
    pytest.param((1, 300, 700), 1, np.float32, False, id="1x300x700-ax1"),
    pytest.param((1, 40, 5000), 1, np.float64, True, id="1x40x5000-ax1-f64-mask"),
    pytest.param((2, 100, 1000), 1, np.float16, True, id="2x100x1000-ax1-f16-mask"),
]


def _all_ops(x, axis, mask, n_threads):
    """Every output of the four ops for one thread count."""
    c = x.shape[axis]
    gamma = np.linspace(0.5, 1.5, c)
    beta = np.linspace(-1, 1, c)
    dy = (np.sin(np.arange(x.size, dtype=np.float64)) * 2).reshape(x.shape).astype(x.dtype)
    mean, var = bn_cy.moments(x, axis, mask=mask, n_threads=n_threads)
    y, tm, tv = bn_cy.batch_norm_train(x, gamma, beta, axis=axis, mask=mask, n_threads=n_threads)
    yi = bn_cy.batch_norm(x, tm, tv, gamma, beta, axis=axis, n_threads=n_threads)
    dx, dg, db = bn_cy.batch_norm_backward(dy, x, tm, tv, gamma, axis=axis, mask=mask,
                                           n_threads=n_threads)
    dxi, dgi, dbi = bn_cy.batch_norm_backward(dy, x, tm, tv, gamma, axis=axis, training=False,
                                              n_threads=n_threads)
    return dict(mean=mean, var=var, y=y, tmean=tm, tvar=tv, yi=yi, dx=dx, dgamma=dg, dbeta=db,
                dx_infer=dxi, dgamma_infer=dgi, dbeta_infer=dbi)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("shape,axis,dtype,masked", CASES)
def test_bitwise_equal_for_every_thread_count(shape, axis, dtype, masked):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    mask = None
    if masked:
        ms = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
        mask = rng.random(ms) < 0.8
    ref = _all_ops(x, axis, mask, 1)
    assert np.isfinite(ref["y"].astype(np.float64)).all()
    for n in THREAD_COUNTS[1:]:
        got = _all_ops(x, axis, mask, n)
        for name, v in ref.items():
            assert np.array_equal(_bits(got[name]), _bits(v)), f"{name} differs with n_threads={n}"


def test_bitwise_equal_with_weights_and_strides():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 50, 30))[::-1, :, ::2]  # negative stride, strided inner
    w = rng.choice([0.0, 0.5, 1.0, 2.5], (400, 15))
    ref = _all_ops(x, 1, w, 1)
    for n in (2, 5):
        got = _all_ops(x, 1, w, n)
        for name, v in ref.items():
            assert np.array_equal(_bits(got[name]), _bits(v)), f"{name} differs with n_threads={n}"


def test_global_setting_is_used_and_returned(restore_threads):
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    ref = bn_cy.batch_norm_train(x, n_threads=1)
    prev = bn_cy.set_num_threads(3)
    assert isinstance(prev, int) and prev >= 1
    assert bn_cy.get_num_threads() == 3
    assert bn_cy.set_num_threads(2) == 3
    assert bn_cy.get_num_threads() == 2
    got = bn_cy.batch_norm_train(x)  # n_threads=None -> the global setting
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)
    assert bn_cy.set_num_threads(-1) == 2
    assert bn_cy.get_num_threads() >= 1
    assert bn_cy.set_num_threads(None) >= 1  # back to OpenMP's default


def test_negative_thread_counts(restore_threads):
    bn_cy.set_num_threads(-1)
    cores = bn_cy.get_num_threads()
    assert cores >= 1
    bn_cy.set_num_threads(-2)
    assert bn_cy.get_num_threads() == max(1, cores - 1)
    bn_cy.set_num_threads(-10_000)
    assert bn_cy.get_num_threads() == 1
    x = np.ones((100, 3))
    for n in (-1, -2, -10_000):
        bn_cy.moments(x, n_threads=n)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (1.5, TypeError), ("2", TypeError),
                                     (2.0, TypeError), ([2], TypeError)])
@pytest.mark.parametrize("op", ["moments", "batch_norm", "batch_norm_train", "batch_norm_backward",
                                "set_num_threads"])
def test_n_threads_validation(op, bad, exc, restore_threads):
    x = np.ones((10, 3))
    calls = {
        "moments": lambda: bn_cy.moments(x, n_threads=bad),
        "batch_norm": lambda: bn_cy.batch_norm(x, np.zeros(3), np.ones(3), n_threads=bad),
        "batch_norm_train": lambda: bn_cy.batch_norm_train(x, n_threads=bad),
        "batch_norm_backward": lambda: bn_cy.batch_norm_backward(x, x, np.zeros(3), np.ones(3),
                                                                 n_threads=bad),
        "set_num_threads": lambda: bn_cy.set_num_threads(bad),
    }
    before = bn_cy.get_num_threads()
    with pytest.raises(exc, match="n_threads" if op != "set_num_threads" else None):
        calls[op]()
    assert bn_cy.get_num_threads() == before


def test_n_threads_accepts_positive_and_minus_one():
    x = np.random.default_rng(1).standard_normal((50, 4))
    ref = bn_cy.batch_norm_train(x, n_threads=1)
    for n in (1, 2, 64, -1, np.int64(3)):
        for a, b in zip(bn_cy.batch_norm_train(x, n_threads=n), ref):
            assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------
# environment, in fresh interpreters


def _probe(env_changes, code="print(bn_cy.get_num_threads())"):
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    root = os.path.dirname(os.path.dirname(os.path.abspath(bn_cy.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", "import bn_cy\n" + code], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


needs_openmp = pytest.mark.skipif(not bn_cy.openmp_enabled(), reason="build without OpenMP")


@needs_openmp
@pytest.mark.parametrize("value", ["3", "1", "5"])
def test_omp_num_threads_environment(value):
    assert _probe({"OMP_NUM_THREADS": value}) == value


@needs_openmp
def test_empty_omp_num_threads_counts_as_unset():
    unset = _probe({"OMP_NUM_THREADS": None})
    assert int(unset) >= 1
    assert _probe({"OMP_NUM_THREADS": ""}) == unset


@needs_openmp
def test_set_num_threads_overrides_environment():
    code = "print(bn_cy.set_num_threads(2), bn_cy.get_num_threads())"
    assert _probe({"OMP_NUM_THREADS": "3"}, code) == "3 2"


def test_invalid_omp_num_threads_is_harmless():
    """OMP_NUM_THREADS garbage must not break the import or a call."""
    code = "import numpy as np; print(bn_cy.moments(np.arange(6.0).reshape(3, 2))[0].tolist())"
    assert json.loads(_probe({"OMP_NUM_THREADS": "abc"}, code)) == [2.0, 3.0]


# ------------------------------------------------------------------------------------------
# threadpoolctl and the OpenMP guard


@needs_openmp
def test_threadpoolctl_limits_bn_cy(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    assert any(info["user_api"] == "openmp" for info in threadpoolctl.threadpool_info())
    with threadpoolctl.threadpool_limits(limits=1):
        assert bn_cy.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        assert bn_cy.get_num_threads() == 2
        bn_cy.set_num_threads(3)  # an explicit setting wins over the runtime's limit
        assert bn_cy.get_num_threads() == 3


def test_openmp_was_not_lost():
    """Fails when the build silently fell back to serial kernels (set BN_CY_ALLOW_NO_OPENMP=1 on
    platforms where that is intended)."""
    if os.environ.get("BN_CY_ALLOW_NO_OPENMP") != "1":
        assert bn_cy.openmp_enabled(), "bn_cy was built without OpenMP"


def test_build_info():
    info = bn_cy.build_info()
    types = dict(version=str, compiler=str, openmp=bool, simd=str, simd_compiled=list,
                 num_threads=int, numpy=str, platform=str)
    for key, t in types.items():
        assert key in info, key
        assert isinstance(info[key], t), (key, info[key])
    assert info["version"] == bn_cy.__version__
    assert info["openmp"] == bn_cy.openmp_enabled()
    assert info["num_threads"] == bn_cy.get_num_threads()
    assert info["simd_compiled"] and all(isinstance(s, str) for s in info["simd_compiled"])
    assert info["simd"] in info["simd_compiled"]
    assert isinstance(info["last_level_cache_bytes"], int) and info["last_level_cache_bytes"] >= 0
    json.dumps(info)  # plain data


def _sysfs_last_level_cache():
    """The largest data/unified cache of the highest level Linux lists for cpu0, in bytes."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, entry, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not size:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1], 1)
        size = int(size.rstrip("KMG")) * scale
        if best is None or (level, size) > best:
            best = (level, size)
    return None if best is None else best[1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"),
                    reason="the cache size is read with cpuid, on x86 only")
def test_last_level_cache_matches_the_kernel_s_listing():
    """The size the kernels read from cpuid (and use for their streaming-store rule) is the one
    Linux lists in sysfs, which it reads from the same cpuid leaves independently."""
    expected = _sysfs_last_level_cache()
    if expected is None:
        pytest.skip("no cache listing in /sys (not Linux, or a VM that hides it)")
    assert bn_cy.build_info()["last_level_cache_bytes"] == expected


@pytest.mark.skipif(not bn_cy.openmp_enabled(), reason="a serial build has no OpenMP team")
@pytest.mark.parametrize("shape, axis", [((4096, 24), -1), ((64, 12, 300), 1),
                                         ((256, 1024), -1)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_called_from_inside_a_callers_openmp_team(shape, axis, n_threads):
    # Every thread of a caller's parallel region calls the kernel on the whole input: each must
    # get the whole result (a kernel's work split must not bind to the caller's team).
    from bn_cy import _kernels
    x = np.random.default_rng(11).standard_normal(shape) * 3.0 + 5.0
    mean, var = bn_cy.moments(x, axis=axis, n_threads=1)
    for team in (2, 3):
        tm, tv = _kernels.moments_in_team(x, axis % x.ndim, team, n_threads)
        for t in range(team):
            assert np.array_equal(_bits(tm[t]), _bits(mean)), t
            assert np.array_equal(_bits(tv[t]), _bits(var)), t
