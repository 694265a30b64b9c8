"""tinyllm: a GPT built from first principles on NumPy (CPU) and CuPy (GPU).

    import tinyllm as tl
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()      # x.grad == [2, 4]
"""
from tinyllm.autograd import Tensor, Function, no_grad, is_grad_enabled, tensor, manual_seed, OPS
from tinyllm.ops import (add, sub, mul, div, pow, neg, exp, log, tanh, sqrt, relu, maximum, where,
                         reshape, transpose, concat, stack, matmul, sum, mean, max)
from tinyllm.gradcheck import gradcheck, GradcheckError
from tinyllm.dot import to_dot
from tinyllm.backend import cuda_available, get_array_module

__version__ = "0.1.0"


def __getattr__(name):
    # The model and the layers import lazily so `import tinyllm` stays light for the engine alone.
    if name in ("GPT", "GPTConfig"):
        from tinyllm import model
        return getattr(model, name)
    if name in ("nn", "optim", "tokenizer"):
        import importlib
        return importlib.import_module(f"tinyllm.{name}")
    raise AttributeError(f"module 'tinyllm' has no attribute {name!r}")
