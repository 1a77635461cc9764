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


# ops whose output is computed here when every input is a known constant (shape arithmetic)
_FOLDABLE = {
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Div",
    "Mul",
    "Add",
    "Sub",
    "Cast",
    "Slice",
    "Neg",
    "Floor",
    "Ceil",
    "Equal",
    "Where",
    "Range",
    "Reshape",
    "ReduceProd",
    "Min",
    "Max",
    "Abs",
    "Sqrt",
    "Identity",
}


def static_shape_arithmetic(model: onnx.ModelProto) -> int:
    """Shape arithmetic over dimensions that are static becomes constants.

    The exporter computes slice bounds and reshape targets from ``Shape`` at run time even where the
    dimension is fixed (``chunk`` of a fused gate/up or qkv projection, partial rotary, head splits).
    TVM's importer then cannot type the result (a tensor of unknown dimensions), and the next
    ``Reshape`` or ``Gather`` of its shape fails. ONNX shape inference knows those dimensions, so
    ``Gather(Shape(x), k)`` of a static dimension k, ``Shape(x)`` of a fully static x, and every
    foldable node whose inputs are then all constant are computed here (onnx's reference evaluator,
    node by node) and replaced by ``Constant`` nodes.
    """
    from onnx import shape_inference

    g = model.graph
    try:
        inferred = shape_inference.infer_shapes(_without_weight_data(model), data_prop=True).graph
    except Exception:  # noqa: BLE001 - a graph shape inference cannot take: nothing to fold
        return 0
    dims = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if int(np.prod(i.dims)) <= 64}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    shape_of = {}  # output of a Shape node -> (its input, start)
    folded = 0
    for idx, n in enumerate(list(g.node)):  # replaced in place: the node count and order stay
        value = _static_value(n, dims, consts, shape_of, opset)
        if value is None:
            continue
        consts[n.output[0]] = value
        g.node[idx].CopyFrom(
            helper.make_node(
                "Constant", [], [n.output[0]], name=n.name + "/folded", value=numpy_helper.from_array(value)
            )
        )
        folded += 1
    return folded


def _without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference: the graph with every large initializer declared as a typed graph
    input instead of carrying its bytes (shapes are all inference needs from weights; copying hundreds
    of MB of them through the inferer cost seconds per graph)."""
    light = onnx.ModelProto()
    light.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import))
    graph = onnx.GraphProto()
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= 64 or init.name in declared:
            graph.initializer.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    light.graph.CopyFrom(graph)
    light.functions.extend(model.functions)
    return light


def _static_value(n, dims, consts, shape_of, opset) -> np.ndarray | None:
    """The value of node ``n``'s one output when it is static (see static_shape_arithmetic), else None."""
    from onnx.reference import ReferenceEvaluator

    if len(n.output) != 1 or n.domain not in ("", "ai.onnx"):
        return None
    if n.op_type == "Shape":
        d = dims.get(n.input[0])
        start = next((a.i for a in n.attribute if a.name == "start"), 0)
        end = next((a.i for a in n.attribute if a.name == "end"), None)
        if d is None:
            return None
        shape_of[n.output[0]] = (d, start)
        part = d[start:end]
        return np.array(part, np.int64) if all(x is not None and x > 0 for x in part) else None
    if n.op_type == "Gather" and n.input[0] in shape_of and len(n.input) > 1 and n.input[1] in consts:
        d, start = shape_of[n.input[0]]
        k = np.asarray(consts[n.input[1]]).astype(np.int64)
        part = d[start:]
        if k.ndim > 1 or not all(-len(part) <= int(i) < len(part) for i in k.flat):
            return None
        picked = [part[int(i)] for i in k.flat]
        if not all(x is not None and x > 0 for x in picked):
            return None
        return np.array(picked, np.int64).reshape(k.shape)
    if n.op_type not in _FOLDABLE or not n.input or not all(x in consts for x in n.input if x):
        return None
    feeds = {x: np.asarray(consts[x]) for x in n.input if x}
    try:
        graph = helper.make_graph(
            [n],
            "fold",
            [
                helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for x, v in feeds.items()
            ],
            [helper.make_tensor_value_info(o, 0, None) for o in n.output],
        )
        value = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])).run(
            None, feeds
        )[0]
    except Exception:  # noqa: BLE001 - not foldable here: the importer takes the node as it is
        return None
    value = np.asarray(value)
    return value if value.size <= 64 else None


FIXUPS = (scalar_constant_of_shape, static_shape_arithmetic)


def apply_fixups(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every fixup in place; returns how many nodes each one changed."""
    return {f.__name__: f(model) for f in FIXUPS}
