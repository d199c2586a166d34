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
