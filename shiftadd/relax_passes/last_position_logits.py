"""Add ``prefill_last``: ``main`` computing logits for the last position only.

Why: generation needs the next token's logits after a prompt, not the prompt's own. The output
matmul (the largest of the model: hidden x vocabulary) over every prompt row is most of a prefill's
work beyond the layers (128 rows x 49152 columns for SmolLM2); on the last row it is one GEMV.
``main`` keeps every position's logits (perplexity, scoring); the session and the C++ runner
prefill with ``prefill_last`` when the artifact has it. Prompts are left-padded, so the last
column is every row's last token.

The logits are found by what the graph does: the first output, back through elementwise ops with
one tensor operand (a soft-cap's tanh and scalings, casts), to ``matmul(x, W)`` with ``W`` a weight
parameter or constant and ``x`` of shape ``[batch, seq, hidden]``. That ``x`` is sliced to its last
position; everything after it is re-derived with the new shapes.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from .ir import is_op, match_weight_operand, shape_of

NAME = "prefill_last"
_ELEMENTWISE = {"relax.tanh", "relax.multiply", "relax.divide", "relax.add", "relax.subtract", "relax.astype"}


def _logits_matmul(func: relax.Function) -> relax.Var | None:
    """The variable bound to the output matmul of ``func``'s first output, or None."""
    if not isinstance(func.body, relax.SeqExpr):
        return None
    bound = {b.var: b.value for blk in func.body.blocks for b in blk.bindings if isinstance(b, relax.VarBinding)}
    weights = set(func.params[int(func.attrs["num_input"]) :]) if func.attrs and "num_input" in func.attrs else set()

    def resolve(e):
        while isinstance(e, relax.Var) and e in bound:
            e = bound[e]
        return e

    out = func.body.body
    while isinstance(out, relax.Var) and out in bound and not isinstance(bound[out], relax.Call):
        out = bound[out]
    if isinstance(out, relax.Tuple):
        out = out.fields[0]
    var = out
    for _ in range(8):  # a soft-cap is a handful of elementwise ops
        value = bound.get(var) if isinstance(var, relax.Var) else None
        if value is None:
            return None
        m = match_weight_operand(value, resolve)
        if m is not None:
            w, x = m[0], value.args[0]
            xs = shape_of(x)
            if (w in weights or isinstance(w, tvm.ir.GenericConst)) and xs is not None and len(xs) == 3:
                return var
            return None
        if not isinstance(value, relax.Call) or not any(is_op(value, n) for n in _ELEMENTWISE):
            return None
        tensors = [a for a in value.args if isinstance(a, relax.Var)]
        if len(tensors) != 1:
            return None
        var = tensors[0]
    return None


@relax.expr_functor.mutator
class _SliceLast(relax.PyExprMutator):
    """Slice the activation of the binding of ``target`` to its last position."""

    def __init__(self, mod, target: relax.Var):
        super().__init__(mod)
        self.target = target

    def visit_var_binding_(self, binding):
        if not binding.var.same_as(self.target):
            return super().visit_var_binding_(binding)
        call = binding.value
        x = self.visit_expr(call.args[0])
        seq = shape_of(x)[1]
        last = self.builder_.emit(
            relax.op.strided_slice(x, axes=[1], begin=[seq - 1], end=[seq], assume_inbound=True),
            name_hint="last_position",
        )
        new = relax.Call(call.op, [last, *[self.visit_expr(a) for a in call.args[1:]]], call.attrs)
        self.set_var_remap(binding.var, self.builder_.emit(new, name_hint=binding.var.name))


def add_last_position_logits(mod: tvm.IRModule, source: str = "main", name: str = NAME) -> tvm.IRModule:
    """``mod`` plus ``name``: ``source`` with its logits for the last position only. Raises ValueError
    when ``source`` has no output matmul over ``[batch, seq, hidden]`` activations to slice."""
    if source not in [gv.name_hint for gv, _ in mod.functions_items()]:
        raise ValueError(f"add_last_position_logits: module has no function '{source}'")
    func = copy_with_new_vars(mod[source])
    target = _logits_matmul(func)
    if target is None:
        raise ValueError(
            f"add_last_position_logits: the first output of '{source}' is not a weight matmul over "
            "[batch, seq, hidden] activations (through elementwise ops)"
        )
    mutator = _SliceLast(mod, target)
    new = mutator.visit_expr(func)
    new = relax.Function(new.params, new.body, None, new.is_pure, new.attrs).with_attr("global_symbol", name)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[name] = new
    return out


def has_logits_matmul(mod: tvm.IRModule, source: str = "main") -> bool:
    """Whether :func:`add_last_position_logits` applies to ``source``."""
    return _logits_matmul(mod[source]) is not None
