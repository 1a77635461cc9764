"""The native runner ``shiftadd-run`` (C++, TVM runtime only): same greedy ids as the Python session,
with the KV cache (``decode``) and without it (older artifacts: main only), and clear refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import VOCAB, _tiny

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="building shiftadd-run needs cmake")

IDS = [5, 17, 42, 3]
TIMING_KEYS = {"load_s", "prefill_ms", "decode_ms_per_token", "tokens", "peak_rss_mb"}


@pytest.fixture(scope="module")
def runner() -> Path:
    from shiftadd.runtime.native import build_runner

    return build_runner()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_onnx) -> dict[str, Path]:
    """'hf': a saved HF folder (prefill + decode with the KV cache); 'onnx': an ONNX input (main only)."""
    import shiftadd

    root = tmp_path_factory.mktemp("runner")
    _tiny("llama").save_pretrained(root / "llama")
    kw = dict(bits=3, group=36, windows=0)  # group 36: the tiny Llama's K are 72 and 100
    return {
        "hf": shiftadd.compile(str(root / "llama"), root / "hf.so", "q3", **kw).so,
        "onnx": shiftadd.compile(tiny_onnx("llama"), root / "onnx.so", "q3", **kw).so,
    }


@pytest.fixture(scope="module")
def reference(artifacts) -> dict[str, list[int]]:
    """Greedy ids of the Python session, per artifact."""
    import shiftadd

    return {k: shiftadd.load(so).generate(IDS, max_new_tokens=8)["new_ids"] for k, so in artifacts.items()}


def _copy(so: Path, dst: Path, edit=None) -> Path:
    """The artifact's files in ``dst`` (same names), with ``edit(manifest)`` applied to the manifest
    (signed again: the manifest hashes itself, so this stands for another valid artifact)."""
    from shiftadd.runtime.artifact import manifest_text

    dst.mkdir(parents=True, exist_ok=True)
    for f in so.parent.glob(so.stem + ".*"):
        if f.is_file():
            shutil.copy(f, dst / f.name)
    if edit is not None:
        mp = dst / f"{so.stem}.json"
        m = json.loads(mp.read_text())
        edit(m)
        mp.write_text(manifest_text(m))
    return dst / so.name


def _exec(runner, *args):
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True)


def _has_decode(so: Path) -> bool:
    return "decode" in (json.loads(so.with_suffix(".json").read_text()).get("functions") or {})


@pytest.mark.parametrize("kind", ["hf", "onnx"])
def test_runner_matches_python(runner, artifacts, reference, kind):
    from shiftadd.runtime.native import run_runner

    so = artifacts[kind]
    out = run_runner(so, IDS, max_new_tokens=8, binary=runner)
    assert out["ids"] == reference[kind]
    t = out["timing"]
    assert TIMING_KEYS <= set(t) and t["tokens"] == len(out["ids"]) == 8
    assert t["load_s"] > 0 and t["prefill_ms"] > 0 and t["decode_ms_per_token"] > 0 and t["peak_rss_mb"] > 1
    assert t["kv_cache"] == _has_decode(so)
    assert t["kv_cache"] == (kind == "hf")  # ONNX inputs have no decode function: the rerun path


def test_runner_reads_manifest_without_functions(runner, artifacts, reference, tmp_path):
    """Artifacts from before the ``functions`` key: main(inputs, weights in ``params`` order) only."""
    from shiftadd.runtime.native import run_runner

    def strip(m):
        m.pop("functions", None)
        m.pop("kv_cache", None)
        m["outputs"] = m["outputs"][:1]

    so = _copy(artifacts["onnx"], tmp_path, strip)
    out = run_runner(so, IDS, max_new_tokens=8, binary=runner)
    assert out["ids"] == reference["onnx"] and out["timing"]["kv_cache"] is False


def test_runner_stops_at_eos_and_zero_tokens(runner, artifacts, reference, tmp_path):
    from shiftadd.runtime.native import run_runner

    first = reference["hf"][0]
    so = _copy(artifacts["hf"], tmp_path, lambda m: m.update(eos_token_ids=[first]))
    out = run_runner(so, IDS, max_new_tokens=8, binary=runner)
    assert out["ids"] == [first] and out["timing"]["tokens"] == 1
    out = run_runner(artifacts["hf"], IDS, max_new_tokens=0, threads=1, binary=runner)
    assert out["ids"] == [] and out["timing"]["decode_ms_per_token"] is None
    assert out["timing"]["threads"] == 1


def test_runner_rejects_bit_flipped_params(runner, artifacts, tmp_path):
    from shiftadd.runtime.native import run_runner

    so = _copy(artifacts["hf"], tmp_path)
    p = so.with_suffix(".params")
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    p.write_bytes(bytes(blob))
    r = _exec(runner, so, "--ids", "1 2 3")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("shiftadd-run: ") and "hf.params" in r.stderr and "SHA-256" in r.stderr
    with pytest.raises(RuntimeError, match=r"shiftadd-run: .*hf\.params.*does not match"):
        run_runner(so, [1, 2, 3], 2, binary=runner)


def test_runner_rejects_missing_manifest_and_file(runner, artifacts, tmp_path):
    so = _copy(artifacts["hf"], tmp_path / "a")
    so.with_suffix(".json").unlink()
    r = _exec(runner, so, "--ids", "1 2 3")
    assert r.returncode == 1 and r.stderr.startswith("shiftadd-run: ")
    assert "hf.json" in r.stderr and "manifest is missing" in r.stderr
    so = _copy(artifacts["hf"], tmp_path / "b")
    so.with_suffix(".params").unlink()
    r = _exec(runner, so, "--ids", "1")
    assert r.returncode == 1 and "hf.params: missing" in r.stderr
    so = _copy(artifacts["hf"], tmp_path / "c", lambda m: m.update(format_version=1))
    r = _exec(runner, so, "--ids", "1")
    assert r.returncode == 1 and "format version 1" in r.stderr
    so = _copy(artifacts["hf"], tmp_path / "d")  # one flipped digit of the vocabulary size, not signed again
    mp = so.with_suffix(".json")
    mp.write_text(mp.read_text().replace(f'"vocab_size": {VOCAB}', f'"vocab_size": {VOCAB + 1}'))
    r = _exec(runner, so, "--ids", "1")
    assert r.returncode == 1 and "hf.json" in r.stderr and "manifest_sha256" in r.stderr


def test_runner_rejects_bad_arguments(runner, artifacts):
    so = artifacts["hf"]
    r = _exec(runner, so, "--ids", f"1 {VOCAB}")
    assert r.returncode == 2 and r.stderr.startswith("shiftadd-run: --ids: token id 96 is out of range")
    assert f"[0, {VOCAB})" in r.stderr
    for args, needle in [
        ((so,), "--ids is required"),
        ((so, "--ids", "1 x"), "expected an integer, got 'x'"),
        ((so, "--ids", "1", "--max-new-tokens", "-1"), "--max-new-tokens"),
        ((so, "--ids", "1", "--threads", "0"), "--threads"),
        (("--ids", "1"), "ARTIFACT.so"),
        ((so, "--ids", "1", "--bogus"), "unknown option '--bogus'"),
        ((so.with_suffix(".bin"), "--ids", "1"), "ending in .so"),
    ]:
        r = _exec(runner, *args)
        assert r.returncode == 2 and r.stderr.startswith("shiftadd-run: ") and needle in r.stderr, (args, r.stderr)
    if _has_decode(so):  # the context the model was exported for (the tiny Llama: 64 positions)
        r = _exec(runner, so, "--ids", "1 2 3", "--max-new-tokens", "100")
        assert r.returncode == 2 and "context" in r.stderr


def test_build_runner_reuses_the_build(runner):
    from shiftadd.runtime.native import build_runner

    assert build_runner() == runner and runner.is_file()


def test_cli_run_native_equals_python(runner, artifacts, reference):
    """``shiftadd run --native`` (the runner) and ``shiftadd run`` (Python) report the same new ids."""
    import sys

    args = [
        sys.executable,
        "-m",
        "shiftadd.cli",
        "run",
        str(artifacts["hf"]),
        "--ids",
        " ".join(map(str, IDS)),
        "--max-new-tokens",
        "8",
    ]
    native = subprocess.run(args + ["--native"], capture_output=True, text=True)
    python = subprocess.run(args, capture_output=True, text=True)
    assert native.returncode == 0 and python.returncode == 0, native.stderr + python.stderr
    want = "new ids: " + " ".join(map(str, reference["hf"]))
    assert want in native.stderr and want in python.stderr
    bad = subprocess.run(args + ["--native", "--temperature", "0.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--native decodes greedily" in bad.stderr
