"""Local-model sampler and embedder: checked against plain transformers on the real default model."""
from __future__ import annotations

import numpy as np
import pytest

from qprobe.cache import Cache
from qprobe.errors import QProbeError
from qprobe.samplers.stops import truncate

CHAT = [{"prompt_id": i, "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(
    ["Write a Python function that adds two numbers.", "Name three colours.", "Count to five."])]


def test_truncate_stop_strings_and_code_block():
    assert truncate("abc\nassert x", ["\nassert"]) == ("abc", True)
    assert truncate("no stop here", ["zzz"]) == ("no stop here", False)
    text = "Here:\n```python\ndef f():\n    return 1\n```\nThis function returns 1."
    cut, hit = truncate(text, code_block=True)
    assert hit and cut == "Here:\n```python\ndef f():\n    return 1\n"
    # an opening fence alone does not stop
    assert truncate("```python\ndef f():", code_block=True) == ("```python\ndef f():", False)


def test_feature_identity_names_the_dtype():
    """float32 and bfloat16 features never share a cache key, and a probe refuses the other's features."""
    from qprobe.cache import make_key
    from qprobe.embedders.hf import HFEmbedder

    from qprobe.hfmodel import default_dtype

    f32, bf16 = HFEmbedder(device="cpu", dtype="float32").identity(), HFEmbedder(device="cpu", dtype="bfloat16").identity()
    assert f32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert HFEmbedder(device="cpu").identity()["dtype"] == default_dtype("cpu")  # the default follows the CPU
    assert HFEmbedder(device="cuda").identity()["dtype"] == "bfloat16"  # the cuda default, known without torch
    assert make_key(f32, ["p", "c"]) != make_key(bf16, ["p", "c"])
    assert HFEmbedder(device="cpu", dtype="float32").cache_key("p", "c") != HFEmbedder(device="cpu", dtype="bfloat16").cache_key("p", "c")


@pytest.mark.model
def test_greedy_batched_equals_one_at_a_time_and_plain_generate(smollm):
    import torch

    from qprobe.hfmodel import prompt_ids
    from qprobe.samplers.hf import HFSampler

    model, tok = smollm
    batched = HFSampler(temperature=0, max_new_tokens=12, batch_size=8).sample(CHAT, k=1, progress=False)
    single = HFSampler(temperature=0, max_new_tokens=12, batch_size=1).sample(CHAT, k=1, progress=False)
    assert [r["completion"] for r in batched] == [r["completion"] for r in single]
    ids = torch.tensor([prompt_ids(tok, CHAT[0]["prompt"])])
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert batched[0]["completion"] == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.model
def test_seeded_sampling_is_reproducible_and_samples_differ(smollm):
    from qprobe.samplers.hf import HFSampler

    # float32: a row's tokens do not depend on its batch-mates. In bfloat16 (the default on GPUs and on
    # CPUs with AVX512-BF16) the matmuls round differently per batch shape, so near-ties can flip.
    a = HFSampler(max_new_tokens=16, batch_size=6, dtype="float32").sample(CHAT, k=2, seed=1, progress=False)
    b = HFSampler(max_new_tokens=16, batch_size=2, dtype="float32").sample(CHAT, k=2, seed=1, progress=False)
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert len({r["completion"] for r in a}) > 3  # the k samples of a prompt are not copies


@pytest.mark.model
def test_features_from_sampling_match_a_separate_forward_pass(smollm, tmp_path):
    from qprobe.embedders.hf import HFEmbedder
    from qprobe.samplers.hf import HFSampler

    cache = Cache(tmp_path)
    rows = HFSampler(max_new_tokens=20, batch_size=4, capture=[(-1, "last"), (12, "mean")]).sample(
        CHAT, k=2, cache=cache, progress=False)
    items = [(r["prompt"], r["completion"]) for r in rows]
    for layer, pooling in [(-1, "last"), (12, "mean")]:
        emb = HFEmbedder(layer=layer, pooling=pooling)
        captured = emb.embed(items, cache=cache, progress=False)
        assert emb.n_computed == 0  # no second forward pass
        fresh = emb.embed(items, progress=False)
        scale = np.abs(fresh).max()
        np.testing.assert_allclose(captured, fresh, atol=2e-2 * scale)


@pytest.mark.model
def test_embedder_pooling_and_layers():
    import torch

    from qprobe.embedders.hf import HFEmbedder
    from qprobe.hfmodel import completion_ids, load_model, prompt_ids

    model, tok = load_model("smollm2-135m", None, "float32")  # exact comparisons: float32 on any CPU
    item = (CHAT[0]["prompt"], "def add(a, b):\n    return a + b")
    last = HFEmbedder(layer=-1, pooling="last", dtype="float32").embed([item], progress=False)[0]
    assert HFEmbedder(layer=30).identity() == HFEmbedder(layer=-1).identity()
    mean8 = HFEmbedder(layer=8, pooling="mean", dtype="float32").embed([item], progress=False)[0]
    p, c = prompt_ids(tok, item[0]), completion_ids(tok, item[1])
    with torch.no_grad():
        hs = model(torch.tensor([p + c]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(last, hs[-1][0, -1].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean8, hs[8][0, len(p):].mean(0).numpy(), rtol=1e-4, atol=1e-4)
    # batching with padding changes nothing
    other = (CHAT[1]["prompt"], "red, green and a much longer answer " * 3)
    both = HFEmbedder(layer=-1, pooling="last", dtype="float32").embed([item, other], progress=False)
    np.testing.assert_allclose(both[0], last, rtol=1e-3, atol=1e-3)


def test_local_folder_model_and_context_limit(tiny_model_dir):
    from qprobe.embedders.hf import HFEmbedder
    from qprobe.samplers.hf import HFSampler

    out = HFSampler(tiny_model_dir, max_new_tokens=5).sample([{"prompt_id": 0, "prompt": "hello"}], k=2,
                                                             progress=False)
    assert [r["sample"] for r in out] == [0, 1]
    X = HFEmbedder(tiny_model_dir, pooling="mean").embed([("hello", ""), ("hello", "world")], progress=False)
    assert X.shape == (2, 64) and np.isfinite(X).all()
    with pytest.raises(QProbeError, match="context"):
        HFEmbedder(tiny_model_dir).embed([("word " * 600, "x")], progress=False)
    with pytest.raises(QProbeError, match="context"):
        HFSampler(tiny_model_dir, max_new_tokens=8).sample([{"prompt_id": 0, "prompt": "word " * 600}], k=1,
                                                           progress=False)


def test_unknown_model_is_one_clear_error(monkeypatch):
    from qprobe.hfmodel import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QProbeError, match="no such folder or file"):
        load_model("/nonexistent/model-folder")
    with pytest.raises(QProbeError, match="cannot load model"):
        load_model("no-such-org/no-such-model")


@pytest.mark.model
def test_sentence_embedder():
    from qprobe.embedders.sentence import SentenceEmbedder

    X = SentenceEmbedder().embed([("q", "a cat"), ("q", "a kitten"), ("q", "stock market crash")], progress=False)
    assert X.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    assert X[0] @ X[1] > X[0] @ X[2]
