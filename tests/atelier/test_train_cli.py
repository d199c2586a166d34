"""The train-demo commands (model, LoRA, ControlNet) and grow-demo take ``--steps`` and
``--set field=value`` the same way: a field the recipe lacks, or a value of the wrong type, is a
usage error that names the option and the field, before any training starts."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from atelier.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", ["train-demo", "train-demo-lora", "train-demo-controlnet",
                                     "grow-demo"])
@pytest.mark.parametrize(("setting", "named"), [("nope=1", "nope"), ("lr=fast", "lr")])
def test_a_bad_recipe_setting_is_named_before_training(
    tmp_path: Path, command: str, setting: str, named: str
) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["models", command, "--out", str(out), "--steps", "1",
                                 "--set", setting])
    assert result.exit_code == 2, result.output
    assert "--set" in result.output and named in result.output
    assert not out.exists()  # nothing was trained or written


@pytest.mark.parametrize(("command", "folder"), [
    ("train-demo", "demo"), ("train-demo-lora", "demo-lora"),
    ("train-demo-controlnet", "demo-canny"), ("grow-demo", "demo"),
])
def test_the_shipped_folders_are_written_over_only_when_asked(command: str, folder: str) -> None:
    """The default folder is the shipped one: a run on a CPU box would put a far weaker model
    where every new user's first picture comes from. The bad ``--set`` makes a missing guard
    stop before training, and the test fail without harm."""
    from cluster.registry import PACKAGE_DATA_DIR

    shipped = PACKAGE_DATA_DIR / folder
    before = sorted((p.name, p.stat().st_mtime_ns) for p in shipped.rglob("*"))
    result = runner.invoke(app, ["models", command, "--steps", "1", "--set", "nope=1"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "is a shipped folder" in result.output and "--replace" in result.output
    assert folder in result.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in shipped.rglob("*")) == before
    # With --replace the guard lets it through (to the bad setting, here).
    replaced = runner.invoke(app, ["models", command, "--replace", "--steps", "1",
                                   "--set", "nope=1"], env={"COLUMNS": "200"})
    assert replaced.exit_code == 2 and "nope" in replaced.output
    assert "is a shipped folder" not in replaced.output
