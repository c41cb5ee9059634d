"""docs/configuration.md is generated from the config and the CLI, and a change to either must regenerate it."""

from __future__ import annotations

from pathlib import Path

from cxr_model.config import PROFILES, TrainConfig
from cxr_pneumonia import config_docs
from cxr_pneumonia.cli import flag

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_page_is_what_the_config_generates() -> None:
    page = (REPO / config_docs.DOC_PATH).read_text()
    assert page == config_docs.render(), "docs/configuration.md is out of date: run `make docs-config`"


def test_every_field_profile_and_command_is_on_the_page() -> None:
    page = config_docs.render()
    for name, info in TrainConfig.model_fields.items():
        if name != "profile":
            assert f"| `{flag(name)}` |" in page
            assert info.description.replace("|", "\\|") in page
    for profile in PROFILES:
        assert f"| `{profile}` |" in page
    for command in ("train", "search-worker", "predict"):
        assert f"## `cxr {command}`" in page


def test_a_profile_value_is_shown_in_its_column_and_marked_as_set_by_it() -> None:
    row = next(line for line in config_docs.render().splitlines() if line.startswith("| `--image-size` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    columns = dict(zip(PROFILES, cells[2:5], strict=True))
    assert columns == {p: f"**`{PROFILES[p]['image_size']}`**" for p in PROFILES}
    seed_row = next(line for line in config_docs.render().splitlines() if line.startswith("| `--seed` |"))
    assert "**" not in seed_row  # no profile sets the seed: the default shows, unmarked


def test_check_fails_on_a_stale_file_and_passes_on_a_fresh_one(tmp_path: Path, capsys) -> None:
    target = tmp_path / "configuration.md"
    target.write_text(config_docs.render().replace("--seed", "--sead"))
    assert config_docs.main([str(target), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_docs.main([str(target)]) == 0
    assert config_docs.main([str(target), "--check"]) == 0
