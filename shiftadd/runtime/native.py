"""Build and run ``shiftadd-run``, the native C++ runner (shiftadd/runtime/runner/, with its CMakeLists.txt).

The runner loads an artifact with the TVM runtime only (no Python, no compiler library), so it
shows what deployment costs: load time, prefill and per-token decode latency, peak memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "runner"  # ships in the package: sources + CMakeLists.txt
BINARY = "shiftadd-run"


def _source_files() -> list[Path]:
    files = [SOURCES / "CMakeLists.txt", *sorted(SOURCES.glob("*.cc")), *sorted(SOURCES.glob("*.h"))]
    if not files[0].is_file() or len(files) < 2:
        raise RuntimeError(
            f"the runner's sources are missing from {SOURCES} (CMakeLists.txt, *.cc): reinstall shiftadd"
        )
    return files


def _key() -> str:
    """Sources + TVM runtime versions + interpreter: a new key whenever the binary would differ
    (its RPATH points into this interpreter's site-packages)."""
    h = hashlib.sha256()
    for f in _source_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            h.update(f"{dist}={metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=?\0".encode())
    h.update(sys.executable.encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"{what} failed (exit {r.returncode}: {' '.join(cmd)}):\n{tail}")


def build_runner(build_dir: str | os.PathLike | None = None) -> Path:
    """Configure and build the runner with CMake; returns the binary's path.

    The default build folder is keyed by the sources and TVM version
    ($SHIFTADD_CACHE or ~/.cache/shiftadd, then runner/<key>), so a finished build is reused and a
    changed source gets a fresh one. A lock keeps concurrent callers from building the same folder twice.
    """
    if shutil.which("cmake") is None:
        raise RuntimeError("building shiftadd-run needs cmake (>= 3.18) on PATH")
    key = _key()
    if build_dir is None:
        base = Path(os.environ.get("SHIFTADD_CACHE", Path.home() / ".cache" / "shiftadd"))
        build_dir = base / "runner" / key
    build = Path(build_dir).resolve()
    build.mkdir(parents=True, exist_ok=True)
    binary, stamp = build / BINARY, build / ".shiftadd-key"
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and stamp.is_file() and stamp.read_text() == key:
            return binary
        stamp.unlink(missing_ok=True)
        if not (build / "CMakeCache.txt").is_file():
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(
                [
                    "cmake",
                    "-S",
                    str(SOURCES),
                    "-B",
                    str(build),
                    *gen,
                    "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython_EXECUTABLE={sys.executable}",
                ],
                "configuring shiftadd-run (cmake)",
            )
        # one job: the two runner sources build in seconds, and the machine may be shared
        _run(
            ["cmake", "--build", str(build), "--target", BINARY, "--parallel", "1"],
            "building shiftadd-run (cmake --build)",
        )
        if not binary.is_file():
            raise RuntimeError(f"cmake reported success but {binary} is missing")
        stamp.write_text(key)
    return binary


def run_runner(
    so_path: str | os.PathLike,
    ids,
    max_new_tokens: int = 16,
    threads: int | None = None,
    binary: str | os.PathLike | None = None,
    env: dict | None = None,
) -> dict:
    """Greedy-decode ``ids`` with the native runner: ``{"ids": new ids, "timing": {...}}``.

    ``env``: the runner's environment (default this process's). Raises RuntimeError with the
    runner's message (``shiftadd-run: ...``) when it exits non-zero.
    """
    exe = Path(binary) if binary is not None else build_runner()
    cmd = [
        str(exe),
        str(so_path),
        "--ids",
        " ".join(str(int(i)) for i in ids),
        "--max-new-tokens",
        str(int(max_new_tokens)),
    ]
    if threads is not None:
        cmd += ["--threads", str(int(threads))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr.strip() or f"shiftadd-run exited with {r.returncode}")
    out = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition(":")
        if key == "ids":
            out["ids"] = [int(t) for t in value.split()]
        elif key == "timing":
            out["timing"] = json.loads(value)
    if set(out) != {"ids", "timing"}:
        raise RuntimeError(f"shiftadd-run: unexpected output:\n{r.stdout}")
    return out


if __name__ == "__main__":  # python -m shiftadd.runtime.native: build (or find) the runner, print its path
    print(build_runner())
