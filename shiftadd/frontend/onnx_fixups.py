"""Rewrites of ONNX graphs that TVM 0.27's Relax importer cannot take as exported.

Each fixup keeps the graph's meaning exactly (checked in tests against ONNX Runtime) and exists
because of a specific importer limitation, named in its docstring.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    vals = {init.name: init for init in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for name, init in vals.items():
        if int(np.prod(init.dims)) <= 16:
            out[name] = numpy_helper.to_array(init)
    return out


def scalar_constant_of_shape(model: onnx.ModelProto) -> int:
    """``ConstantOfShape`` of an empty shape (a scalar) becomes a ``Constant``.

    The importer lowers ConstantOfShape to ``broadcast_to`` and rejects a rank-0 target shape
    ("broadcast_to expects the input shape to have the number of ndim at least ...").
    """
    g = model.graph
    consts = _constant_values(g)
    changed = 0
    for i, n in enumerate(list(g.node)):
        if n.op_type != "ConstantOfShape":
            continue
        shape = consts.get(n.input[0])
        if shape is None or shape.size != 0:
            continue
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        scalar = numpy_helper.to_array(value).reshape(()) if value is not None else np.zeros((), np.float32)
        node = helper.make_node(
            "Constant", [], [n.output[0]], name=n.name + "/scalar", value=numpy_helper.from_array(scalar)
        )
        g.node.remove(n)
        g.node.insert(i, node)
        changed += 1
    return changed


FIXUPS = (scalar_constant_of_shape,)


def apply_fixups(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every fixup in place; returns how many nodes each one changed."""
    return {f.__name__: f(model) for f in FIXUPS}
