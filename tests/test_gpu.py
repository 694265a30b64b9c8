"""The CuPy backend: every gradient check on the GPU, CPU and GPU agreeing in float32, training,
checkpoints and resume on the GPU, `cuda:N`.

Marked gpu: on CuPy and a GPU when there is one, else on tinyllm's CuPy stand-in (tests/conftest.py),
which keeps CuPy's rules (no silent host/device mixing, no implicit conversion to NumPy), so these
also check that no NumPy-only call reaches a device array.
"""
import json

import numpy as np
import pytest

import tinyllm as tl
from tinyllm import backend
from tinyllm.cases import iter_cases
from tinyllm.gradcheck import gradcheck_report

pytestmark = pytest.mark.gpu

_CASE_LABELS = [label for label, _, _ in iter_cases("cpu")]
_device_cases = {}   # id(array module) -> {label: (fn, inputs)}, built once per backend


def _case_on_gpu(label):
    xp = backend.xp_for("cuda")
    cases = _device_cases.get(id(xp))
    if cases is None:
        cases = _device_cases[id(xp)] = {lab: (fn, inputs) for lab, fn, inputs in iter_cases("cuda")}
    return cases[label]


def test_case_labels_are_unique():
    assert len(set(_CASE_LABELS)) == len(_CASE_LABELS)


@pytest.mark.parametrize("label", _CASE_LABELS)
def test_gradcheck_case_on_gpu(label):
    fn, inputs = _case_on_gpu(label)
    assert type(inputs[0].data) is not np.ndarray and inputs[0].device == "cuda"
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


def test_embedding_backward_on_gpu_sums_repeated_ids():
    """The deterministic scatter-add of the embedding's backward (backend.scatter_add) against the CPU."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    ids = rng.integers(0, 7, (4, 9))                      # many repeats, some rows never read
    gy = rng.standard_normal((4, 9, 5)).astype(np.float32)
    grads = []
    for device in ("cpu", "cuda"):
        weight = tl.tensor(w, requires_grad=True, device=device)
        y = tl.nn.functional.embedding(tl.tensor(ids, device=device).data, weight)
        y.backward(tl.tensor(gy, device=device))
        grads.append(backend.to_numpy(weight.grad))
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def _train(tmp_path, name, *args):
    from tinyllm.cli import main
    from tinyllm.testing.syncs import _tiny_dataset
    data = _tiny_dataset(tmp_path / "data")
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
            "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--warmup-iters", "2"]
    return main(["train", "--data", str(data), "--out", str(tmp_path / name), "--device", "cuda", *tiny, *args])


def test_training_checkpoint_and_resume_on_gpu(tmp_path):
    """tinyllm train --device cuda: finite losses, a checkpoint of host arrays, and a resume that ends
    where the straight run ends (no dropout: the GPU's dropout is not yet resumable, issue 23)."""
    from tinyllm.safetensors_io import load_file
    assert _train(tmp_path, "straight", "--max-iters", "4", "--eval-interval", "2") == 0
    # the first part's schedule is the straight run's (a resume keeps the saved --lr-decay-iters)
    assert _train(tmp_path, "resumed", "--max-iters", "2", "--lr-decay-iters", "4", "--eval-interval", "2") == 0
    assert _train(tmp_path, "resumed", "--max-iters", "4", "--eval-interval", "2", "--resume") == 0
    losses = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in losses if "loss" in r)
    a = load_file(tmp_path / "straight" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "ckpt" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    from tinyllm.cli import main
    assert main(["sample", "--ckpt", str(tmp_path / "resumed"), "--prompt", "def", "--max-new-tokens", "5",
                 "--device", "cuda", "--seed", "1"]) == 0


def test_cuda_device_name_reports_cuda():
    x = tl.tensor([1.0], device="cuda:0")
    assert x.device == "cuda" and backend.cuda_device_index() == 0
    assert tl.GPT(tl.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4), device="cuda:0").device \
        == "cuda"
