"""`tl.to_dot(t)`: the graph that produced a tensor as Graphviz DOT text.

Paste the text into any Graphviz viewer, or run `dot -Tpng graph.dot -o graph.png`. Ops are
ellipses labelled with the shape of what they produced, leaves (parameters, inputs that require
grad) are boxes, and edges run from inputs to outputs as the forward pass did. Like autograd
itself, the graph holds only what needs a gradient: constants do not appear.
"""
from tinyllm.autograd import Tensor, _parents, _topological_order


def _box(t):
    label = f"{t.name}: " if t.name else ""
    return f'[shape=box, label="{label}{tuple(t.shape)} {t.dtype}"]'


def to_dot(root: Tensor, name="tinyllm") -> str:
    if not isinstance(root, Tensor):
        raise TypeError(f"to_dot takes a Tensor, got {type(root).__name__}")
    lines = [f"digraph {name} {{", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    lines.append(f'  out [shape=box, style=filled, fillcolor="#dde8ff", label="{tuple(root.shape)} {root.dtype}"];')
    if root._ctx is None:
        return "\n".join(lines + ["}"]) + "\n"
    lines.append(f"  n{id(root._ctx)} -> out;")
    for node in _topological_order(root._ctx):
        if isinstance(node, Tensor):
            lines.append(f"  n{id(node)} {_box(node)};")
            continue
        if node.parents is None:  # backward already freed this part of the graph
            lines.append(f'  n{id(node)} [shape=ellipse, label="{node.name} (freed by backward)"];')
            continue
        lines.append(f'  n{id(node)} [shape=ellipse, label="{node.name}\\n{tuple(node.out_shape)}"];')
        for parent in _parents(node):
            lines.append(f"  n{id(parent)} -> n{id(node)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
