"""Where the benchmarks find the seed service: only where they are told."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.baseline import BASELINE_DIR_ENV, BaselineUnavailableError, find_baseline


def test_without_a_folder_named_there_is_no_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(BASELINE_DIR_ENV, raising=False)
    with pytest.raises(BaselineUnavailableError, match="--baseline-dir"):
        find_baseline()


def test_the_environment_names_the_folder_and_the_option_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seeds = []
    for name in ("from-env", "from-option"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "app.py").write_text("")
        (folder / "requirements.txt").write_text("")
        seeds.append(folder)
    monkeypatch.setenv(BASELINE_DIR_ENV, str(seeds[0]))
    assert find_baseline() == seeds[0]
    assert find_baseline(seeds[1]) == seeds[1]


def test_a_folder_without_the_seed_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BASELINE_DIR_ENV, str(tmp_path))
    with pytest.raises(BaselineUnavailableError, match=r"app\.py missing"):
        find_baseline()
