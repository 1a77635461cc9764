"""ONNX file -> Relax IRModule with the weights as named function parameters.

Weights stay parameters (``num_input`` attr marks where the real inputs end) so that the rewrite
pass sees their names, and so the compiled module keeps them in a separate params file instead of
baking hundreds of MB into the shared library.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from .onnx_fixups import apply_fixups

logger = logging.getLogger(__name__)


class ONNXImportError(ValueError):
    """The file is not a usable ONNX model, or TVM cannot import one of its ops."""


@dataclass
class ImportedModel:
    mod: "object"  # tvm.IRModule
    params: dict[str, np.ndarray]  # weight name -> value, in the order of main's trailing params
    input_names: list[str]
    output_names: list[str]
    fixups: dict[str, int] = field(default_factory=dict)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file; every failure is an error naming the file and the cause."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    if os.path.isdir(path):
        raise ONNXImportError(f"{path}: is a directory, expected an ONNX file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf DecodeError, truncated external data, ...
        raise ONNXImportError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    if not model.graph.node and not model.graph.output:
        raise ONNXImportError(f"{path}: not an ONNX model (no graph; is the file truncated or of another format?)")
    try:  # by path: the checker then reads external data itself and takes models beyond protobuf's 2 GB
        onnx.checker.check_model(path)
    except Exception as e:
        raise ONNXImportError(f"{path}: invalid ONNX model: {str(e).splitlines()[0][:300]}") from None
    return model


def _module_path(node_name: str) -> str | None:
    """'/m/model/layers.0/self_attn/q_proj/MatMul' -> 'model.layers.0.self_attn.q_proj'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    parts = parts[:-1]
    if parts[0] == "m":  # our export wrapper's attribute
        parts = parts[1:]
    return ".".join(parts) or None


