"""End to end: a NumPy MLP (dense -> BatchNormalization -> relu -> dense -> softmax) trained by
SGD with layer.backward on synthetic separable data; the loss falls and the inference-mode
accuracy on held-out data is high."""

import numpy as np

from bn_cy.layer import BatchNormalization


def make_data(rng, n, centers):
    labels = rng.integers(0, len(centers), size=n)
    # features on very different scales and offsets: what batch normalization is for
    x = centers[labels] + rng.standard_normal((n, centers.shape[1]))
    x = x * np.linspace(0.1, 20.0, centers.shape[1]) + 5.0
    return x.astype(np.float32), labels


def softmax_cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    dlogits = p
    dlogits[np.arange(n), labels] -= 1.0
    return loss, dlogits / n


class MLP:
    def __init__(self, rng, n_in, n_hidden, n_out):
        self.w1 = (rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in)).astype(np.float32)
        self.b1 = np.zeros(n_hidden, np.float32)
        self.bn = BatchNormalization(momentum=0.9, gamma_regularizer="l2")
        self.w2 = (rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden)).astype(np.float32)
        self.b2 = np.zeros(n_out, np.float32)

    def forward(self, x, training):
        self.x = x
        self.h = x @ self.w1 + self.b1
        self.z = self.bn(self.h, training=training)
        self.a = np.maximum(self.z, 0)
        return self.a @ self.w2 + self.b2

    def backward(self, dlogits):
        grads = {"w2": self.a.T @ dlogits, "b2": dlogits.sum(0)}
        dz = (dlogits @ self.w2.T) * (self.z > 0)
        dh = self.bn.backward(dz)
        grads["w1"] = self.x.T @ dh
        grads["b1"] = dh.sum(0)
        return grads

    def sgd(self, grads, lr):
        for name, g in grads.items():
            setattr(self, name, getattr(self, name) - lr * g.astype(np.float32))
        for w, g in zip(self.bn.trainable_weights, self.bn.gradients):
            w -= lr * g  # the layer's live weights


def test_mlp_with_batchnorm_learns():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 12)) * 1.5
    x_train, y_train = make_data(rng, 900, centers)
    x_test, y_test = make_data(rng, 300, centers)
    model = MLP(rng, 12, 32, 3)
    epoch_losses = []
    for epoch in range(25):
        order = rng.permutation(len(x_train))
        losses = []
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            logits = model.forward(x_train[idx], training=True)
            loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
            loss += float(sum(model.bn.losses))
            model.sgd(model.backward(dlogits), lr=0.1)
            losses.append(loss)
        epoch_losses.append(float(np.mean(losses)))
    assert epoch_losses[-1] < 0.5 * epoch_losses[0]
    assert all(np.isfinite(epoch_losses))
    # inference mode uses the moving statistics learned during training
    predictions = model.forward(x_test, training=False).argmax(axis=1)
    accuracy = float((predictions == y_test).mean())
    assert accuracy > 0.9, (accuracy, epoch_losses)
    # a frozen copy (fine-tuning setup) gives the same inference outputs and no BN gradients
    model.bn.trainable = False
    frozen_logits = model.forward(x_test, training=True)
    np.testing.assert_allclose(frozen_logits.argmax(axis=1), predictions)
    model.backward(np.ones_like(frozen_logits))
    assert model.bn.gradients == []
