"""`tl.to_dot(t)`: the graph that produced a tensor as Graphviz DOT text.

Paste the text into any Graphviz viewer, or run `dot -Tpng graph.dot -o graph.png`. Tensors are
boxes (shape, dtype), ops are ellipses; edges run from inputs to outputs as the forward pass did.
"""
from tinyllm.autograd import Tensor


def to_dot(root: Tensor, name="tinyllm") -> str:
    if not isinstance(root, Tensor):
        raise TypeError(f"to_dot takes a Tensor, got {type(root).__name__}")
    lines = [f"digraph {name} {{", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    seen = set()
    stack = [root]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        kind = "leaf" if t.is_leaf else "tensor"
        grad = ", grad" if t.requires_grad else ""
        color = ', style=filled, fillcolor="#dde8ff"' if t is root else ""
        label = f"{t.name}: " if t.name else ""
        lines.append(f'  t{id(t)} [shape=box, label="{label}{kind} {tuple(t.shape)} {t.dtype}{grad}"{color}];')
        fn = t._ctx
        if fn is None:
            continue
        lines.append(f'  f{id(fn)} [shape=ellipse, label="{fn.name}"];')
        lines.append(f"  f{id(fn)} -> t{id(t)};")
        if fn.inputs is None:  # backward already freed this part of the graph
            lines.append(f'  f{id(fn)} [label="{fn.name} (freed by backward)"];')
            continue
        for x in fn.inputs:
            lines.append(f"  t{id(x)} -> f{id(fn)};")
            stack.append(x)
    lines.append("}")
    return "\n".join(lines) + "\n"
