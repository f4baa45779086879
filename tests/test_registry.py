"""Backends are entry points: the built-in table matches setup.cfg, bases import no backend,
and a plugin package installed with pip is used by `sample`, `embed` and `reward`."""
from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qprobe.errors import QProbeError
from qprobe.registry import BUILTIN, EMBEDDERS, REWARDS, SAMPLERS, available, load

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "plugin_example" / "qprobe_toy.py"
ENTRY_POINTS = """[qprobe.samplers]
toy = qprobe_toy:ToySampler

[qprobe.embedders]
toy = qprobe_toy:ToyEmbedder

[qprobe.rewards]
toy = qprobe_toy:make_length_reward
"""


def test_builtin_table_is_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = {}
    for group in (SAMPLERS, EMBEDDERS, REWARDS):
        lines = [ln.strip() for ln in cfg["options.entry_points"][group].strip().splitlines()]
        declared[group] = dict(tuple(p.strip() for p in ln.split("=", 1)) for ln in lines)
    assert declared == BUILTIN


@pytest.mark.parametrize("group", [SAMPLERS, EMBEDDERS, REWARDS])
def test_every_builtin_loads(group):
    for name in BUILTIN[group]:
        assert callable(load(group, name))


def test_bases_import_no_backend():
    for base in sorted((ROOT / "qprobe").glob("*/base.py")) + [ROOT / "qprobe/rewards/score.py"]:
        tree = ast.parse(base.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        backends = {v.partition(":")[0] for table in BUILTIN.values() for v in table.values()}
        assert not imported & backends, base


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(QProbeError, match=r"unknown sampler 'nope' \(registered: .*api.*hf"):
        load(SAMPLERS, "nope")
    from qprobe.embedders import get_embedder

    with pytest.raises(QProbeError, match="embedder 'hf' does not take these options"):
        get_embedder({"kind": "hf", "colour": "red"})


def _toy_wheel(folder: Path) -> Path:
    """A wheel of tests/plugin_example/qprobe_toy.py with its three entry points (no build backend needed)."""
    dist = "qprobe_toy-0.1.0.dist-info"
    files = {
        "qprobe_toy.py": PLUGIN.read_text(),
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: qprobe-toy\nVersion: 0.1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": ENTRY_POINTS,
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    path = folder / "qprobe_toy-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Environment whose sys.path holds the pip-installed toy plugin, then this checkout."""
    tmp = tmp_path_factory.mktemp("plugin")
    wheel = _toy_wheel(tmp)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    assert (site / "qprobe_toy-0.1.0.dist-info" / "entry_points.txt").exists()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return env


def _cli(env, cwd, *args):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env, cwd=cwd)
    return r


@pytest.mark.subprocess
def test_plugin_backends_from_the_cli(plugin_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "prompt": f"say {w}"}) + "\n"
                               for i, w in enumerate(["yes", "no"])))
    r = _cli(plugin_env, tmp_path, "sample", str(prompts), "-o", "c.jsonl", "--sampler", "toy", "-k", "3",
             "-O", "word=hey", "--no-cache")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows[:3]] == ["hey", "hey hey", "hey hey hey"]
    assert len(rows) == 6

    r = _cli(plugin_env, tmp_path, "reward", "c.jsonl", "-o", "r.jsonl", "--kind", "toy:5", "--no-cache")
    assert r.returncode == 0, r.stderr
    rewarded = [json.loads(ln) for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["reward"] for x in rewarded[:3]] == [0.0, 1.0, 1.0]
    assert rewarded[0]["reward_reason"] == "length >= 5"

    r = _cli(plugin_env, tmp_path, "embed", "r.jsonl", "-o", "f.npy", "--embedder", "toy", "-O", "scale=2",
             "--no-cache")
    assert r.returncode == 0, r.stderr
    import numpy as np

    X = np.load(tmp_path / "f.npy")
    assert X.tolist()[:3] == [[6.0, 1.0], [14.0, 2.0], [22.0, 3.0]]
    assert json.loads((tmp_path / "f.npy.json").read_text())["extractor"]["kind"] == "toy"


