"""Add ``decode_step`` and ``kv_resize``: the one-token decode over a preallocated cache, written in place.

Why: the exported decode step returns every layer's keys and values as ``concat(past, new)``, so each
step allocates and copies the whole cache (two tensors per layer) to append one row, and the VM
allocates those buffers anew at every step. ``decode_step`` is ``decode_one`` with each such concat
replaced by a write of the new rows into a cache tensor of fixed capacity ``[B, H, capacity, D]``
(``call_tir_inplace``: the function's outputs are its cache inputs, updated). Attention reads the
first ``total`` rows of that tensor: a ``strided_slice`` here, which :func:`attention_reads_cache`
(lower phase) removes by handing the cache itself to our attention kernels (they take a capacity
beside the length). The cache length is no input of its own: ``total`` is the attention mask's
length, the past is ``total`` minus the new tokens.

``kv_resize(k0, v0, ..., R.shape([capacity]))`` copies caches into tensors of a new capacity (rows
past the old length zero): the runtimes turn the prompt's cache from the prefill into a
preallocated one with it, on whatever device the artifact runs on.

Found by what the graph does: inputs of rank 4 that are read only as the first operand of a concat
along axis 2 (the sequence axis of ``[B, H, seq, D]``). A decode graph with no such input, or one
reading its past otherwise, gets no ``decode_step`` (the runtimes then use ``decode_one``).
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars
from tvm.script import tirx as T

from .ir import is_op, mutate_functions, resolve_binding, shape_of

logger = logging.getLogger(__name__)

NAME = "decode_step"
RESIZE = "kv_resize"
MASK = "attention_mask"  # [batch, past + new]: the export's mask (frontend/hf.py)


def append_kernel(heads: int, d: int, dtype: str) -> tvm.tirx.PrimFunc:
    """``cache[b, h, offset + j, :] = new[b, h, j, :]``, in place (the first argument is the output)."""

    @T.prim_func(private=True, s_tir=True)
    def kv_append(cache_h: T.handle, new_h: T.handle, offset: T.int64):
        T.func_attr({"tirx.noalias": True})
        b, cap, m = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (b, heads, cap, d), dtype)
        new = T.match_buffer(new_h, (b, heads, m, d), dtype)
        assert offset >= 0 and offset + m <= cap, "shiftadd kv_append: the cache is too short for its new rows"
        for i, h, j, c in T.grid(b, heads, m, d):
            with T.sblock("append"):
                vi, vh, vj, vc = T.axis.remap("SSSS", [i, h, j, c])
                cache[vi, vh, offset + vj, vc] = new[vi, vh, vj, vc]

    return kv_append.with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})


def copy_kernel(heads: int, d: int, dtype: str) -> tvm.tirx.PrimFunc:
    """``dst[b, h, j, :] = src[b, h, j, :]`` for the rows both have, zero for the rest of ``dst``."""

    @T.prim_func(private=True, s_tir=True)
    def kv_copy(src_h: T.handle, dst_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        b, n, cap = T.int64(), T.int64(), T.int64()
        src = T.match_buffer(src_h, (b, heads, n, d), dtype)
        dst = T.match_buffer(dst_h, (b, heads, cap, d), dtype)
        for i, h, j, c in T.grid(b, heads, cap, d):
            with T.sblock("copy"):
                vi, vh, vj, vc = T.axis.remap("SSSS", [i, h, j, c])
                dst[vi, vh, vj, vc] = T.if_then_else(vj < n, src[vi, vh, T.min(vj, n - 1), vc], T.Cast(dtype, 0))

    return kv_copy.with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})


def _bindings(func) -> dict:
    return {b.var: b.value for blk in func.body.blocks for b in blk.bindings if isinstance(b, relax.VarBinding)}


def cache_inputs(func: relax.Function) -> dict:
    """``{input parameter: the concat var appending to it}`` for every input read only as the first
    operand of ``concat((past, new), axis=2)`` with a rank-4 result; empty if any cache-shaped input
    is read otherwise."""
    n_in = int(func.attrs["num_input"])
    inputs = set(func.params[:n_in])
    found, other_uses = {}, set()
    for var, value in _bindings(func).items():
        if not isinstance(value, relax.Call):
            continue
        if is_op(value, "relax.concat") and isinstance(value.args[0], relax.Tuple):
            fields = list(value.args[0].fields)
            rank = len(shape_of(var) or [])
            axis = int(value.attrs.axis) % rank if rank else None
            if len(fields) == 2 and fields[0] in inputs and rank == 4 and axis == 2 and fields[0] not in found:
                found[fields[0]] = var
                other_uses.update(a for a in fields[1:] if a in inputs)
                continue
        other_uses.update(a for a in relax.analysis.free_vars(value) if a in inputs)
    if other_uses & set(found):
        return {}
    return found


@relax.expr_functor.mutator
class _WriteInPlace(relax.PyExprMutator):
    """Each concat onto a past input -> an in-place write into the cache input, then a view of its
    first ``total`` rows; the function's output tuple returns the caches."""

    def __init__(self, mod, concats: dict, caches: dict, total, result_var):
        super().__init__(mod)
        self.concats, self.caches, self.total, self.result = concats, caches, total, result_var
        self.written = {}  # concat var -> the cache var after the write
        self.kernels = {}

    def _append(self, heads: int, d: int, dtype: str):
        key = (heads, d, dtype)
        if key not in self.kernels:
            name = f"shiftadd_kv_append_h{heads}_d{d}_{dtype}"
            self.kernels[key] = self.builder_.add_func(
                append_kernel(heads, d, dtype).with_attr("global_symbol", name), name
            )
        return self.kernels[key]

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if var in self.concats:
            past = self.concats[var]
            cache = self.caches[past]
            new = self.visit_expr(value.args[0].fields[1])
            b, h, m, d = shape_of(new)
            cty = cache.ty
            gv = self._append(int(h), int(d), str(cty.dtype))
            offset = relax.prim_value(self.total - m)
            written = self.builder_.emit(
                relax.call_tir_inplace(gv, [cache, new, offset], [0], cty), name_hint=f"{var.name}_cache"
            )
            self.written[var] = written
            view = relax.op.strided_slice(written, axes=[2], begin=[0], end=[self.total], assume_inbound=True)
            self.set_var_remap(var, self.builder_.emit(view, name_hint=var.name))
            return
        if var.same_as(self.result) and isinstance(value, relax.Tuple):
            fields = [self.written.get(f, None) if isinstance(f, relax.Var) else None for f in value.fields]
            fields = [w if w is not None else self.visit_expr(f) for w, f in zip(fields, value.fields)]
            self.set_var_remap(var, self.builder_.emit(relax.Tuple(fields), name_hint=var.name))
            return
        super().visit_var_binding_(binding)


