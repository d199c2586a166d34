"""``atelier devices --measure``: a real (tiny UNet) calibration of this CPU, stored beside the
data dir, and the profile ``atelier devices`` prints from it, with the figures."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atelier.cli import app

runner = CliRunner()


def test_measure_stores_figures_and_the_profile_uses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torchao")
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no stray .env
    before = runner.invoke(app, ["devices"])
    assert before.exit_code == 0, before.output
    assert "compile skipped: not measured on cpu" in before.output

    result = runner.invoke(app, ["devices", "--measure", "--tiny", "--side", "64",
                                 "--no-compile"])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "calibration.json").read_text())
    (m,) = stored["measurements"]
    assert (m["device_class"], m["family"]) == ("cpu", "sd15")
    names = [v["dtype"] + (f"+{v['quantize']}" if v["quantize"] else "") for v in m["variants"]]
    assert names[:2] == ["float32", "bfloat16"]
    base = min(m["variants"][:2], key=lambda v: v["seconds_per_step"])["dtype"]
    assert names[2:] == [f"{base}+int8", f"{base}+int8-dynamic"]
    for v in m["variants"]:
        assert v["error"] is None and v["seconds_per_step"] > 0 and v["peak_mb"] > 10, v
    fastest = min(m["variants"], key=lambda v: v["seconds_per_step"])
    # The printed profile is the fastest variant, and the figures are printed beside it.
    assert f"dtype        {fastest['dtype']}" in result.output
    assert f"quantize     {fastest['quantize'] or 'none'}, compile off" in result.output
    assert "measured cpu / sd15: tiny UNet, CFG x2 at 64²" in result.output


def test_a_broken_calibration_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calibration.json").write_text("[]")
    result = runner.invoke(app, ["devices"])
    assert result.exit_code == 1
    assert "calibration.json has format 'list', expected 1" in result.output
