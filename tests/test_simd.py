"""Every compiled SIMD variant of the kernels that this CPU can run, chosen with BN_CY_SIMD in a
fresh interpreter: the variant is the one asked for, its results match the float64 oracle, and
they are bitwise identical for every thread count. (The rest of the suite runs the variant chosen
by default, the highest one the CPU supports.)"""

import pytest

import bn_cy
from conftest import run_python

ORDER = ["baseline", "avx2+fma", "avx512"]
INFO = bn_cy.build_info()

CHECK = r"""
import numpy as np
import bn_cy
from reference import ref_batch_norm_backward, ref_batch_norm_train

assert bn_cy.build_info()["simd"] == WANT, bn_cy.build_info()["simd"]
rng = np.random.default_rng(3)
cases = [((512, 64), -1), ((64, 1024), -1), ((16, 40, 24), -1), ((8, 32, 128), 1),
         ((4, 8, 70), 1), ((2, 6, 4096), 1), ((12, 5, 9, 7), 2)]
for dtype, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
    for shape, axis in cases:
        x = (10.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
        if len(shape) == 4:
            x = np.moveaxis(x, 0, -1)  # a strided layout: the general paths
        dy = rng.standard_normal(x.shape).astype(dtype)
        runs = []
        for nt in (1, 2, 3):
            y, m, v = bn_cy.batch_norm_train(x, axis=axis, n_threads=nt)
            dx, dg, db = bn_cy.batch_norm_backward(dy, x, m, v, axis=axis, n_threads=nt)
            runs.append([a.tobytes() for a in (y, m, v, dx, dg, db)])
        assert runs[0] == runs[1] == runs[2], (shape, axis, dtype)
        y_ref, m_ref, v_ref = ref_batch_norm_train(x, axis=axis, eps=1e-3)
        dx_ref, dg_ref, db_ref = ref_batch_norm_backward(dy, x, m_ref, v_ref, axis=axis, eps=1e-3)
        for got, ref, name in ((y, y_ref, "y"), (m, m_ref, "mean"), (v, v_ref, "var"),
                               (dx, dx_ref, "dx")):
            err = np.max(np.abs(got.astype(np.float64) - ref))
            assert err <= tol * max(1.0, np.max(np.abs(ref))), (shape, axis, dtype, name, err)
        for got, ref, name in ((dg, dg_ref, "dgamma"), (db, db_ref, "dbeta")):
            err = np.max(np.abs(got.astype(np.float64) - ref))
            scale = np.sqrt(x.size / x.shape[axis])
            assert err <= tol * scale * max(1.0, np.max(np.abs(ref))), (shape, dtype, name, err)
print("ok")
"""


def _runnable():
    compiled = INFO["simd_compiled"]
    top = ORDER.index(INFO["simd"]) if INFO["simd"] in ORDER else 0
    return [v for v in compiled if v in ORDER and ORDER.index(v) <= top]


@pytest.mark.parametrize("variant", ORDER)
def test_simd_variant_matches_the_oracle(variant):
    if variant not in INFO["simd_compiled"]:
        pytest.skip("the %s variant was not compiled here" % variant)
    if variant not in _runnable():
        pytest.skip("this CPU cannot run the %s variant" % variant)
    out = run_python("WANT = %r\n" % variant + CHECK, {"BN_CY_SIMD": variant})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_unknown_simd_value_is_ignored():
    """An unknown BN_CY_SIMD value leaves the default choice."""
    out = run_python("import bn_cy; print(bn_cy.build_info()['simd'])",
                     {"BN_CY_SIMD": "no-such-level"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == INFO["simd"]
