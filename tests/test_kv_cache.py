"""KV cache: ``main`` (prefill, returns every layer's keys/values) and ``decode`` (one or more new tokens
over the cache) of one artifact share the weights; decoding with the cache equals rerunning the whole
sequence, and the float artifact equals transformers' own cached generation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from .conftest import VOCAB, _tiny

GROUP = {"llama": 36, "opt": 32, "gpt2": 32}  # tiny Llama's K are 72 and 100


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(family, bits) -> artifact path (bits 0: the float model), compiled from a saved HF folder."""
    import shiftadd

    root = tmp_path_factory.mktemp("kv")
    cache = {}

    def get(family: str, bits: int):
        if (family, bits) not in cache:
            folder = root / family
            if not folder.exists():
                _tiny(family).save_pretrained(folder)
            res = shiftadd.compile(
                str(folder),
                root / f"{family}-{bits}.so",
                "q3",
                bits=bits or 3,
                rewrite=bits > 0,
                group=GROUP[family],
                windows=0,
            )
            cache[family, bits] = res.so
        return cache[family, bits]

    return get


def _past(sess, tensors) -> dict:
    return dict(zip(sess.kv_cache["inputs"], tensors))


def _steps(sess, ids, mask, new_cols):
    """Prefill on (ids, mask), then decode the columns of ``new_cols`` one at a time; returns the logits
    of every decode step [B, steps, V] and the final cache (each layer's key and value)."""
    logits, *past = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    out = []
    for j in range(new_cols.shape[1]):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
        lg, *past = sess.run(
            None, {"input_ids": new_cols[:, j : j + 1], "attention_mask": mask, **_past(sess, past)}, function="decode"
        )
        out.append(lg[:, -1])
    return np.stack(out, 1), past


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_decode_with_cache_equals_rerun(compiled, family):
    """3-bit artifact, ragged left-padded batch of 2: every decode step's logits equal ``main`` over the
    whole sequence (1e-4), the cache has the manifest's geometry, and greedy ids agree."""
    import shiftadd

    sess = shiftadd.load(compiled(family, 3))
    spec = sess.kv_cache
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    new = rng.integers(0, VOCAB, (2, 4)).astype(np.int64)
    got, past = _steps(sess, ids, mask, new)
    full_mask = np.concatenate([mask, np.ones_like(new)], 1)
    full = sess.run(["logits"], {"input_ids": np.concatenate([ids, new], 1), "attention_mask": full_mask})[0]
    want = full[:, ids.shape[1] :]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert len(past) == 2 * spec["layers"]
    assert all(p.shape == (2, spec["kv_heads"], 13, spec["head_dim"]) for p in past)
    # several new tokens in one decode call (speculative / chunked prefill) equal one at a time
    logits, *past0 = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    chunk = sess.run(
        ["logits"], {"input_ids": new, "attention_mask": full_mask, **_past(sess, past0)}, function="decode"
    )[0]
    assert np.abs(chunk - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    a = sess.generate([5, 9, 11, 3], max_new_tokens=10)
    b = sess.generate([5, 9, 11, 3], max_new_tokens=10, use_cache=False)
    assert a["new_ids"] == b["new_ids"] and len(a["new_ids"]) == 10


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float_artifact_matches_transformers_generate(compiled, family):
    """Float artifact: greedy ids equal transformers' generate() (its own cache), and each step's logits
    equal torch's within 1e-4."""
    import torch

    import shiftadd

    sess = shiftadd.load(compiled(family, 0))
    model = _tiny(family)
    prompt = [7, 1, 60, 33, 2]
    res = sess.generate(prompt, max_new_tokens=8)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 5, dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            min_new_tokens=8,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    assert res["new_ids"] == ref.sequences[0, 5:].tolist()
    seq = np.asarray([prompt + res["new_ids"][:-1]], np.int64)
    got, _ = _steps(sess, seq[:, :5], np.ones((1, 5), np.int64), seq[:, 5:])
    want = torch.stack(ref.logits, 1)[0, 1:].numpy()
    assert np.abs(got[0] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_functions_share_the_weights(compiled):
    """One params file: both functions take the same packed weight names, and the manifest describes
    the cache as the functions' signatures do."""
    import shiftadd

    sess = shiftadd.load(compiled("llama", 3))
    f = sess.functions
    assert set(f) == {"main", "prefill_last", "decode", "decode_one", "decode_step", "kv_resize"}
    assert all(f["main"]["params"] == f[n]["params"] for n in ("prefill_last", "decode", "decode_one", "decode_step"))
    assert f["kv_resize"]["params"] == []
    assert any(n.endswith(".codes") for n in f["decode"]["params"])
    assert not any(n.endswith("proj.weight") for n in f["decode"]["params"])  # every projection rewritten
    spec = sess.kv_cache
    names = [f"past_key_values.{i}.{kv}" for i in range(spec["layers"]) for kv in ("key", "value")]
    assert (
        [i["name"] for i in f["decode"]["inputs"]]
        == ["input_ids", "attention_mask", *names]
        == ["input_ids", "attention_mask", *spec["inputs"]]
    )
    assert f["main"]["outputs"] == f["decode"]["outputs"] == ["logits", *spec["outputs"]]
    assert spec["outputs"][:2] == ["present.0.key", "present.0.value"]
    for i in f["decode"]["inputs"][2:]:
        assert i["shape"] == ["batch", str(spec["kv_heads"]), "past", str(spec["head_dim"])]
    assert spec["max_context"] == 64
    for i in f["decode_one"]["inputs"][2:]:
        assert i["shape"] == ["1", str(spec["kv_heads"]), "past", str(spec["head_dim"])]
    assert f["decode_one"]["outputs"] == f["decode_step"]["outputs"] == f["decode"]["outputs"]
    for i in f["decode_step"]["inputs"][2:]:
        assert i["shape"] == ["1", str(spec["kv_heads"]), "capacity", str(spec["head_dim"])]
    assert [i["name"] for i in f["kv_resize"]["inputs"]] == [*spec["inputs"], "capacity"]
    assert f["kv_resize"]["inputs"][-1] == {"name": "capacity", "dtype": "shape", "shape": ["capacity"]}
    assert f["prefill_last"]["inputs"] == f["main"]["inputs"] and f["prefill_last"]["outputs"] == f["main"]["outputs"]
    for a, b, c, d in zip(*(sess._args[n] for n in ("main", "decode", "decode_one", "prefill_last"))):  # one copy
        assert a is b is c is d


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("bits", [0, 3])
def test_prefill_last_equals_main_at_the_last_position(compiled, family, bits):
    """``prefill_last`` gives ``main``'s logits of the last position (1e-5) and the same cache, on a
    left-padded ragged batch; generation prefills with it (same tokens as without the cache)."""
    import shiftadd

    from .conftest import ragged_batch

    sess = shiftadd.load(compiled(family, bits))
    ids, mask = ragged_batch(3, batch=2, seq=9)
    want = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask}, function="prefill_last")
    assert got[0].shape == (2, 1, want[0].shape[2])
    assert np.abs(got[0][:, 0] - want[0][:, -1]).max() <= 1e-5 * max(1.0, np.abs(want[0]).max())
    for g, w in zip(got[1:], want[1:]):
        assert g.shape == w.shape and np.abs(g - w).max() <= 1e-5 * max(1.0, np.abs(w).max())
    prompt = [4, 8, 15, 16, 23]
    assert sess.generate(prompt, 6)["new_ids"] == sess.generate(prompt, 6, use_cache=False)["new_ids"]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_decode_one_equals_decode(compiled, family):
    """``decode_one`` (decode bound to one sequence and one token) gives decode's logits and cache at
    every step of a greedy run (1e-5), and refuses a batch or several tokens with the input named."""
    import shiftadd

    sess = shiftadd.load(compiled(family, 3))
    ids = np.asarray([[4, 8, 15, 16, 23]], np.int64)
    _, *past = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    nxt = np.asarray([[42]], np.int64)
    for step in range(4):
        feed = {
            "input_ids": nxt,
            "attention_mask": np.ones((1, ids.shape[1] + step + 1), np.int64),
            **_past(sess, past),
        }
        want = sess.run(None, feed, function="decode")
        got = sess.run(None, feed, function="decode_one")
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.abs(g - w).max() <= 1e-5 * max(1.0, np.abs(w).max())
        nxt, past = np.asarray([[int(got[0][0, -1].argmax())]], np.int64), got[1:]
    with pytest.raises(ValueError, match="input_ids"):
        sess.run(
            None,
            {
                **feed,
                "input_ids": np.asarray([[1, 2]], np.int64),
                "attention_mask": np.ones((1, feed["attention_mask"].shape[1] + 1), np.int64),
            },
            function="decode_one",
        )


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_decode_step_writes_the_cache_in_place(compiled, family):
    """``decode_step`` over ``kv_resize``'s preallocated cache gives ``decode_one``'s logits (same
    kernels: exactly) at every step of a greedy run; its outputs are its cache inputs, whose first
    ``total`` rows equal ``decode_one``'s cache and the rest stay zero; a cache too short for the
    next token fails with a message, not a write past its end."""
    import tvm

    import shiftadd

    sess = shiftadd.load(compiled(family, 3))
    ids = np.asarray([[4, 8, 15, 16, 23]], np.int64)
    out = sess._call(
        "prefill_last", sess._check_feed("prefill_last", {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    )
    grown, capacity = out[1:], ids.shape[1] + 4
    cache = sess._call("kv_resize", [*out[1:], tvm.runtime.ShapeTuple([capacity])])
    assert all(c.shape == (1, g.shape[1], capacity, g.shape[3]) for c, g in zip(cache, grown))
    nxt = np.asarray([[42]], np.int64)
    for step in range(4):
        total = ids.shape[1] + step + 1
        args = [tvm.runtime.tensor(nxt), tvm.runtime.tensor(np.ones((1, total), np.int64))]
        want = sess._call("decode_one", [*args, *grown])
        got = sess._call("decode_step", [*args, *cache])
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
        for g, c, w in zip(got[1:], cache, want[1:]):
            assert g.same_as(c) and g.data_ptr() == c.data_ptr()  # written in place
            rows = g.numpy()
            np.testing.assert_array_equal(rows[:, :, :total], w.numpy())
            assert not rows[:, :, total:].any()
        nxt, grown, cache = np.asarray([[int(got[0].numpy()[0, -1].argmax())]], np.int64), want[1:], got[1:]
    args = [tvm.runtime.tensor(nxt), tvm.runtime.tensor(np.ones((1, capacity + 1), np.int64))]
    with pytest.raises(Exception, match="cache is too short"):
        sess._call("decode_step", [*args, *cache])


def test_add_decode_step_needs_an_appended_past():
    """A decode graph that reads its past otherwise than appending to it gets no in-place twin: the
    pass says why (the pipeline then keeps ``decode_one`` alone)."""
    from tvm import relax

    from shiftadd.relax_passes.kv_cache_in_place import add_decode_step

    mod = _decode_graph(lambda k, grown: [relax.op.add(k, k), grown])  # the past read otherwise too
    with pytest.raises(ValueError, match="only appended to"):
        add_decode_step(mod)
    with pytest.raises(ValueError, match="no function 'nothing'"):
        add_decode_step(mod, source="nothing")


def _decode_graph(outputs):
    """``decode_one(input_ids [1, 1], attention_mask [1, total], past key [1, 2, past, 4])`` that
    appends one row to the past key and returns ``outputs(past, grown)``."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    total, past = tvm.tirx.Var("total", "int64"), tvm.tirx.Var("past", "int64")
    ids = relax.Var("input_ids", relax.TensorType([1, 1], "int64"))
    mask = relax.Var("attention_mask", relax.TensorType([1, total], "int64"))
    k = relax.Var("past_key_values_0_key", relax.TensorType([1, 2, past, 4], "float32"))
    with bb.function("decode_one", [ids, mask, k], {"num_input": 3}):
        with bb.dataflow():
            new = bb.emit(relax.op.ones(relax.ShapeExpr([1, 2, 1, 4]), "float32"))
            grown = bb.emit(relax.op.concat([k, new], axis=2))
            out = bb.emit_output(relax.Tuple([bb.emit(e) for e in outputs(k, grown)]))
        bb.emit_func_output(out)
    return bb.get()


def _appending_decode():
    """A decode graph whose past keys are only appended to, and whose scores over every position
    (``[1, 2, total]``: sized by the context) go through a softmax."""
    from tvm import relax

    def outputs(_, grown):
        probs = relax.op.nn.softmax(relax.op.sum(relax.op.multiply(grown, grown), axis=[3]), axis=-1)
        return [relax.op.add(probs, probs), grown]

    return _decode_graph(outputs)


def test_decode_step_buffers_are_planned_up_to_the_context():
    """With the model's context as ``total``'s upper bound the memory planner sizes the step's
    context-long intermediates once (storage of the bound's size, reused) instead of leaving the VM
    to allocate them per call; the bounded and unbounded steps compute the same as numpy."""
    import tvm
    from tvm import relax

    from shiftadd.relax_passes.kv_cache_in_place import NAME, add_decode_step

    def planned(mod):
        seq = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
            ]
        )
        return seq(mod)

    def sized_per_call(mod) -> int:  # storages whose size the VM computes at every call
        return len(re.findall(r"alloc_storage\(R\.shape\(\[[^\]]*[a-z]", str(mod[NAME])))

    with pytest.raises(ValueError, match="max_context must be >= 1"):
        add_decode_step(_appending_decode(), max_context=0)
    free = add_decode_step(_appending_decode())
    bound = add_decode_step(_appending_decode(), max_context=64)
    assert dict(bound[NAME].attrs["tir_var_upper_bound"]) == {"total": 64}
    assert (sized_per_call(planned(free)), sized_per_call(planned(bound))) == (1, 0)  # the scores
    rng = np.random.default_rng(0)
    cap, past = 16, 5
    rows = rng.standard_normal((1, 2, past, 4)).astype(np.float32)
    grown = np.concatenate([rows, np.ones((1, 2, 1, 4), np.float32)], 2)
    e = (grown * grown).sum(3)
    want = 2 * np.exp(e - e.max(-1, keepdims=True)) / np.exp(e - e.max(-1, keepdims=True)).sum(-1, keepdims=True)
    for mod in (free, bound):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        cache = np.zeros((1, 2, cap, 4), np.float32)
        cache[:, :, :past] = rows
        out = vm[NAME](
            tvm.runtime.tensor(np.zeros((1, 1), np.int64)),
            tvm.runtime.tensor(np.ones((1, past + 1), np.int64)),
            tvm.runtime.tensor(cache),
        )
        np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-5)
        np.testing.assert_array_equal(out[1].numpy()[:, :, : past + 1], grown)


def test_add_decode_one_needs_a_symbolic_decode():
    """The specialising pass names what is missing instead of producing a copy of nothing."""
    import tvm
    from tvm import relax

    from shiftadd.relax_passes.specialize_decode import add_decode_one

    bb = relax.BlockBuilder()
    seq = tvm.tirx.Var("seq", "int64")
    x = relax.Var("input_ids", relax.TensorType([1, seq], "float32"))
    with bb.function("decode", [x]):
        bb.emit_func_output(bb.emit(relax.op.add(x, x)))
    mod = bb.get()
    with pytest.raises(ValueError, match="no function 'prefill'"):
        add_decode_one(mod, source="prefill")
    with pytest.raises(ValueError, match=r"no symbolic dims \['batch'\]"):
        add_decode_one(mod)


def test_last_position_logits_needs_an_output_matmul():
    """Without a weight matmul behind the first output the pass says so (the compile then adds no
    ``prefill_last``); through a soft-cap's elementwise ops it slices the matmul's activation."""
    import tvm
    from tvm import relax

    from shiftadd.relax_passes.last_position_logits import add_last_position_logits, has_logits_matmul

    def module(with_matmul: bool):
        bb = relax.BlockBuilder()
        seq = tvm.tirx.Var("seq", "int64")
        x = relax.Var("x", relax.TensorType([1, seq, 8], "float32"))
        w = relax.Var("w", relax.TensorType([8, 5], "float32"))
        with bb.function("main", [x, w], attrs={"num_input": 1}):
            y = bb.emit(relax.op.matmul(x, w)) if with_matmul else bb.emit(relax.op.add(x, x))
            y = bb.emit(relax.op.multiply(relax.op.tanh(relax.op.divide(y, relax.const(3.0))), relax.const(3.0)))
            bb.emit_func_output(y)
        return relax.transform.Normalize()(bb.get())

    assert not has_logits_matmul(module(False))
    with pytest.raises(ValueError, match="first output of 'main' is not a weight matmul"):
        add_last_position_logits(module(False))
    mod = add_last_position_logits(module(True))
    ex = tvm.compile(mod, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x, w = np.random.default_rng(0).standard_normal((1, 6, 8), np.float32), np.ones((8, 5), np.float32)
    full = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    last = vm["prefill_last"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    assert last.shape == (1, 1, 5)
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=1e-6)
    np.testing.assert_allclose(full, 3 * np.tanh((x @ w) / 3), rtol=1e-5, atol=1e-6)
