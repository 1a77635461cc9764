"""Add ``decode_one``: the KV-cached ``decode`` function specialised to one sequence and one new token.

Why: with ``batch`` and ``seq`` symbolic, every intermediate tensor of a decode step has a symbolic
shape, so the VM computes shapes and allocates buffers at every step (docs/ENGINEERING.md). Bound to
1, everything but the attention over the cache is static: the memory planner allocates those buffers
once, the shape work goes away, and the float operators become static PrimFuncs that MetaSchedule
can tune (it keys workloads by exact shape). The general ``decode`` stays for batches and several
tokens per call; the session picks ``decode_one`` when the call fits it. Same parameters, same
kernels, same weights.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from ..frontend.onnx_import import _RenameGlobals

NAME = "decode_one"
OPAQUE = 8  # relax's OpPatternKind.kOpaque: FuseOps leaves such a call alone
BOUND = {"batch": 1, "seq": 1}  # the symbolic dims of our decode export (frontend/hf.py)


def add_decode_one(mod: tvm.IRModule, source: str = "decode", name: str = NAME) -> tvm.IRModule:
    """``mod`` plus ``name``: a copy of ``source`` with ``batch`` = ``seq`` = 1 bound.

    Raises ValueError when ``source`` is missing or does not have both symbolic dims (then a
    specialised copy would be the same function)."""
    names = {gv.name_hint for gv, _ in mod.functions_items()}
    if source not in names:
        raise ValueError(f"add_decode_one: module has no function '{source}' (has {sorted(names)})")
    func = mod[source]
    free = {v.name for v in relax.analysis.defined_symbolic_vars(func)}
    missing = sorted(set(BOUND) - free)
    if missing:
        raise ValueError(f"add_decode_one: '{source}' has no symbolic dims {missing} to bind (has {sorted(free)})")
    bb = relax.BlockBuilder(tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs))
    copy = copy_with_new_vars(func).with_attr("global_symbol", name)  # passes want each var defined once
    # PrimFuncs the importer made with symbolic shapes (e.g. ``maximum``) cannot take the static
    # tensors inside a fused group (FuseTIR fails); the copy calls opaque copies of them instead
    renamed = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and int((f.attrs or {}).get("op_pattern", 0)) != OPAQUE:
            new = f"{gv.name_hint}_{name}"
            renamed[gv.name_hint] = bb.add_func(f.with_attrs({"global_symbol": new, "op_pattern": OPAQUE}), new)
    bb.add_func(_RenameGlobals(renamed).visit_expr(copy) if renamed else copy, name)
    out = bb.finalize()
    return relax.transform.BindSymbolicVars(BOUND, func_name=name)(out)
