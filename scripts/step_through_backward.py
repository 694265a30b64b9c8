"""Watch one backward pass, step by step.

Run it plainly to see a trace, or under a debugger to stop at each step:

    python scripts/step_through_backward.py
    python -m pdb scripts/step_through_backward.py     # then `b tinyllm/autograd.py:<line of fn.backward>`

The model is one neuron with a tanh: loss = (tanh(w·x + b) − target)². Each step prints the op whose
backward runs, the gradient that arrives at its output and the gradients it sends to its inputs.
"""
import numpy as np

import tinyllm as tl
from tinyllm import autograd


def traced_backward(root):
    """The same loop as tinyllm.autograd.backward, with prints (read the two side by side)."""
    grads = {id(root._ctx): np.ones_like(root.data)}
    for step, node in enumerate(autograd._topological_order(root._ctx)):
        g = grads.pop(id(node), None)
        if isinstance(node, tl.Tensor):  # a leaf: its gradient is final
            print(f"leaf   {node.name:>7}: grad = {np.round(g, 4).tolist()}")
            node.grad = g
            continue
        fn = node
        gxs = fn.backward(g)  # <- step into this line to see the op's own derivative
        gxs = gxs if isinstance(gxs, tuple) else (gxs,)
        sent = [None if gx is None else np.round(gx, 4).tolist() for gx in gxs]
        print(f"step {step}: {fn.name:>6}.backward  gets {np.round(g, 4).tolist()}  sends {sent}")
        for parent, gx in zip(fn.parents, gxs):
            if parent is not None and gx is not None:
                grads[id(parent)] = grads[id(parent)] + gx if id(parent) in grads else gx


def main():
    x = tl.tensor([0.5, -1.0], dtype="float64")
    w = tl.tensor([0.3, 0.8], dtype="float64", requires_grad=True)
    b = tl.tensor(0.1, dtype="float64", requires_grad=True)
    w.name, b.name = "w", "b"
    target = 0.25

    h = (w * x).sum() + b          # pre-activation, a scalar
    y = h.tanh()                   # the neuron's output
    loss = (y - target) ** 2       # squared error
    for t, name in [(h, "h"), (y, "y"), (loss, "loss")]:
        t.name = name
    print(f"forward: h = {h.item():.4f}, y = {y.item():.4f}, loss = {loss.item():.4f}\n")
    print(tl.to_dot(loss))

    traced_backward(loss)

    # the engine's own backward gives the same numbers
    w2 = tl.tensor(w.data, requires_grad=True)
    b2 = tl.tensor(b.data, requires_grad=True)
    ((((w2 * x).sum() + b2).tanh() - target) ** 2).backward()
    print("\nengine: dL/dw =", w2.grad, " dL/db =", b2.grad)
    # and by hand: dL/dy = 2(y − t), dy/dh = 1 − y², dh/dw = x, dh/db = 1
    dh = 2 * (y.item() - target) * (1 - y.item() ** 2)
    print("by hand: dL/dw =", dh * x.data, " dL/db =", dh)


if __name__ == "__main__":
    main()
