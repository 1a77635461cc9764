"""The Python session API beyond plain runs: sampling, streaming, threads, bad inputs and damaged
artifacts (fuzzed in a child process, so a crash would show as a failure instead of killing pytest)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shiftadd.runtime.sampling import Sampler, TextStream

from .conftest import VOCAB, _tiny


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A 3-bit tiny Llama with the KV cache (context 64)."""
    import shiftadd

    root = tmp_path_factory.mktemp("session")
    _tiny("llama").save_pretrained(root / "llama")
    return shiftadd.compile(str(root / "llama"), root / "m.so", "q3", bits=3, group=36, windows=0).so


# -- sampling --------------------------------------------------------------------------------------
def _reference_candidates(logits, temperature, top_k, top_p):
    """The filter written out plainly: sort, keep top_k, softmax, keep the shortest prefix reaching top_p."""
    z = [(float(v) / temperature, i) for i, v in enumerate(logits)]
    z.sort(key=lambda t: (-t[0], t[1]))
    if top_k:
        z = z[:top_k]
    m = z[0][0]
    w = [np.exp(v - m) for v, _ in z]
    total = sum(w)
    p = [x / total for x in w]
    kept, mass = [], 0.0
    for (v, i), q in zip(z, p):
        kept.append((i, q))
        mass += q
        if top_p < 1 and mass >= top_p:  # top_p = 1 turns the filter off (as in transformers), even where
            break  # the first probability rounds to 1.0
    s = sum(q for _, q in kept)
    return [i for i, _ in kept], [q / s for _, q in kept]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.floats(0.05, 3.0), st.integers(0, 50), st.floats(0.05, 1.0), st.integers(0, 2**31))
@example(n=2, temperature=0.25, top_k=0, top_p=1.0, seed=13)  # p[0] == 1.0 in float64: top_p = 1 keeps both
def test_sampler_candidates_match_reference(n, temperature, top_k, top_p, seed):
    logits = np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)
    ids, p = Sampler(temperature, top_k, top_p, seed).candidates(logits)
    rid, rp = _reference_candidates(logits, temperature, top_k, top_p)
    assert list(ids) == rid and np.allclose(p, rp, rtol=1e-9, atol=1e-12)


def test_sampler_draws_follow_the_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, -3.0])
    s = Sampler(temperature=0.7, top_k=4, top_p=0.95, seed=0)
    ids, p = s.candidates(logits)
    draws = np.bincount([s(logits) for _ in range(20000)], minlength=5) / 20000
    assert set(np.nonzero(draws)[0]) <= set(ids.tolist())
    assert np.abs(draws[ids] - p).max() < 0.015
    assert Sampler(0.0)(logits) == 0  # temperature 0 is argmax
    a = [Sampler(1.0, seed=7)(logits) for _ in range(5)]
    assert a == [Sampler(1.0, seed=7)(logits) for _ in range(5)]


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampler_rejects_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Sampler(**kw)


def test_text_stream_pieces_join_to_the_text():
    """Byte-level BPE splits multi-byte characters over tokens: pieces are held back until complete."""
    from transformers import AutoTokenizer

    from shiftadd.frontend import resolve_model

    try:
        src = resolve_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    text = "Café au lait, 日本語 and emoji 🙂 done."
    ids = tok(text)["input_ids"]
    ts = TextStream(tok)
    pieces = [ts.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


# -- generation --------------------------------------------------------------------------------------
def test_generate_sampling_is_seeded_and_cache_independent(artifact):
    import shiftadd

    sess = shiftadd.load(artifact)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.9, seed=11)
    a = sess.generate([3, 4, 5], **kw)
    assert a["new_ids"] == sess.generate([3, 4, 5], **kw)["new_ids"]
    assert a["new_ids"] == sess.generate([3, 4, 5], use_cache=False, **kw)["new_ids"]
    assert a["new_ids"] != sess.generate([3, 4, 5], **{**kw, "seed": 12})["new_ids"]
    pieces = []
    b = sess.generate([3, 4, 5], stream=pieces.append, **kw)
    assert "".join(pieces) == "".join(f" {t}" for t in b["new_ids"])  # no tokenizer: ids as text
    assert b["decode_tokens_per_s"] > 0 and len(b["step_seconds"]) == 12


def test_generate_stops_at_the_context(artifact):
    import shiftadd

    sess = shiftadd.load(artifact)
    res = sess.generate(list(range(60)), max_new_tokens=10)
    assert len(res["new_ids"]) == 4  # 60 + 4 = the 64 positions the model was built for


