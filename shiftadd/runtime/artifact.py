"""The compiled artifact: ``NAME.so`` + ``NAME.params`` + ``NAME.json`` (+ ``NAME.tokenizer/``).

* ``NAME.so``: the Relax VM executable and all kernels, a shared library for the TVM runtime.
  Its ``main(inputs..., weights...)`` takes the weights after the model inputs.
* ``NAME.params``: the weights in TVM's parameter-dictionary format
  (``tvm.runtime.save_param_dict``; names as in the manifest's ``params``, packed BCQ weights
  as ``<layer>.codes`` int32 and ``<layer>.alpha`` float32).
* ``NAME.json``: the manifest: format version, model, bits, group, target, TVM version, input and
  output names, parameter order, and the SHA-256 of every file. Written last: an artifact without
  it is incomplete.
* ``NAME.tokenizer/``: the model's tokenizer (``save_pretrained`` format), when it has one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FORMAT_VERSION = 2  # 2: functions main + decode (KV cache), manifest self-hash


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An exception or Ctrl-C leaves neither a partial file nor the temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


DIGEST_KEY = '"manifest_sha256": "'
DIGEST_ZERO = "0" * 64


def manifest_digest(text: str) -> str:
    """SHA-256 of the manifest file's text with its own ``manifest_sha256`` value replaced by 64 zeros.
    The files are hashed in the manifest and this hashes the manifest, so a flipped bit anywhere is
    caught (a flipped vocabulary size would otherwise let out-of-range ids reach the embedding
    gather). Defined on the raw text so that the C++ runner checks it the same way."""
    i = text.find(DIGEST_KEY)
    if i >= 0:
        j = i + len(DIGEST_KEY)
        text = text[:j] + DIGEST_ZERO + text[j + 64 :]
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_text(manifest: dict) -> str:
    """The manifest as written: indented JSON whose ``manifest_sha256`` is the digest of this text."""
    text = json.dumps({**manifest, "manifest_sha256": DIGEST_ZERO}, indent=2)
    return text.replace(DIGEST_KEY + DIGEST_ZERO, DIGEST_KEY + manifest_digest(text), 1)


class ArtifactError(ValueError):
    """A missing, incomplete, mismatched or corrupted artifact."""


def paths(so_path: str | os.PathLike) -> dict[str, Path]:
    so = Path(so_path)
    if so.suffix != ".so":
        raise ArtifactError(f"output path must end in .so, got {so}")
    stem = so.with_suffix("")
    return {
        "so": so,
        "params": stem.with_suffix(".params"),
        "manifest": stem.with_suffix(".json"),
        "tokenizer": Path(str(stem) + ".tokenizer"),
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(path: Path) -> dict[str, str]:
    """{relative name: sha256} for a file or every file under a directory."""
    if path.is_dir():
        return {str(p.relative_to(path.parent)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return {path.name: sha256_file(path)}


class ArtifactWriter:
    """Stage every file in a temporary folder beside the target, then move them into place with the
    manifest last. On any failure (or Ctrl-C) nothing of the new artifact remains."""

    def __init__(self, so_path: str | os.PathLike):
        self.paths = paths(so_path)
        self.paths["so"].parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(
            tempfile.mkdtemp(prefix=f".{self.paths['so'].stem}.", suffix=".partial", dir=self.paths["so"].parent)
        )

    def staged(self, kind: str) -> Path:
        return self.stage / self.paths[kind].name

    def __enter__(self):
        return self

    def commit(self, manifest: dict) -> dict:
        files = {}
        for kind in ("so", "params", "tokenizer"):
            p = self.staged(kind)
            if p.exists():
                files.update(file_hashes(p))
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        text = manifest_text(manifest)
        manifest = json.loads(text)
        (self.stage / self.paths["manifest"].name).write_text(text)
        moved = []
        try:
            # remove the manifest of an older artifact first, so a half-replaced set is never valid
            self.paths["manifest"].unlink(missing_ok=True)
            for kind in ("so", "params", "tokenizer", "manifest"):
                src, dst = self.staged(kind), self.paths[kind]
                if not src.exists():
                    continue
                if dst.is_dir():
                    shutil.rmtree(dst)
                os.replace(src, dst)
                moved.append(dst)
        except BaseException:
            for dst in moved:
                shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
            raise
        return manifest

    def __exit__(self, *exc):
        shutil.rmtree(self.stage, ignore_errors=True)
        return False


def read_manifest(so_path: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of an artifact, after checking that every file it lists is present and intact."""
    p = paths(so_path)
    if not p["so"].exists():
        raise FileNotFoundError(f"artifact not found: {p['so']}")
    if not p["manifest"].exists():
        raise ArtifactError(f"{p['so']}: manifest {p['manifest'].name} is missing (incomplete or foreign artifact)")
    try:
        text = p["manifest"].read_text()
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p['manifest']}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p['manifest']}: format version {manifest.get('format_version') if isinstance(manifest, dict) else '?'}"
            f", this shiftadd reads version {FORMAT_VERSION} (recompile the model)"
        )
    if manifest.get("manifest_sha256") != manifest_digest(text):
        raise ArtifactError(f"{p['manifest']}: corrupted manifest (its content does not match its manifest_sha256)")
    if verify:
        base = p["so"].parent
        for name, digest in manifest.get("files", {}).items():
            f = base / name
            if not f.is_file():
                raise ArtifactError(f"{p['so']}: file {f} listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(
                    f"{p['so']}: file {f} does not match its SHA-256 in the manifest (corrupted or replaced)"
                )
    return manifest
