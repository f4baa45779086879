"""The README and docs/: every Markdown link and anchor resolves, and the README stays short."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_links", ROOT / "scripts" / "check_links.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_link_and_anchor_resolves(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    rc = _checker().main([])
    assert rc == 0, capsys.readouterr().out


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Title\n\n[ok](#title) [gone](#nope) [file](missing.md)\n```\n[in a fence](#ignored)\n```\n")
    bad = _checker().check(md)
    assert len(bad) == 2 and "#nope" in bad[0] and "missing.md" in bad[1]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
