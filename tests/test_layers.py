"""nn layers (tinyllm/nn/layers.py): parameters, names, init, dtype/device, train/eval, forward = functional."""
import math

import numpy as np
import pytest

import tinyllm as tl
import tinyllm.nn.functional as F
from tinyllm import nn


def test_linear_parameters_and_init():
    tl.manual_seed(0)
    m = nn.Linear(64, 32)
    assert dict((n, p.shape) for n, p in m.named_parameters()) == {"weight": (32, 64), "bias": (32,)}
    assert m.weight.dtype == np.float32 and m.weight.requires_grad and isinstance(m.weight, nn.Parameter)
    bound = 1 / math.sqrt(64)
    w = m.weight.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound   # U(-1/sqrt(in), 1/sqrt(in))
    assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert np.abs(m.bias.numpy()).max() <= bound
    assert m.num_parameters() == 64 * 32 + 32


def test_linear_without_bias_has_bias_none():
    m = nn.Linear(3, 2, bias=False)
    assert m.bias is None
    assert list(m.state_dict()) == ["weight"]
    x = tl.tensor(np.ones((4, 3), dtype=np.float32))
    np.testing.assert_allclose(m(x).numpy(), np.ones((4, 3)) @ m.weight.numpy().T, rtol=1e-6)


def test_linear_forward_backward_matches_functional():
    m = nn.Linear(5, 3, dtype="float64")
    x = tl.tensor(np.random.default_rng(0).standard_normal((2, 4, 5)), requires_grad=True)
    y = m(x)
    assert y.shape == (2, 4, 3) and y.dtype == np.float64
    np.testing.assert_allclose(y.numpy(), x.numpy() @ m.weight.numpy().T + m.bias.numpy(), rtol=1e-12)
    y.sum().backward()
    np.testing.assert_allclose(m.bias.grad, np.full(3, 8.0))
    np.testing.assert_allclose(m.weight.grad, np.tile(x.numpy().reshape(-1, 5).sum(0), (3, 1)), rtol=1e-12)


def test_seed_makes_init_repeatable():
    def make():
        return [nn.Linear(4, 3), nn.Embedding(10, 4), nn.Linear(3, 2, bias=False)]
    tl.manual_seed(42)
    a = make()
    tl.manual_seed(42)
    b = make()
    c = make()
    for ma, mb, mc in zip(a, b, c):
        np.testing.assert_array_equal(ma.weight.numpy(), mb.weight.numpy())
        assert not np.array_equal(ma.weight.numpy(), mc.weight.numpy())


def test_embedding():
    tl.manual_seed(1)
    m = nn.Embedding(100, 16)
    assert m.weight.shape == (100, 16) and m.weight.dtype == np.float32
    assert abs(m.weight.numpy().std() - 1.0) < 0.05  # N(0, 1), as torch.nn.Embedding
    ids = np.array([[1, 2, 1], [99, 0, 0]])
    y = m(ids)
    assert y.shape == (2, 3, 16)
    np.testing.assert_array_equal(y.numpy(), m.weight.numpy()[ids])
    y.sum().backward()
    np.testing.assert_array_equal(m.weight.grad[[0, 1, 2, 3, 99], 0], [2, 2, 1, 0, 1])
    np.testing.assert_array_equal(m(tl.tensor(ids)).numpy(), y.numpy())


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_module(bias):
    m = nn.LayerNorm(6, bias=bias)
    np.testing.assert_array_equal(m.weight.numpy(), np.ones(6))
    if bias:
        np.testing.assert_array_equal(m.bias.numpy(), np.zeros(6))
        assert sorted(m.state_dict()) == ["bias", "weight"]
    else:
        assert m.bias is None and list(m.state_dict()) == ["weight"]
    x = tl.tensor(np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32) * 4 + 1)
    y = m(x).numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)
    assert m.eps == 1e-5


def test_rms_norm_module():
    m = nn.RMSNorm(5, eps=1e-6)
    assert m.bias is None and [n for n, _ in m.named_parameters()] == ["weight"]
    x = tl.tensor(np.random.default_rng(0).standard_normal((3, 5)) * 3, dtype="float32")
    y = m(x).numpy()
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1, rtol=1e-4)
    np.testing.assert_allclose(y, F.rms_norm(x, m.weight, eps=1e-6).numpy())


def test_dropout_module_train_and_eval():
    m = nn.Dropout(0.5)
    x = tl.tensor(np.ones((10, 10), dtype=np.float32), requires_grad=True)
    assert m.training
    y = m(x)
    assert set(np.unique(y.numpy())) <= {0.0, 2.0}
    m.eval()
    assert m(x) is x
    m.train()
    assert m(x) is not x
    assert nn.Dropout(0.0)(x) is x
    assert m.parameters() == []
    with pytest.raises(ValueError):
        nn.Dropout(-0.1)


def test_modules_in_a_model_get_dotted_names_and_modes():
    class Block(nn.Module):
        def __init__(self):
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 8)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(F.gelu(self.fc(self.ln(x))))

    class Net(nn.Module):
        def __init__(self):
            self.wte = nn.Embedding(10, 4)
            self.h = [Block(), Block()]
            self.norm = nn.RMSNorm(8)

    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["wte.weight", "h.0.ln.weight", "h.0.ln.bias", "h.0.fc.weight", "h.0.fc.bias",
                     "h.1.ln.weight", "h.1.ln.bias", "h.1.fc.weight", "h.1.fc.bias", "norm.weight"]
    net.eval()
    assert not net.h[1].drop.training
    x = net.wte(np.array([[1, 2]]))
    assert net.h[0](x).shape == (1, 2, 8)


@pytest.mark.parametrize("dtype", ["float64", np.float64])
def test_dtype_argument(dtype):
    for m in (nn.Linear(3, 2, dtype=dtype), nn.Embedding(4, 3, dtype=dtype), nn.LayerNorm(3, dtype=dtype),
              nn.RMSNorm(3, dtype=dtype)):
        assert all(p.dtype == np.float64 for p in m.parameters())


def test_device_argument():
    m = nn.Linear(3, 2, device="cpu")
    assert m.weight.device == "cpu"
    if not tl.cuda_available():
        with pytest.raises(RuntimeError, match="CuPy"):
            nn.Linear(3, 2, device="cuda")
        return
    m = nn.Linear(3, 2, device="cuda")
    assert m.weight.device == "cuda" and m.bias.device == "cuda"


def test_state_dict_round_trip():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    np.testing.assert_array_equal(a.bias.numpy(), b.bias.numpy())


def test_reprs():
    assert repr(nn.Linear(2, 3, bias=False)) == "Linear(in_features=2, out_features=3, bias=False)"
    assert repr(nn.Embedding(5, 2)) == "Embedding(5, 2)"
    assert "LayerNorm(4" in repr(nn.LayerNorm(4)) and "RMSNorm(4" in repr(nn.RMSNorm(4))
    assert repr(nn.Dropout(0.1)) == "Dropout(p=0.1)"
