"""The ``bioperceiver`` command: the subcommand table, ``--help`` with an example on every subcommand, unknown
commands, a missing optional module (``extract-wsi`` before the whole-slide support is installed), and a
subcommand end to end (``validate``) through ``main(argv)``; embed/predict/search run end to end in
tests/test_inference.py through the same library functions."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
import types
from pathlib import Path

import pytest

from bioperceiver import cli

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_point_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bioperceiver"] == "bioperceiver.cli:main"
    assert scripts["bioperceiver-validate"] == "bioperceiver.data.validate:main"  # kept


def test_overview_lists_every_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("validate", "fit-processors", "embed", "predict", "search", "extract-wsi"):
        assert name in text


@pytest.mark.parametrize("name", ["validate", "fit-processors", "embed", "predict", "search"])
def test_every_subcommand_help_shows_its_arguments_and_an_example(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "example:" in out and f"bioperceiver {name}" in out.split("example:")[1]


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["serch"]) == 2
    assert "did you mean 'search'" in capsys.readouterr().err


def test_extract_wsi_is_one_lazy_entry_that_says_when_wsi_support_is_missing(monkeypatch, capsys):
    entry = cli.COMMANDS["extract-wsi"]
    assert entry.target == "bioperceiver.modalities.wsi.extract:main"
    if importlib.util.find_spec("bioperceiver.modalities.wsi") is None:
        with pytest.raises(SystemExit, match="whole-slide image support is not installed"):
            cli.main(["extract-wsi", "--help"])
    # once the module exists the entry calls its main(argv) with the remaining arguments
    calls = []
    fake = types.ModuleType("fake_wsi_extract")
    fake.main = lambda argv=None: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fake_wsi_extract", fake)
    monkeypatch.setitem(cli.COMMANDS, "extract-wsi", cli.Command("fake_wsi_extract:main", "x", "y", entry.missing))
    assert cli.main(["extract-wsi", "--slides", "s/", "--output_dir", "o/"]) == 0
    assert calls == [["--slides", "s/", "--output_dir", "o/"]]


def test_a_missing_command_module_gets_the_entrys_message(monkeypatch):
    monkeypatch.setitem(
        cli.COMMANDS, "needs-x", cli.Command("bioperceiver.not_a_module_x:main", "x", "y", "needs {name}")
    )
    with pytest.raises(SystemExit, match=r"needs bioperceiver\.not_a_module_x"):
        cli.main(["needs-x"])


def test_validate_runs_through_the_command_and_library_errors_are_reported(tmp_path, capsys):
    from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

    manifest = make_synthetic_cohort(tmp_path / "c", num_patients=4, missing_rate=0.0, seed=0)
    assert cli.main(["validate", str(manifest), "--no-files"]) == 0
    assert "manifest OK" in capsys.readouterr().out
    # a bad argument value the library rejects: one line naming the command, exit status 2
    code = cli.main(["predict", "--model", str(tmp_path / "nowhere"), "--manifest", str(manifest), "--output_dir", "o"])
    assert code == 2 and "bioperceiver predict: error:" in capsys.readouterr().err


def test_importing_the_library_leaves_hugging_face_datasets_until_a_dataset_is_built():
    """`import bioperceiver` (every CLI call, every `from_pretrained`) does not import `datasets` (~1 s); the
    dataset builders import it when called (their tests in test_data_pipeline.py build real datasets)."""
    import subprocess

    code = (
        "import sys, bioperceiver, bioperceiver.data\n"
        "assert 'datasets' not in sys.modules, 'datasets imported by import bioperceiver'\n"
        "from bioperceiver.data import build_dataset\n"
        "assert 'datasets' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
