"""Compilation targets by short name."""

from __future__ import annotations

import json
import os


def resolve_target(spec: str):
    """'cpu' (this machine's CPU, LLVM), or a TVM target JSON dict such as
    '{"kind": "llvm", "mcpu": "znver3"}'. GPU targets are not supported yet."""
    from tvm.target import Target

    if spec in ("cpu", "llvm", "host"):
        host = Target.from_device("cpu")
        return Target(
            {"kind": "llvm", "mcpu": str(host.attrs.get("mcpu", "generic")), "num-cores": os.cpu_count() or 1}
        )
    if spec.lstrip().startswith("{"):
        try:
            cfg = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"target: invalid JSON ({e})") from None
        if cfg.get("kind") != "llvm":
            raise ValueError(f"target kind {cfg.get('kind')!r} is not supported yet (only 'llvm' CPU targets)")
        cfg.setdefault("num-cores", os.cpu_count() or 1)
        try:
            return Target(cfg)
        except Exception as e:  # noqa: BLE001 - TVM raises several error types here
            raise ValueError(f"target {spec}: {str(e).splitlines()[0]}") from None
    raise ValueError(
        f"unknown target {spec!r}: expected 'cpu' or a JSON dict like "
        f'\'{{"kind": "llvm", "mcpu": "znver3"}}\' (CUDA is not supported yet)'
    )


def target_dict(target) -> dict:
    import tvm_ffi  # noqa: F401  (export() returns a tvm_ffi Map)

    return {str(k): (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in target.export().items()}
