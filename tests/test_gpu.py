"""The CuPy backend: every gradient check on the GPU, and CPU and GPU agreeing in float32.

All of these skip without CuPy or a GPU (`pytest -m gpu` selects them).
"""
import numpy as np
import pytest

import tinyllm as tl
from tinyllm.cases import iter_cases
from tinyllm.gradcheck import gradcheck_report

pytestmark = pytest.mark.gpu


def _gpu_cases():
    if not tl.cuda_available():
        return []
    return list(iter_cases("cuda"))


@pytest.mark.parametrize("label,fn,inputs", _gpu_cases() or [pytest.param(None, None, None, marks=pytest.mark.skip)])
def test_gradcheck_case_on_gpu(label, fn, inputs):
    result = gradcheck_report(fn, inputs)
    assert not result.failures, result.failures[0]
    assert result.worst_error < 1e-6


@pytest.mark.parametrize("variant", [
    dict(),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False, tie_weights=False),
])
def test_gpt_cpu_and_gpu_agree(variant):
    cfg = tl.GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, **variant)
    tl.manual_seed(0)
    cpu = tl.GPT(cfg)
    gpu = tl.GPT(cfg)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 37, (3, 16))
    tgt = rng.integers(0, 37, (3, 16))
    logits_c, loss_c = cpu(idx, tgt)
    logits_g, loss_g = gpu(tl.tensor(idx, device="cuda").data, tl.tensor(tgt, device="cuda").data)
    loss_c.backward()
    loss_g.backward()
    np.testing.assert_allclose(logits_g.numpy(), logits_c.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(loss_g.item(), loss_c.item(), rtol=1e-5)
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        np.testing.assert_allclose(tl.backend.to_numpy(pg.grad), pc.grad, rtol=1e-3, atol=1e-5, err_msg=name)


def test_generate_on_gpu_matches_cpu_greedy():
    cfg = tl.GPTConfig(vocab_size=23, block_size=16, n_layer=1, n_head=2, n_embd=16)
    tl.manual_seed(1)
    cpu = tl.GPT(cfg)
    gpu = tl.GPT(cfg)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    prompt = np.array([[1, 2, 3]])
    a = cpu.generate(prompt, 8, temperature=0)
    b = gpu.generate(tl.tensor(prompt, device="cuda").data, 8, temperature=0)
    np.testing.assert_array_equal(a, tl.backend.to_numpy(b))


def test_no_silent_copies_between_devices():
    x = tl.tensor([1.0, 2.0], device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        x + tl.tensor([1.0, 2.0])
    assert x.to("cpu").device == "cpu" and x.device == "cuda"