def _result_var(func):
    out = func.body.body
    return out if isinstance(out, relax.Var) else None


def add_decode_step(
    mod: tvm.IRModule, source: str = "decode_one", name: str = NAME, max_context: int | None = None
) -> tvm.IRModule:
    """``mod`` plus ``name`` (``source`` over preallocated caches, written in place) and
    :data:`RESIZE`. Raises ValueError when ``source`` is missing, has no attention mask input of
    shape [batch, total], or no past inputs only appended to (see :func:`cache_inputs`).

    ``max_context`` (the model's context, which the runtimes never let ``total`` exceed) becomes
    ``total``'s upper bound for the memory planner: the step's buffers sized by the context
    (scores, probabilities) are then planned once like the static ones instead of allocated per
    call."""
    if max_context is not None and max_context < 1:
        raise ValueError(f"add_decode_step: max_context must be >= 1, got {max_context}")
    names = {gv.name_hint for gv, _ in mod.functions_items()}
    if source not in names:
        raise ValueError(f"add_decode_step: module has no function '{source}' (has {sorted(names)})")
    func = copy_with_new_vars(mod[source])
    n_in = int(func.attrs["num_input"])
    params = {p.name: p for p in func.params[:n_in]}
    mask, ids = params.get(MASK), params.get("input_ids")
    mshape = shape_of(mask) if mask is not None else None
    if mshape is None or len(mshape) != 2 or not isinstance(mshape[1], tvm.tirx.Var) or ids is None:
        raise ValueError(f"add_decode_step: '{source}' has no inputs input_ids and {MASK} [batch, total]")
    total, new_rows = mshape[1], shape_of(ids)[1]
    concats = cache_inputs(func)
    if not concats:
        raise ValueError(f"add_decode_step: '{source}' has no past keys/values only appended to (concat on axis 2)")
    pasts = {shape_of(p)[2] for p in concats}
    if len(pasts) != 1 or not isinstance(next(iter(pasts)), tvm.tirx.Var):
        raise ValueError(f"add_decode_step: the past inputs of '{source}' do not share one symbolic length")
    past = next(iter(pasts))
    # the past length is the mask's minus the new tokens: no input of its own
    func = relax.transform.BindSymbolicVars({past: total - new_rows}, func_name=source)(tvm.IRModule({source: func}))[
        source
    ]
    concats = cache_inputs(func)
    cap = tvm.tirx.Var("capacity", "int64")
    caches = {}
    for p in concats:
        b, h, _, d = shape_of(p)
        caches[p] = relax.Var(p.name, relax.TensorType([b, h, cap, d], p.ty.dtype))
    bound = dict(zip(concats.values(), concats.keys()))  # concat var -> past input
    new_params = [caches.get(p, p) for p in func.params]
    shell = relax.Function(new_params, func.body, None, func.is_pure, func.attrs)
    mutator = _WriteInPlace(mod, bound, caches, total, _result_var(func))
    out = mutator.visit_expr(shell)
    out = relax.Function(out.params, out.body, None, out.is_pure, out.attrs).with_attr("global_symbol", name)
    if max_context is not None:
        out = out.with_attr("tir_var_upper_bound", {total.name: int(max_context)})
    mutator.builder_.add_func(out, name)
    bb = relax.BlockBuilder(mutator.builder_.get())
    _add_resize_function(bb, list(caches.values()))
    return relax.transform.DeadCodeElimination([name])(bb.get())


