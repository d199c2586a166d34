"""The admin CLI end to end on a temp SQLite store: migrate, grant, show, refuse unmigrated."""

from pathlib import Path

from typer.testing import CliRunner

from atelier.cli import app

runner = CliRunner()


def test_unmigrated_database_is_refused(env: Path) -> None:
    result = runner.invoke(app, ["account", "show", "telegram:1"])
    assert result.exit_code == 1
    assert "not migrated" in result.output and "atelier db upgrade" in result.output


def test_db_check_says_whether_the_database_is_migrated(env: Path) -> None:
    # What a deployment's init container waits on (deploy/kubernetes/base: wait-migrated).
    before = runner.invoke(app, ["db", "check"])
    assert before.exit_code == 1 and "not migrated" in before.output, before.output
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    after = runner.invoke(app, ["db", "check"])
    assert after.exit_code == 0 and "is migrated" in after.output, after.output


def test_upgrade_grant_show(env: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    res = runner.invoke(app, ["credits", "grant", "telegram:42", "25", "--key", "pay-1"])
    assert res.exit_code == 0, res.output
    # The same key again is the same pack: nothing added twice.
    assert runner.invoke(app, ["credits", "grant", "telegram:42", "25", "--key", "pay-1"]
                         ).exit_code == 0
    res = runner.invoke(app, ["credits", "grant", "telegram:42", "5", "--expires", "90d"])
    assert res.exit_code == 0 and "expires 20" in res.output
    show = runner.invoke(app, ["account", "show", "telegram:42"], terminal_width=200)
    assert show.exit_code == 0, show.output
    assert "telegram:42" in show.output
    assert "40 (10 left today" in show.output  # free tier 10 daily + packs of 25 and 5


def test_bad_arguments(env: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert runner.invoke(app, ["credits", "grant", "nocolon", "5"]).exit_code == 2
    assert runner.invoke(app, ["credits", "grant", "telegram:1", "5", "--expires", "soon"]
                         ).exit_code == 2
    res = runner.invoke(app, ["account", "show", "discord:404"])
    assert res.exit_code == 1 and "no account for discord:404" in res.output


def test_styles_lists_at_least_20(env: Path) -> None:
    res = runner.invoke(app, ["styles"], terminal_width=200)
    assert res.exit_code == 0
    assert "watercolor" in res.output and "anime" in res.output


def test_models_list_shows_availability_and_how_to_get(env: Path) -> None:
    from engine.tiny import make_tiny

    make_tiny(env / "models" / "tiny-sd15", "sd15", 0)
    res = runner.invoke(app, ["models", "list"], terminal_width=250)
    assert res.exit_code == 0, res.output
    rows = {line.split()[1]: line for line in res.output.splitlines() if line.startswith("│")}
    assert "folder" in rows["tiny"]  # built here
    assert " no " in rows["tiny-xl"]  # not built
    # How to get each missing one, one line each (HF_HUB_OFFLINE=1 in tests).
    assert "tiny-xl: build it with `atelier models make-tiny`" in res.output
    assert "sdxl: run `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0`" in (
        res.output)
def test_models_list_shows_loras_with_availability(env: Path) -> None:
    res = runner.invoke(app, ["models", "list"], terminal_width=250)
    rows = {line.split()[1]: line for line in res.output.splitlines() if line.startswith("│")}
    # The package's own adapter: the demo model's ControlNet, shipped beside it.
    assert all(w in rows["demo-canny"] for w in ("controlnet", "sd15", "file"))
    # The packaged demo LoRA (cluster/data/demo-lora), for the demo model only.
    assert all(w in rows["outline"] for w in ("lora", "sd15 (demo)", "1", "file"))
    (env / "loras").mkdir()
    (env / "loras" / "ink.safetensors").write_bytes(b"x")
    (env / "models.toml").write_text(
        '[loras.ink]\nfile = "loras/ink.safetensors"\nfamily = "sd15"\ndefault_weight = 0.8\n'
        'triggers = ["ink drawing"]\n'
        '[loras.neon]\nrepo = "someone/neon"\nfile = "neon.safetensors"\nfamily = "sdxl"\n',
        "utf-8",
    )
    res = runner.invoke(app, ["models", "list"], terminal_width=250)
    assert res.exit_code == 0, res.output
    rows = {line.split()[1]: line for line in res.output.splitlines() if line.startswith("│")}
    assert all(w in rows["ink"] for w in ("lora", "sd15", "0.8", "ink drawing", "file"))
    assert " no " in rows["neon"]
    assert "neon: run `huggingface-cli download someone/neon neon.safetensors`" in res.output


def test_cli_never_prints_a_password_given_as_a_query_parameter(env: Path) -> None:
    # Nothing listens on the port: the CLI names the Redis it tried, without its password.
    from tests.conftest import free_port

    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    url = f"redis://127.0.0.1:{free_port()}/0?password=s3cret-pw"
    res = runner.invoke(
        app, ["imagine", "a red fox", "--via-queue", "--out", str(env / "out")],
        env={"ATELIER_REDIS_URL": url}, terminal_width=300,
    )
    assert res.exit_code == 1, res.output
    assert "does not answer" in res.output and "password=***" in res.output
    assert "s3cret-pw" not in res.output
