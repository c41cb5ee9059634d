"""The project speaks of the product, not of its own development: no development-session history in any file.

Walks every tracked file (`git ls-files`) except binaries and the lock file and fails with `path:line` for each
line that names a development session: a numbered one, one placed in time ("the previous one"), or a result file
named by one (the examples are in the parametrized tests below). Ordinary uses of the word (an HTTP or database
session, `requests.Session`, pytest's session scope) pass.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"uv.lock"}
WORD = "sess" + "ion"  # spelled apart so that this file's own examples do not read as history
HISTORY = [
    re.compile(rf"\b{WORD}s?[\s_-]*\d+[a-z]?\b", re.IGNORECASE),  # a numbered one, or several
    re.compile(rf"\b(until|since|this|that|previous|last|earlier|later|next|one|each)\s+{WORD}\b", re.IGNORECASE),
    re.compile(rf"\b{WORD}-\w+\s+(recipe|default|model|run|rule)s?\b", re.IGNORECASE),  # "the <word>-2 recipe"
    re.compile(r"-s\d+[a-z]?\.json\b"),  # a result file named by a session
    re.compile(rf"{WORD}\d+\w*\.json\b", re.IGNORECASE),
]


def history_hits(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each line of `text` that speaks of a development session."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if any(p.search(line) for p in HISTORY)]


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or name in SKIP or not path.is_file():
            continue
        head = path.read_bytes()[:8192]
        if b"\0" in head:  # binary
            continue
        files.append(path)
    return files


@pytest.mark.parametrize("line", [
    f"until {WORD} 8 every map", f"the {WORD}-2 recipe", f"({WORD} 13)", f"{WORD}s 5, 8 and 9",
    f"quality-default-{WORD}11b.json", "threshold-s" + "17.json", f"in this {WORD} we tried", f"{WORD}12",
    f"the previous {WORD}'s run",
])
def test_history_wording_is_caught(line):
    assert history_hits(line)


@pytest.mark.parametrize("line", [
    "an HTTP session to the tracking server", "session = requests.Session()", '@pytest.fixture(scope="session")',
    "a database session per request", "start_new_session=True", "tf.compat.v1.Session()", "sessions table",
    "quality-default-unweighted-seeds20-22.json",
])
def test_ordinary_uses_pass(line):
    assert not history_hits(line)


def test_no_development_history_in_tracked_files():
    hits = [f"{path.relative_to(ROOT)}:{n}: {line[:120]}"
            for path in tracked_text_files()
            for n, line in history_hits(path.read_text(encoding="utf-8", errors="replace"))]
    assert not hits, f"{len(hits)} lines speak of development sessions:\n" + "\n".join(hits)