def _add_resize_function(bb, caches: list) -> None:
    """``kv_resize(k0, v0, ..., R.shape([capacity]))``: each cache copied into ``capacity`` rows."""
    n = tvm.tirx.Var("length", "int64")
    cap = tvm.tirx.Var("capacity", "int64")
    ins = []
    for c in caches:
        b, h, _, d = shape_of(c)
        ins.append(relax.Var(c.name, relax.TensorType([b, h, n, d], c.ty.dtype)))
    size = relax.Var("capacity", relax.ShapeType([cap]))
    kernels = {}
    with bb.function(RESIZE, [*ins, size], {"num_input": len(ins) + 1}):
        with bb.dataflow():
            outs = []
            for x in ins:
                b, h, _, d = shape_of(x)
                key = (int(h), int(d), str(x.ty.dtype))
                if key not in kernels:
                    kname = f"shiftadd_kv_copy_h{key[0]}_d{key[1]}_{key[2]}"
                    kernels[key] = bb.add_func(copy_kernel(*key).with_attr("global_symbol", kname), kname)
                outs.append(bb.emit(relax.call_tir(kernels[key], [x], relax.TensorType([b, h, cap, d], x.ty.dtype))))
            res = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(res)


# -- lower phase: attention over the cache itself ----------------------------------------------


def _kernel_name(call) -> str | None:
    if not is_op(call, "relax.call_tir"):
        return None
    gv = call.args[0]
    return gv.name_hint if isinstance(gv, tvm.ir.GlobalVar) else None


def _prefix_of_rows(call) -> bool:
    """``strided_slice(x, axes=[2], begin=[0], ...)`` with unit strides: the first rows of axis 2."""
    axes, begin = ([f for f in a.fields] if isinstance(a, relax.Tuple) else None for a in call.args[1:3])
    strides = call.args[4].fields if len(call.args) > 4 and isinstance(call.args[4], relax.Tuple) else [1]
    return (
        axes is not None
        and begin is not None
        and [int(a) for a in axes] == [2]
        and all(isinstance(b, tvm.tirx.IntImm) and int(b) == 0 for b in begin)
        and all(isinstance(t, (int, tvm.tirx.IntImm)) and int(t) == 1 for t in strides)
    )


@relax.expr_functor.mutator
class _ReadCache(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = _kernel_name(call)
        if name is None or not (name.startswith("shiftadd_scores_") or name.startswith("shiftadd_values_")):
            return call
        args = list(call.args[1].fields)
        src = resolve_binding(self, args[1])
        if not is_op(src, "relax.strided_slice") or not _prefix_of_rows(src):
            return call
        cache = src.args[0]
        if not is_op(resolve_binding(self, cache), "relax.call_tir_inplace"):
            return call
        self.count += 1
        return relax.call_tir(call.args[0], [args[0], cache], call.ty)


def attention_reads_cache(mod: tvm.IRModule, _knob_of=None) -> tuple[tvm.IRModule, int, dict]:
    """Our attention kernels read the written cache itself instead of its first ``total`` rows'
    copy (they take the capacity from the tensor and the length from their output); the copies
    left without users are removed. Returns (module, calls changed, {})."""
    rw = _ReadCache(mod)
    return mutate_functions(rw, mod, dce=lambda: rw.count), rw.count, {}