def test_one_session_serves_four_threads(artifact):
    """4 threads x 20 generations on one session (greedy and sampled, different prompts) give exactly
    the single-threaded results."""
    import shiftadd

    sess = shiftadd.load(artifact)
    jobs = [
        ([1 + i % 7, 2 + i % 5, 3 + i % 11], dict(max_new_tokens=6, temperature=0.8 * (i % 2), seed=i))
        for i in range(80)
    ]
    want = [sess.generate(p, **kw)["new_ids"] for p, kw in jobs]
    got: dict[int, list[int]] = {}
    errors = []

    def work(t):
        try:
            for i in range(t, 80, 4):
                got[i] = sess.generate(jobs[i][0], **jobs[i][1])["new_ids"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert [got[i] for i in range(80)] == want


# -- bad inputs ----------------------------------------------------------------------------------------
def test_bad_inputs_get_clear_errors(artifact):
    import shiftadd

    sess = shiftadd.load(artifact)
    ids = np.array([[1, 2, 3]], np.int64)
    one = np.ones_like(ids)
    _, *present = sess.run(None, {"input_ids": ids, "attention_mask": one})
    past = dict(zip(sess.kv_cache["inputs"], present))
    cases = [
        (
            lambda: sess.run(None, {"input_ids": ids.astype(np.int32), "attention_mask": one}),
            TypeError,
            "input 'input_ids': expected dtype int64",
        ),
        (lambda: sess.run(None, {"input_ids": ids[0], "attention_mask": one}), ValueError, "expected rank 2"),
        (
            lambda: sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64)}),
            ValueError,
            "dimension 'seq' is 4 but 3",
        ),
        (
            lambda: sess.run(None, {"input_ids": ids + VOCAB, "attention_mask": one}),
            ValueError,
            rf"token ids must be in \[0, {VOCAB}\)",
        ),
        (lambda: sess.run(None, {"input_ids": -ids, "attention_mask": one}), ValueError, "token ids"),
        (
            lambda: sess.run(None, {"input_ids": ids[:, :1], "attention_mask": one, **past}, function="decode"),
            ValueError,
            r"expected 4 columns \(past 3 \+ new 1\)",
        ),
        (
            lambda: sess.run(
                None,
                {
                    "input_ids": ids[:, :1],
                    "attention_mask": np.ones((1, 4), np.int64),
                    **past,
                    "past_key_values.1.value": present[3][:, :1],
                },
                function="decode",
            ),
            ValueError,
            "input 'past_key_values.1.value': expected shape",
        ),
        (
            lambda: sess.run(
                None,
                {
                    "input_ids": ids[:, :1],
                    "attention_mask": np.ones((1, 4), np.int64),
                    **past,
                    "past_key_values.1.key": present[2][:, :, :2],
                },
                function="decode",
            ),
            ValueError,
            "dimension 'past' is 2 but 3",
        ),
        (
            lambda: sess.run(None, {"input_ids": ids, "attention_mask": one}, function="encode"),
            ValueError,
            "unknown function 'encode'",
        ),
        (lambda: sess.run(["scores"], {"input_ids": ids, "attention_mask": one}), ValueError, "unknown output"),
        (lambda: sess.run(None, {"input_ids": ids}), ValueError, "missing input 'attention_mask'"),
        (lambda: sess.generate(list(range(65))), ValueError, "65 tokens exceed the model's context of 64"),
        (lambda: sess.generate([1, VOCAB]), ValueError, "token ids"),
        (lambda: sess.generate("text"), ValueError, "no tokenizer"),
        (lambda: sess.generate([]), ValueError, "prompt is empty"),
        (lambda: sess.generate([1], top_p=2), ValueError, "top_p"),
        (lambda: sess.generate([1], max_new_tokens=-1), ValueError, "max_new_tokens"),
        (lambda: sess.generate(object()), TypeError, "prompt"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["main", "decode"]),
    st.sampled_from(["int64", "int32", "float32"]),
    st.lists(st.integers(0, 5), min_size=0, max_size=4),
    st.integers(-200, 200),
    st.booleans(),
)
def test_malformed_inputs_never_crash(artifact, function, dtype, shape, value, drop):
    """Arbitrary dtype/rank/shape/values into either function: a result or a ValueError/TypeError."""
    import shiftadd

    sess = test_malformed_inputs_never_crash.sess = getattr(
        test_malformed_inputs_never_crash, "sess", None
    ) or shiftadd.load(artifact)
    specs = sess.functions[function]["inputs"]
    feed = {s["name"]: np.full(shape, value, dtype=dtype) for s in specs}
    if drop:
        feed.pop(specs[-1]["name"])
    try:
        sess.run(None, feed, function=function)
    except (ValueError, TypeError) as e:
        assert str(e)


# -- damaged artifacts ---------------------------------------------------------------------------------
FUZZ = r"""
import json, shutil, sys, random
from pathlib import Path
import shiftadd
from shiftadd.runtime.artifact import ArtifactError
src, work = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(0)
results = []
for f in sorted(src.parent.glob(src.stem + ".*")):
    if not f.is_file():
        continue
    size = f.stat().st_size
    damages = [("truncate", n) for n in (0, 1, size // 3, size - 1)]
    damages += [("flip", rng.randrange(size)) for _ in range(4)]
    for kind, at in damages:
        d = work / f"{f.suffix[1:]}-{kind}-{at}"
        d.mkdir()
        for g in src.parent.glob(src.stem + ".*"):
            (shutil.copytree if g.is_dir() else shutil.copy)(g, d / g.name)
        blob = bytearray((d / f.name).read_bytes())
        flipped = bytes([blob[at] ^ (1 << rng.randrange(8))])
        blob = blob[:at] if kind == "truncate" else blob[:at] + flipped + blob[at + 1 :]
        (d / f.name).write_bytes(bytes(blob))
        try:
            shiftadd.load(d / src.name)
            results.append([f.name, kind, at, "loaded"])
        except (ArtifactError, FileNotFoundError) as e:
            assert str(e), (f.name, kind, at)
            results.append([f.name, kind, at, type(e).__name__ + ": " + str(e)[:600]])
print(json.dumps(results))
"""


def test_damaged_artifacts_are_refused(artifact, tmp_path):
    """Every file truncated (4 ways) and bit-flipped (4 random bits): loading raises a clear error naming
    the damaged file, and the process never crashes."""
    r = subprocess.run(
        [sys.executable, "-c", FUZZ, str(artifact), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * 8  # .so, .params, .json
    for name, kind, at, outcome in results:
        assert outcome != "loaded", (name, kind, at)
        assert name in outcome, (name, kind, at, outcome)
