"""docs/benchmarks.md's generated tables agree with benchmarks/results/*.json."""

from __future__ import annotations

import re

import pytest

from benchmarks import report


def test_benchmarks_page_is_up_to_date():
    stale = report.stale(report.PAGE.read_text())
    assert not stale, f"docs/benchmarks.md is out of date ({', '.join(stale)}): run python -m benchmarks.report"


def test_every_generator_has_its_table_on_the_page():
    names = [m["name"] for m in report.MARKER.finditer(report.PAGE.read_text())]
    assert sorted(names) == sorted(report.TABLES)


def test_an_edited_number_is_found_stale():
    page = report.PAGE.read_text()
    body = next(m for m in report.MARKER.finditer(page) if m["name"] == "current")
    start = page.index(" 0.", body.start("body")) + 1  # the first number of the table's first row
    edited = page[:start] + "9" + page[start + 1:]
    assert report.stale(edited) == ["current"]
    assert report.render(edited) == page  # regenerating puts it back, and touches nothing outside the markers


def test_unknown_table_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown generated table 'nope'"):
        report.render("<!-- BEGIN GENERATED: nope -->\n<!-- END GENERATED: nope -->\n")


def test_results_files_named_in_the_docs_exist():
    names = set()
    for page in (report.PAGE, report.ROOT / "docs" / "experiments.md"):
        names |= set(re.findall(r"\b([\w.-]+\.jsonl?)\b", page.read_text()))
    missing = sorted(n for n in names if n.startswith(("quality", "speed", "threshold", "tta", "recipe", "pipeline",
                                                       "width", "snapshots", "gradcam", "reference"))
                     and not (report.RESULTS / n).exists())
    assert not missing, f"docs name results files that do not exist: {missing}"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["docs/benchmarks.md", "docs/experiments.md", "benchmarks/README.md"])
def test_links_between_the_pages_resolve(page):
    source = report.ROOT / page
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", source.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = (source.parent / target).resolve() if target else source
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and anchor not in {github_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}:
            broken.append(f"{target}#{anchor} (no such heading)")
    assert not broken, f"{page}: broken links: {broken}"
