"""from_torch / to_torch_state_dict: parity with torch.nn.BatchNorm{1,2,3}d."""

import numpy as np
import pytest

from bn_cy import BatchNormalization

torch = pytest.importorskip("torch")


def _module(cls, c, momentum, seed):
    torch.manual_seed(seed)
    m = cls(c, eps=1e-4, momentum=momentum).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize("cls, shape", [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (6, 3, 5)),
                                        ("BatchNorm2d", (4, 3, 5, 2)),
                                        ("BatchNorm3d", (2, 3, 2, 3, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_and_eval_parity(cls, shape, momentum):
    m = _module(getattr(torch.nn, cls), shape[1], momentum, 0)
    layer = BatchNormalization.from_torch(m, input_rank=len(shape))
    assert layer.axis == 1 and layer.epsilon == 1e-4
    assert layer.momentum == (None if momentum is None else pytest.approx(0.9))
    rng = np.random.default_rng(1)
    m.train()
    for _ in range(3):
        x = rng.standard_normal(shape) * 2 + 1
        y_t = m(torch.tensor(x)).detach().numpy()
        y = layer(x, training=True)
        np.testing.assert_allclose(y, y_t, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.moving_mean, m.running_mean.numpy(), rtol=1e-10)
    np.testing.assert_allclose(layer.moving_variance, m.running_var.numpy(), rtol=1e-10)
    assert layer.num_batches_tracked == int(m.num_batches_tracked)
    m.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(layer(x, training=False), m(torch.tensor(x)).detach().numpy(),
                               rtol=1e-10, atol=1e-10)


def test_backward_parity_with_autograd():
    m = _module(torch.nn.BatchNorm2d, 3, 0.1, 2)
    layer = BatchNormalization.from_torch(m)
    x = np.random.default_rng(3).standard_normal((4, 3, 2, 2))
    dy = np.random.default_rng(4).standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    (m(xt) * torch.tensor(dy)).sum().backward()
    layer(x, training=True)
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.gradients[0], m.weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(layer.gradients[1], m.bias.grad.numpy(), rtol=1e-9)


def test_state_dict_round_trip_with_prefix_and_float32():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    net[1].num_batches_tracked.fill_(7)
    sd = net.state_dict()
    layer = BatchNormalization.from_torch(sd, prefix="1.", eps=1e-5, momentum=0.2)
    assert layer.dtype == "float32" and layer.momentum == pytest.approx(0.8)
    assert layer.num_batches_tracked == 7
    back = layer.to_torch_state_dict(prefix="1.")
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict(layer.to_torch_state_dict())
    arrays = layer.to_torch_state_dict(as_numpy=True)
    assert isinstance(arrays["running_var"], np.ndarray)


def test_affine_false_and_errors():
    m = torch.nn.BatchNorm1d(3, affine=False)
    layer = BatchNormalization.from_torch(m)
    assert not layer.center and not layer.scale
    assert set(layer.to_torch_state_dict()) == {"running_mean", "running_var",
                                                "num_batches_tracked"}
    with pytest.raises(ValueError, match="running"):
        BatchNormalization.from_torch(torch.nn.BatchNorm1d(3, track_running_stats=False))
    only_gamma = BatchNormalization(center=False)
    only_gamma.build((None, 2))
    sd = only_gamma.to_torch_state_dict()
    assert torch.equal(sd["bias"], torch.zeros(2))