@pytest.mark.subprocess
def test_plugin_errors_are_one_line(plugin_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": 0, "prompt": "say yes"}) + "\n")
    r = _cli(plugin_env, tmp_path, "sample", str(prompts), "-o", "c.jsonl", "--sampler", "toy", "-O", "colour=red")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "sampler 'toy' does not take these options" in r.stderr and "colour" in r.stderr
    r = _cli(plugin_env, tmp_path, "sample", str(prompts), "-o", "c.jsonl", "--sampler", "nope")
    assert r.returncode == 1 and "unknown sampler 'nope' (registered: api, hf, toy)" in r.stderr


@pytest.mark.subprocess
def test_plugin_is_listed(plugin_env):
    code = "from qprobe.registry import available; print(sorted(available('qprobe.rewards')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, check=True)
    assert "'toy'" in out.stdout
    assert "toy" not in available(REWARDS)  # this process never saw the plugin
    code = "from qprobe.rewards import reward_identity; print(reward_identity('toy:5')['plugin'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env, check=True)
    assert out.stdout.strip() == "qprobe-toy==0.1.0"  # an upgraded plugin: its cached scores are not reused


# ------------------------------------------------------------------ backends build themselves
@pytest.fixture()
def toy_registered(monkeypatch):
    """The toy plugin's backends registered in this process (as an installed plugin's entry points would be)."""
    monkeypatch.syspath_prepend(str(PLUGIN.parent))
    monkeypatch.setitem(BUILTIN[SAMPLERS], "toy", "qprobe_toy:ToySampler")
    monkeypatch.setitem(BUILTIN[EMBEDDERS], "toy", "qprobe_toy:ToyEmbedder")


def test_build_maps_the_generic_options(toy_registered):
    from qprobe.hfmodel import DEFAULT_MODEL
    from qprobe.registry import build

    emb = build(EMBEDDERS, None, model=None, layer=3, pooling="mean", device="cpu")
    assert (type(emb).__name__, emb.model, emb.layer, emb.pooling) == ("HFEmbedder", DEFAULT_MODEL, 3, "mean")
    emb = build(EMBEDDERS, None, api_base="http://127.0.0.1:9/v1/", api_model="m", api_key="k", pooling=None)
    assert emb.identity() == {"kind": "api", "api_base": "http://127.0.0.1:9/v1", "model": "m", "pooling": "last"}
    assert type(build(EMBEDDERS, None, sentence_model="all-minilm-l6-v2")).__name__ == "SentenceEmbedder"
    s = build(SAMPLERS, None, capture=["-1:last", "4"], temperature=0.5, stop=["\n"])
    assert (s.model, s.capture, s.temperature, s.stop) == (DEFAULT_MODEL, [(-1, "last"), (4, "last")], 0.5, ["\n"])
    toy = build(SAMPLERS, "toy", {"word": "hey"}, model="m", temperature=0.3, max_new_tokens=9, device=None)
    assert toy.identity() == {"kind": "toy", "model": "m", "max_new_tokens": 9, "word": "hey"}
    assert build(EMBEDDERS, "toy", {"scale": 2.0}).identity() == {"kind": "toy", "model": "toy", "scale": 2.0}
    for group, name, options, message in [
        (SAMPLERS, None, dict(api_base="http://x/v1"), "--api-base needs --api-model"),
        (SAMPLERS, None, dict(api_base="http://x/v1", api_model="m", model="m"), "not both"),
        (SAMPLERS, "hf", dict(api_model="m"), "--api-model needs --api-base"),
        (SAMPLERS, "api", dict(), "--sampler api needs --api-base and --api-model"),
        (SAMPLERS, "api", dict(api_base="http://x/v1", api_model="m", guide="p"), "--guide needs a local model"),
        (SAMPLERS, "toy", dict(capture=["-1:last"]), "--capture and --code-block work with the hf sampler only"),
        (SAMPLERS, "toy", dict(prefix_every=4), "--prefix-every works with local models only"),
        (SAMPLERS, None, dict(capture=["last:-1"]), "expected LAYER:POOLING"),
        (EMBEDDERS, "sentence", dict(), "--embedder sentence needs --sentence-model"),
        (EMBEDDERS, None, dict(sentence_model="s", model="m"), "--sentence-model excludes --model"),
        (EMBEDDERS, "toy", dict(sentence_model="s"), "--sentence-model goes with --embedder sentence"),
        (EMBEDDERS, "hf", dict(api_base="http://x/v1", api_model="m"), "--embedder hf needs --model"),
    ]:
        with pytest.raises(QProbeError, match=message):
            build(group, name, **options)


def test_rebuild_from_an_identity(toy_registered):
    from qprobe.registry import rebuild

    ident = {"kind": "toy", "model": "toy", "scale": 3.0}
    assert rebuild(EMBEDDERS, ident).identity() == ident
    api = {"kind": "api", "api_base": "http://127.0.0.1:9/v1", "model": "m", "pooling": "mean"}
    emb = rebuild(EMBEDDERS, api, api_key="k", max_retries=2, device="cpu")  # device: not the api's, left out
    assert emb.identity() == api and emb.api.max_retries == 2
    sentence = {"kind": "sentence", "model": "all-minilm-l6-v2", "max_length": 128, "pooling": "mean"}
    assert rebuild(EMBEDDERS, sentence).identity() == sentence
    with pytest.raises(QProbeError, match="unknown embedder 'gone'"):
        rebuild(EMBEDDERS, {"kind": "gone"})
    with pytest.raises(QProbeError, match="no embedder recorded"):
        rebuild(EMBEDDERS, None)


def _toy_rows(path: Path, n_prompts=6, k=3):
    rows = [{"prompt_id": p, "prompt": f"task {p}", "sample": s, "completion": "x" * (p + s + 1),
             "reward": float(s == 0), "solution": "y" * (2 * p + 1)} for p in range(n_prompts) for s in range(k)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_plugin_embedder_with_demos(toy_registered, tmp_path):
    """`train --demos` rebuilds the features' extractor from its identity: a plugin's too."""
    from click.testing import CliRunner

    from qprobe.cli import cli

    _toy_rows(tmp_path / "r.jsonl")
    run = CliRunner().invoke
    r = run(cli, ["embed", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "f.npy"), "--embedder", "toy",
                  "-O", "scale=2", "--no-cache"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["train", str(tmp_path / "r.jsonl"), str(tmp_path / "f.npy"), "-o", str(tmp_path / "probe"),
                  "--objective", "mse", "--demos", "solution", "--no-cache"])
    assert r.exit_code == 0, r.output
    assert "+ 6 demonstrations" in r.output


def test_a_plugin_embedder_in_serve(toy_registered, tmp_path):
    """`serve` rebuilds the probe's extractor from its identity: a plugin's embeds the upstream's candidates."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import numpy as np

    from qprobe.probe import QProbe
    from qprobe.serve import BackgroundServer, build
    from qprobe.testing.servers import StubServer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 2)).astype(np.float32)
    probe = QProbe("mse", beta=0.0, alpha=1.0).fit(X, X @ np.array([1.0, -0.5]))
    probe.embedder_ = {"kind": "toy", "model": "toy", "scale": 1.0}
    probe.save(tmp_path / "probe")
    with StubServer() as stub, BackgroundServer(build(tmp_path / "probe", api_base=stub.url, api_model="stub-model",
                                                      k=3, max_retries=0)) as srv:
        r = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0).completions.create(
            model="stub-model", prompt="say", max_tokens=8, extra_body={"candidates": True})
    cands = r.model_extra["qprobe"]["candidates"]
    assert len(cands) == 3
    feats = np.array([[len(c["text"]), len(c["text"].split())] for c in cands], dtype=np.float32)
    np.testing.assert_allclose([c["q"] for c in cands], probe.predict(feats), rtol=1e-5)
