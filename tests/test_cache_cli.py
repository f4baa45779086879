"""`qprobe cache size` and `qprobe cache clear` (the command the cache's error messages point to)."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from qprobe.cache import Cache
from qprobe.cli import cli


def test_cache_size_and_clear(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["cache", "size", "--cache-dir", str(tmp_path / "none")]).output.startswith("no cache in")
    assert not (tmp_path / "none").exists()  # looking does not create one

    cache = Cache(tmp_path)
    cache.put_json({"a": {"completion": "x"}, "b": {"completion": "y"}})
    cache.put_vectors({"c": np.ones(4096, dtype=np.float32)})
    r = runner.invoke(cli, ["cache", "size", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0 and "1 feature vectors" in r.output and "2 completions/rewards" in r.output

    r = runner.invoke(cli, ["cache", "clear", "--cache-dir", str(tmp_path)], input="n\n")
    assert r.exit_code == 1 and len(Cache(tmp_path)) == 3  # declined: nothing deleted
    before = Cache(tmp_path).stats()["bytes"]
    r = runner.invoke(cli, ["cache", "clear", "--cache-dir", str(tmp_path), "--yes"])
    assert r.exit_code == 0 and "deleted 3 entries" in r.output
    assert len(Cache(tmp_path)) == 0 and Cache(tmp_path).stats()["bytes"] < before
    assert Cache(tmp_path).get_json(["a"]) == {}
