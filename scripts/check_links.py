#!/usr/bin/env python3
# Copied from the workplace's shared/tools/check_links.py so that CI does not depend on a folder outside the
# checkout. Written by hand: the link checkers that resolve GitHub heading anchors offline (lychee,
# markdown-link-check) are not Python packages, and this is 60 lines.
"""Check a checkout's Markdown links: every `#anchor` names a heading, every relative path exists.

    python scripts/check_links.py [FILE.md ...]    (default: README.md and docs/**/*.md)

Anchors follow GitHub's rule: the heading lowercased, punctuation other than '-' and '_' dropped,
spaces turned into '-', a repeated heading gets -1, -2, ... Prints one line per broken link and
exits 1 if there is any; links to http(s) and mailto are not checked.
"""
import re
import sys
from pathlib import Path

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def slugs(text):
    seen, out, fence = {}, set(), False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        if fence:
            continue
        m = HEADING.match(line)
        if not m:
            continue
        s = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", m.group(2)).lower()
        s = re.sub(r"[^\w\- ]", "", s).replace(" ", "-")
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def check(md: Path):
    text = md.read_text(encoding="utf-8")
    bad = []
    body, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence:
            body.append(line)
    body = "\n".join(body)
    for m in LINK.finditer(body):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path) if path else md
        if path and not dest.exists():
            bad.append(f"{md}: link to a missing file: {target}")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text(encoding="utf-8")):
            bad.append(f"{md}: link to a missing heading: {target}")
    return bad


def main(args):
    files = [Path(a) for a in args] or [p for p in [Path("README.md"), *sorted(Path("docs").rglob("*.md"))] if p.exists()]
    bad = [line for f in files for line in check(f)]
    print("\n".join(bad) if bad else f"links ok in {len(files)} file(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
