"""IR helpers our Relax passes share: matching calls and weights, following bindings, rewriting
every function of a module, dropping parameters a rewrite left unused."""

from __future__ import annotations

import tvm
from tvm import relax


def shape_of(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return list(ty.shape.values)


def is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def mutate_functions(mutator, mod: tvm.IRModule, dce=None) -> tvm.IRModule:
    """Run ``mutator`` (a PyExprMutator over ``mod``) on every Relax function of ``mod``. ``dce``: a
    callable asked afterwards (e.g. "did it rewrite anything?"); if true, bindings left without users
    are removed (an untouched module stays structurally equal)."""
    names = []
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(f))
            names.append(gv.name_hint)
    out = mutator.builder_.get()
    return relax.transform.DeadCodeElimination(names)(out) if dce is not None and dce() else out


def resolve_binding(mutator, expr):
    """``expr`` with variables replaced by what ``mutator`` saw them bound to, until a function
    parameter (weights included) or a non-variable is reached."""
    while isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if bound is None:
            break
        expr = bound
    return expr


def match_weight_operand(call, resolve):
    """For ``R.matmul(x, W)`` or ``R.matmul(x, R.permute_dims(W, [1, 0]))``: (W, transposed), with
    ``resolve`` following variable bindings; None for any other call. W may be anything: the caller
    decides whether it is a known weight."""
    if not is_op(call, "relax.matmul"):
        return None
    rhs = resolve(call.args[1])
    if not is_op(rhs, "relax.permute_dims"):
        return rhs, False
    axes = rhs.attrs.axes
    if axes is not None and [int(a) for a in axes] != [1, 0]:
        return None
    return resolve(rhs.args[0]), True


def drop_unused_params(mod, func_name, values):
    """Remove weight parameters the body no longer reads; returns (module, params in signature order)."""
    func = mod[func_name]
    n_in = int(func.attrs["num_input"])
    used = {v.name for v in relax.analysis.free_vars(func.body)}
    keep = list(func.params[:n_in]) + [v for v in func.params[n_in:] if v.name in used]
    new = relax.Function(keep, func.body, func.ret_ty, func.is_pure, func.attrs)
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    mod[func_name] = new
    return mod, {v.name: values[v.name] for v in keep[n_in:]}


def embedding_rows(func, input_names: list[str], name: str = "input_ids") -> int | None:
    """Rows of the weight table that input ``name`` indexes (``take(W, f(input_ids))``, with ``f``
    the importer's index normalisation), or None: the vocabulary, found by what the graph does
    rather than by weight names (a BERT has three embedding tables)."""
    n_in = int(func.attrs["num_input"])
    found = [p for p, n in zip(func.params[:n_in], input_names) if n == name]
    if not found or not isinstance(func.body, relax.SeqExpr):
        return None
    derived, weights = {found[0]}, set(func.params[n_in:])
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call):
                continue
            args = [a for a in v.args if isinstance(a, relax.Var)]
            if is_op(v, "relax.take") and len(v.args) == 2 and v.args[0] in weights and v.args[1] in derived:
                shape = shape_of(v.args[0])
                return int(shape[0]) if shape and isinstance(shape[0], tvm.tirx.IntImm) else None
            if not is_op(v, "relax.take") and any(a in derived for a in args):
                derived.add(b.var)
    return None
