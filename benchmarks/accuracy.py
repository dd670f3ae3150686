"""Accuracy table of DESIGN.md section 4: max abs error of y against float64 math on the same
float32 values, x = offset + N(0, 1), 4096 values per channel, epsilon 1e-3.

    python benchmarks/accuracy.py

Columns: bn_cy (rows layout (4096, 16) axis=-1 and planes layout (4, 16, 1024) axis=1), PyTorch
CPU batch_norm in training mode (when installed), and the E[x^2] - E[x]^2 "fast variance"
formula Keras 3 uses, evaluated in float32 with NumPy.
"""

import numpy as np

import bn_cy

OFFSETS = [0.0, 1e2, 1e3, 1e4, 1e5]
EPS = 1e-3


def reference(x64, axis):
    red = tuple(i for i in range(x64.ndim) if i != axis)
    m = x64.mean(axis=red, keepdims=True)
    v = ((x64 - m) ** 2).mean(axis=red, keepdims=True)
    return (x64 - m) / np.sqrt(v + EPS)


def fast_variance(x, axis):
    red = tuple(i for i in range(x.ndim) if i != axis)
    m = x.mean(axis=red, keepdims=True, dtype=np.float32)
    v = np.mean(x * x, axis=red, keepdims=True, dtype=np.float32) - m * m
    with np.errstate(invalid="ignore"):
        return (x - m) / np.sqrt(v + np.float32(EPS))


def torch_y(x, axis):
    try:
        import torch
    except ImportError:
        return None
    t = torch.from_numpy(x).movedim(axis, 1)
    y = torch.nn.functional.batch_norm(t, None, None, training=True, eps=EPS)
    return y.movedim(1, axis).numpy()


def err(y, ref):
    if y is None:
        return "n/a"
    e = np.abs(y.astype(np.float64) - ref)
    return "NaN" if np.isnan(e).any() else "%.1e" % e.max()


def main():
    rng = np.random.default_rng(0)
    print("| offset | bn_cy rows | bn_cy planes | PyTorch | E[x^2]-E[x]^2 (Keras) |")
    print("|---|---|---|---|---|")
    for off in OFFSETS:
        x = (off + rng.standard_normal((4096, 16))).astype(np.float32)
        xp = np.ascontiguousarray(x.T.reshape(16, 4, 1024).transpose(1, 0, 2))  # (4, 16, 1024)
        ref, refp = reference(x.astype(np.float64), 1), reference(xp.astype(np.float64), 1)
        y = bn_cy.batch_norm_train(x, axis=-1)[0]
        yp = bn_cy.batch_norm_train(xp, axis=1)[0]
        print("| %g | %s | %s | %s | %s |" % (off, err(y, ref), err(yp, refp), err(torch_y(x, 1), ref),
                                             err(fast_variance(x, 1), ref)))


if __name__ == "__main__":
    main()
