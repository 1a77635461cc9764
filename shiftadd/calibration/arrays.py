"""Calibration feeds from arrays the user gives (images for a ViT, features for any ONNX model).

Why: text windows only feed models with token inputs; an ONNX file with other inputs was fitted
weight-only. A ``.npz`` whose keys are the model's input names and whose arrays stack samples along
the first (batch) axis calibrates any graph: each sample runs through the same capture as text.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def array_batches(path: str | os.PathLike, inputs: list[dict], batch: int = 1) -> list[dict]:
    """Feeds of ``batch`` samples each from the ``.npz`` at ``path`` (one array per model input,
    samples along axis 0). ``inputs``: the model's input specs (name, dtype, shape; symbolic dims
    as names). Raises ValueError naming the file, the input and what was expected."""
    p = Path(path)
    if p.suffix != ".npz":
        raise ValueError(f"calibration data {p}: expected a .npz file (one array per model input), got '{p.suffix}'")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ValueError(f"calibration data {p}: no such file") from None
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a corrupt archive
        raise ValueError(f"calibration data {p}: cannot be read as .npz ({type(e).__name__}: {e})") from None
    names = [i["name"] for i in inputs]
    missing = [n for n in names if n not in arrays]
    unknown = sorted(set(arrays) - set(names))
    if missing or unknown:
        raise ValueError(
            f"calibration data {p}: arrays {sorted(arrays)}; the model's inputs are {names}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {unknown})" if unknown else "")
        )
    samples = None
    for spec in inputs:
        name, a = spec["name"], arrays[spec["name"]]
        want = spec["shape"]
        if str(a.dtype) != spec["dtype"]:
            raise ValueError(f"calibration data {p}: '{name}' is {a.dtype}, the model takes {spec['dtype']}")
        if a.ndim != len(want) or a.shape[0] == 0:
            raise ValueError(
                f"calibration data {p}: '{name}' has shape {a.shape}; expected samples stacked along "
                f"the first axis of the model's input shape {want}"
            )
        for axis, (d, w) in enumerate(zip(a.shape[1:], want[1:]), start=1):
            if w.isdigit() and int(w) != d:
                raise ValueError(f"calibration data {p}: '{name}' has {d} at axis {axis}, the model takes {w} ({want})")
        if samples is not None and a.shape[0] != samples:
            raise ValueError(f"calibration data {p}: arrays hold different sample counts ({samples} and {a.shape[0]})")
        samples = a.shape[0]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"calibration data {p}: '{name}' holds NaN or Inf")
    if inputs and inputs[0]["shape"][0].isdigit():
        batch = int(inputs[0]["shape"][0])  # a static batch: feed exactly that many
    if samples < batch:
        raise ValueError(f"calibration data {p}: {samples} samples, fewer than one batch of {batch}")
    return [
        {n: np.ascontiguousarray(arrays[n][s : s + batch]) for n in names} for s in range(0, samples - batch + 1, batch)
    ]
