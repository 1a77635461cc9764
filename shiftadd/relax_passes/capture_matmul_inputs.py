"""Relax pass for calibration: make ``main`` return the input of every weight matmul.

Each matched ``R.matmul(x, W)`` (same pattern as the rewrite pass) gets ``x`` flattened to [M, K]
emitted as a dataflow *output*; matmuls that read the same ``x`` (Q/K/V, gate/up) share one output.
``main`` then returns ``(x_1, x_2, ...)`` (or ``(result, x_1, ...)`` with ``keep_result``; dropping
the result lets dead-code elimination remove what only the result needs, such as an LLM's lm_head).
Running the compiled module on calibration inputs yields every layer's activations, from which
``shiftadd.calibrate`` accumulates the Hessians ``Σ x xᵀ`` in float64. Works on any imported ONNX
model, not only Hugging Face ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.ir import GenericConst

from .ir import match_weight_operand, resolve_binding


@dataclass
class CapturedMatmul:
    """A weight matmul whose input the instrumented ``main`` returns (at output ``index``)."""

    name: str  # weight parameter name (``const_<i>`` for an inline constant)
    index: int  # position in the returned tuple (after the result, when kept)
    k: int
    transposed: bool  # stored weight is [N, K] (Gemm transB), not [K, N]
    is_param: bool  # a function parameter (replaceable at run time), not an inline constant


@relax.expr_functor.mutator
class _Capture(relax.PyExprMutator):
    def __init__(self, mod, params, skip):
        super().__init__(mod)
        self.params = params
        self.skip = [re.compile(p) for p in skip]
        self.outputs: list[relax.Var] = []
        self.by_input: dict = {}
        self.captured: list[CapturedMatmul] = []
        self.n_const = 0

    def _resolve(self, expr):
        return resolve_binding(self, expr)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        m = match_weight_operand(call, self._resolve)
        if m is None:
            return call
        rhs, transposed = m
        if isinstance(rhs, relax.Var) and rhs.name in self.params and self.params[rhs.name].ndim == 2:
            name, shape, is_param = rhs.name, self.params[rhs.name].shape, True
        elif isinstance(rhs, GenericConst) and len(rhs.value.shape) == 2:
            self.n_const += 1
            name, shape, is_param = f"const_{self.n_const}", tuple(int(d) for d in rhs.value.shape), False
        else:
            return call
        if any(p.search(name) for p in self.skip):
            return call
        k = int(shape[1] if transposed else shape[0])
        x = call.args[0]
        if x.ty.dtype != "float32":
            return call
        if x not in self.by_input:
            flat = self.builder_.emit_output(
                relax.op.reshape(x, relax.ShapeExpr([-1, k])) if len(x.ty.shape.values) != 2 else x
            )
            self.by_input[x] = len(self.outputs)
            self.outputs.append(flat)
        self.captured.append(CapturedMatmul(name, self.by_input[x], k, transposed, is_param))
        return call


def capture_matmul_inputs(
    mod: tvm.IRModule,
    params: dict,
    skip: tuple[str, ...] = ("lm_head",),
    func_name: str = "main",
    keep_result: bool = False,
    require: bool = True,
):
    """Returns (module whose ``main`` returns ([result,] *inputs), [CapturedMatmul] in model order).
    With ``require`` (calibration), a model without weight matmuls is an error."""
    cap = _Capture(mod, params, skip)
    func = mod[func_name]
    new = cap.visit_expr(func)
    if not cap.captured:
        if not require:
            return mod, []
        raise ValueError("calibration: the model has no weight matmuls to calibrate")
    body = new.body
    outs = ([body.body] if keep_result else []) + cap.outputs
    if keep_result:
        for c in cap.captured:
            c.index += 1
    ret = relax.TupleType([o.ty for o in outs])
    new = relax.Function(new.params, relax.SeqExpr(body.blocks, relax.Tuple(outs)), ret, new.is_pure, new.attrs)
    cap.builder_.update_func(cap.builder_.get().get_global_var(func_name), new)
    out = relax.transform.Normalize()(cap.builder_.get())
    out = relax.transform.DeadCodeElimination([func_name])(out)
    return out, cap.captured
