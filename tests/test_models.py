"""Split-model aliases: assembled once from their parts, size and sha256 checked before each use."""
import hashlib
import types

import pytest

from qprobe import hfmodel
from qprobe.errors import QProbeError


@pytest.fixture
def split_alias(tmp_path, monkeypatch):
    """A fake two-part alias whose parts live in two fake packages under tmp_path."""
    data = [b"GGUF" + bytes(range(200)), bytes(range(100))]
    pkgs = {}
    for i, blob in enumerate(data):
        d = tmp_path / f"pkg{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / "part.bin").write_bytes(blob)
        pkgs[f"fake_part{i}"] = d / "__init__.py"
    whole = b"".join(data)
    spec = {"parts": [(name, "data/part.bin") for name in pkgs], "size": len(whole),
            "sha256": hashlib.sha256(whole).hexdigest(), "install": "pip install fake-parts"}
    monkeypatch.setitem(hfmodel.SPLIT_MODELS, "fake-model", spec)
    monkeypatch.setitem(hfmodel.ALIASES, "fake-model", ("fake_part0", "fake.gguf", 2))
    real = hfmodel.importlib.util.find_spec
    monkeypatch.setattr(hfmodel.importlib.util, "find_spec",
                        lambda n: types.SimpleNamespace(origin=str(pkgs[n])) if n in pkgs else real(n))
    return tmp_path / "cache", whole


def test_assembles_once_and_verifies(split_alias):
    cache, whole = split_alias
    path = hfmodel.assemble_split_model("fake-model", cache)
    assert path.read_bytes() == whole and path.name == "fake.gguf"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_wrong_or_partial_file_is_one_line(split_alias):
    cache, whole = split_alias
    path = hfmodel.assemble_split_model("fake-model", cache)
    path.write_bytes(whole[:-10])  # partial
    with pytest.raises(QProbeError, match="bytes, expected") as e:
        hfmodel.assemble_split_model("fake-model", cache)
    assert "\n" not in str(e.value)
    path.write_bytes(whole[:-1] + b"X")  # same size, wrong content
    with pytest.raises(QProbeError, match="sha256"):
        hfmodel.assemble_split_model("fake-model", cache)


def test_missing_parts_name_the_wheels(split_alias, monkeypatch):
    cache, _ = split_alias
    monkeypatch.setattr(hfmodel.importlib.util, "find_spec", lambda n: None)
    with pytest.raises(QProbeError, match="pip install fake-parts"):
        hfmodel.assemble_split_model("fake-model", cache)