def name_weights(model: onnx.ModelProto) -> int:
    """Give anonymous MatMul/Gemm weight initializers ('onnx::MatMul_650') the module path of the node
    that uses them ('model.layers.0.self_attn.q_proj.weight'), so reports and ``skip`` patterns can
    name layers. Shared or already well-named initializers are left as they are."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            if x in inits:
                users.setdefault(x, []).append(n)
    taken = set(inits) | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    renamed = 0
    for name, nodes in users.items():
        if not re.fullmatch(r"(onnx::)?[A-Za-z]+_\d+", name) or len(nodes) != 1:
            continue
        n = nodes[0]
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[1] != name:
            continue
        path = _module_path(n.name)
        if not path:
            continue
        new = path + ".weight"
        if new in taken:
            continue
        inits[name].name = new
        for i, x in enumerate(n.input):
            if x == name:
                n.input[i] = new
        taken.add(new)
        renamed += 1
    for name, init in inits.items():  # our export wrapper holds the model as attribute 'm'
        if init.name.startswith("m.") and init.name[2:] not in taken:
            old, init.name = init.name, init.name[2:]
            for n in users.get(old, []):
                for i, x in enumerate(n.input):
                    if x == old:
                        n.input[i] = init.name
            taken.add(init.name)
            renamed += 1
    return renamed


def _check_ops(model: onnx.ModelProto, path: str) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in known:
            dom = f" (domain '{n.domain}')" if n.domain not in ("", "ai.onnx") else ""
            raise ONNXImportError(
                f"{path}: ONNX op '{n.op_type}'{dom} at node '{n.name or n.output[0]}' is not supported by "
                f"TVM {_tvm_version()}'s Relax ONNX importer"
            )


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def import_onnx(source: str | os.PathLike | onnx.ModelProto) -> ImportedModel:
    """Import an ONNX model into Relax (dynamic shapes kept symbolic, weights as parameters)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    if isinstance(source, onnx.ModelProto):
        model, where = onnx.ModelProto(), "<in-memory model>"
        model.CopyFrom(source)
    else:
        where = os.fspath(source)
        model = load_onnx(where)
    _check_ops(model, where)
    renamed = name_weights(model)
    fixups = apply_fixups(model)
    fixups["name_weights"] = renamed
    init_names = {i.name for i in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in init_names]
    output_names = [o.name for o in model.graph.output]
    import warnings

    try:
        with warnings.catch_warnings(), _importer_patches(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = from_onnx(model, keep_params_in_input=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        node = getattr(e, "shiftadd_node", None)
        at = f" at ONNX node '{node[1]}' (op {node[0]})" if node else ""
        raise ONNXImportError(f"{where}: TVM's ONNX importer failed{at}: {msg[:400]}") from None
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    values = detached.get("main", [])
    params = {}
    for var, val in zip(func.params[n_in:], values):
        params[var.name] = _as_numpy(val)
    logger.info(f"imported {where}: {len(model.graph.node)} ONNX nodes, {len(params)} weights, fixups {fixups}")
    return ImportedModel(mod, params, input_names, output_names, fixups)


def _as_numpy(val) -> np.ndarray:
    """A detached weight as numpy without a copy where DLPack allows (the import already holds one
    copy of every weight; a second doubled the import's peak memory)."""
    try:
        return np.from_dlpack(val)
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return val.numpy() if hasattr(val, "numpy") else np.asarray(val)


def merge_functions(base: ImportedModel, others: dict[str, ImportedModel]):
    """``base.mod`` plus each other import's ``main`` as a function of its own name (e.g. ``decode``),
    all reading one set of weight parameters, so one params file serves every function. Weights are
    matched by what they are, not by the exporter's names: an other import's weight shares the
    base's of the same name and value, else a base weight of the same value (the exporter folds
    constants such as an embedding scale under other node names in each graph); a weight only the
    other graph has is added to ``base.params`` under a name of its own. Helper functions the
    importer made (e.g. a ``maximum`` PrimFunc for shape arithmetic) come along: one equal to the
    base's of that name is shared, a different one is renamed."""
    import tvm
    import tvm_ffi

    funcs = {gv.name_hint: (gv, f) for gv, f in base.mod.functions_items()}
    by_value = {}
    for w, v in base.params.items():
        by_value.setdefault(_value_key(v), w)
    for name, other in others.items():
        renamed = {}
        for w, v in other.params.items():
            mine = base.params.get(w)
            if mine is not None and mine.shape == v.shape and mine.dtype == v.dtype and np.array_equal(mine, v):
                continue
            same = by_value.get(_value_key(v))
            if same is None:  # only this graph has it: a parameter of its own
                same = w if w not in base.params else f"{w}.{name}"
                base.params[same] = v
                by_value[_value_key(v)] = same
            renamed[w] = same
        # the other import's weights are the base's now: hold those, not copies
        other.params = {w: base.params[renamed.get(w, w)] for w in other.params}
        main = _rename_params(other.mod["main"], renamed) if renamed else other.mod["main"]
        mapping = {}
        for gv, f in other.mod.functions_items():
            if gv.name_hint == "main":
                continue
            have = funcs.get(gv.name_hint)
            if have is not None and tvm_ffi.structural_equal(have[1], f):
                mapping[gv.name_hint] = have[0]
                continue
            new_name = gv.name_hint if have is None else f"{gv.name_hint}_{name}"
            mapping[gv.name_hint] = tvm.ir.GlobalVar(new_name)
            funcs[new_name] = (
                mapping[gv.name_hint],
                f.with_attr("global_symbol", new_name) if f.attrs and "global_symbol" in f.attrs else f,
            )
        main = _RenameGlobals(mapping).visit_expr(main) if mapping else main
        funcs[name] = (tvm.ir.GlobalVar(name), main.with_attr("global_symbol", name))
    return tvm.IRModule({gv: f for gv, f in funcs.values()}, attrs=base.mod.attrs)


@contextlib.contextmanager
def _importer_patches():
    """Limitations of TVM 0.27's ONNX importer, patched for the import's duration only:

    * ``Gather`` from a shape computed at run time (``Shape`` of a tensor whose dimensions the
      importer does not know is a Shape-typed call, not a ShapeExpr literal): the converter turns
      only literals into tensors, then fails in ``shape_of`` (partial rotary in GPT-NeoX, Phi-3).
      Such a shape is made a tensor first, as the converter does for literals.
    * ``Range`` whose bounds are shape values (``Range(0, Shape(x)[0], 1)``: BERT's and the new
      ``transformers`` masks' position vectors): the converter computes the length in tensors and
      reads it back as a fresh symbolic length defined in the middle of the function, which TVM's
      memory planning then allocates for before it is known ("has not been computed" at build).
      With integer bounds that are constants or shape expressions the length is a shape expression
      itself: ``arange`` is called on them directly and the output keeps the input's dimensions.
    * ``Resize`` to ``sizes`` built from a shape with a symbolic batch (``Concat(Shape(x)[:2], [H, W])``,
      the usual export of ``interpolate(size=...)``): the converter reads only the spatial sizes
      but converts all four to ints. The batch and channel entries are dropped first.
    * A converter's failure carries the ONNX node and op it was converting (``shiftadd_node``).
    """
    import tvm
    import tvm.relax.frontend.onnx.onnx_frontend as F
    from tvm import relax

    gather, convert, range_, resize = F.Gather, F.ONNXGraphImporter._convert_operator, F.Range, F.Resize

    class Gather(gather):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            data = inputs[0]
            if not isinstance(data, relax.ShapeExpr) and isinstance(getattr(data, "ty", None), relax.ShapeType):
                inputs = F.onnx_input([bb.normalize(relax.op.shape_to_tensor(data)), *list(inputs)[1:]])
            return gather._impl_v13(bb, inputs, attr, params)

    class Range(range_):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            bounds = [_shape_scalar(F.get_constant(x, params)) for x in list(inputs)[:3]]
            if all(b is not None for b in bounds) and any(not isinstance(b, int) for b in bounds):
                start, limit, delta = bounds
                if isinstance(delta, int) and delta > 0:
                    return relax.op.arange(start, limit, delta, dtype=_range_dtype(inputs[0]))
            return range_._impl_v12(bb, inputs, attr, params)

    class Resize(resize):
        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            sizes = F.get_constant(inputs[3], params) if len(inputs) > 3 else None
            if isinstance(sizes, relax.ShapeExpr) and len(sizes.values) > 2:
                spatial = list(sizes.values)[2:]
                if all(isinstance(v, tvm.tirx.IntImm) for v in spatial):
                    inputs = F.onnx_input([*list(inputs)[:3], relax.ShapeExpr([1, 1, *spatial])])
            return resize._impl_v18(bb, inputs, attr, params)

    def convert_operator(self, op_name, inputs, attrs, opset):
        try:
            return convert(self, op_name, inputs, attrs, opset)
        except Exception as e:
            if not hasattr(e, "shiftadd_node"):
                e.shiftadd_node = (op_name, attrs.get("tvm_custom", {}).get("name", "?"))
            raise

    patched = (Gather, convert_operator, Range, Resize)
    F.Gather, F.ONNXGraphImporter._convert_operator, F.Range, F.Resize = patched
    try:
        yield
    finally:
        F.Gather, F.ONNXGraphImporter._convert_operator, F.Range, F.Resize = gather, convert, range_, resize


def _shape_scalar(x):
    """An integer scalar the importer holds as a constant or a shape expression (a PrimExpr) -> int
    or int64 PrimExpr; None for anything computed in tensors at run time."""
    import tvm
    from tvm import tirx

    if isinstance(x, tvm.ir.GenericConst) and "int" in str(x.value.dtype) and x.value.numpy().size == 1:
        return int(x.value.numpy().reshape(-1)[0])
    if tvm.ir.is_prim_expr(x) and "int" in _prim_dtype(x):
        if isinstance(x, tirx.IntImm):
            return int(x.value)
        return x if _prim_dtype(x) == "int64" else tirx.Cast("int64", x)
    return None


def _prim_dtype(x) -> str:
    """A PrimExpr's dtype (a ``tirx.Var`` keeps it in its type, not in ``dtype``)."""
    try:
        return str(x.dtype)
    except Exception:  # noqa: BLE001 - tvm raises a plain error for Vars
        return str(x.ty)


def _range_dtype(start) -> str:
    import tvm

    if tvm.ir.is_prim_expr(start):
        return _prim_dtype(start)
    ty = getattr(start, "ty", None) or getattr(start, "struct_info", None)
    return str(getattr(ty, "dtype", "int64"))


def _value_key(v: np.ndarray) -> tuple:
    import hashlib

    v = np.asarray(v, order="C")
    return str(v.dtype), v.shape, hashlib.sha1(v.view(np.uint8).reshape(-1)).hexdigest()


def _rename_params(func, renamed: dict[str, str]):
    """``func`` with its weight parameters named as ``renamed`` says (inputs keep their names)."""
    from tvm import relax

    n_in = int(func.attrs["num_input"])
    new = {p: relax.Var(renamed[p.name], p.ty) for p in func.params[n_in:] if p.name in renamed}

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_var_def_(self, var):
            return new.get(var, var)

        def visit_var_(self, var):
            return new.get(var, var)

    params = [new.get(p, p) for p in func.params]
    body = Rename().visit_expr(func.body)
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)


def _rename_globals_class():
    from tvm import relax

    @relax.expr_functor.mutator
    class RenameGlobals(relax.PyExprMutator):
        """Point calls at the merged module's GlobalVars (matched by name)."""

        def __init__(self, mapping):
            super().__init__()
            self.mapping = mapping

        def visit_global_var_(self, gv):
            return self.mapping.get(gv.name_hint, gv)

    return RenameGlobals


def _RenameGlobals(mapping):  # noqa: N802 - a class made on first use (tvm imports lazily here)
    return _rename_globals_class()(mapping)
