"""Settings: defaults, env parsing, start-up errors that name the variable, signing key."""

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Mode, load_settings


def test_defaults_single_box(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path, _env_file=None)
    assert s.mode is Mode.single_box
    assert s.db_url == f"sqlite:///{tmp_path / 'atelier.db'}"
    assert s.redis_url is None
    assert s.tier("free").daily_allowance > 0


def test_env_variables_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ATELIER_REDIS_URL", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("ATELIER_LIMITS__MAX_STEPS", "40")
    monkeypatch.setenv("ATELIER_DISPATCH__GATHER_WINDOW_MS", "80")
    monkeypatch.setenv("ATELIER_TIERS", '{"free": {"daily_allowance": 3, "concurrency": 1, '
                       '"max_side": 768}}')
    s = load_settings(_env_file=None)
    assert s.redis_url == "redis://127.0.0.1:6379/2"
    assert s.limits.max_steps == 40
    assert s.dispatch.gather_window_ms == 80 and s.dispatch.gather_gap_ms == 12
    assert s.tier("free").daily_allowance == 3


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("ATELIER_REDIS_URL", "http://nope", "ATELIER_REDIS_URL"),
        ("ATELIER_DATABASE_URL", "mysql://x", "ATELIER_DATABASE_URL"),
        ("ATELIER_LIMITS__MAX_STEPS", "zero", "ATELIER_LIMITS__MAX_STEPS"),
        ("ATELIER_TELEGRAM_API_BASE_URL", "ftp://x", "ATELIER_TELEGRAM_API_BASE_URL"),
        ("ATELIER_MODE", "chaos", "ATELIER_MODE"),
        ("ATELIER_DISPATCH__MAX_ATTEMPTS", "0", "ATELIER_DISPATCH__MAX_ATTEMPTS"),
        # The gap is how long one quiet moment may be: never longer than the whole window.
        ("ATELIER_DISPATCH__GATHER_GAP_MS", "500", "gather_gap_ms (500) must not exceed"),
    ],
)
def test_invalid_values_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings(data_dir=tmp_path, _env_file=None)
    assert named in err.value.message


def test_production_requires_signing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ATELIER_SIGNING_KEY"):
        load_settings(mode="production", data_dir=tmp_path, database_url="sqlite:///x.db",
                      _env_file=None)


def test_single_box_generates_signing_key_once(tmp_path: Path) -> None:
    first = load_settings(data_dir=tmp_path, _env_file=None).resolved_signing_key
    second = load_settings(data_dir=tmp_path, _env_file=None).resolved_signing_key
    assert first == second and len(first) >= 32
    assert ((tmp_path / "signing.key").stat().st_mode & 0o777) == 0o600


def test_secrets_not_in_repr(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path, telegram_token="123:SECRET", _env_file=None)
    assert "SECRET" not in repr(s) and "SECRET" not in str(s.model_dump())


def test_worker_config_carries_no_secret(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from core.settings import WorkerConfig

    settings = load_settings(
        data_dir=tmp_path, telegram_token="123:tg-SECRET", signing_key="sk-SECRET" * 4,
        _env_file=None,
    )
    config = settings.worker_config()
    assert config == WorkerConfig(data_dir=tmp_path)
    assert not any(isinstance(v, SecretStr) for v in config.model_dump().values())
    assert "SECRET" not in config.model_dump_json()


def test_empty_optional_secrets_count_as_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compose env file or Secret with `ATELIER_TELEGRAM_TOKEN=` on a Discord-only site: no
    Telegram bot (not one that crash-loops on an empty token); an empty signing key is missing
    in production, not too short."""
    env = tmp_path / "atelier.env"
    env.write_text("ATELIER_TELEGRAM_TOKEN=\nATELIER_DISCORD_TOKEN=abc\nATELIER_SIGNING_KEY= \n"
                   "ATELIER_TELEGRAM_WEBHOOK_SECRET=\nATELIER_MODELS_FILE=\n")
    s = load_settings(data_dir=tmp_path, _env_file=env)
    assert s.telegram_token is None and s.signing_key is None
    assert s.telegram_webhook_secret is None and s.models_file is None
    assert s.discord_token is not None and s.discord_token.get_secret_value() == "abc"
    monkeypatch.setenv("ATELIER_DATABASE_URL", "")
    with pytest.raises(ConfigError, match="ATELIER_SIGNING_KEY is required"):
        load_settings(mode="production", data_dir=tmp_path, _env_file=env)


def test_probe_paths_leave_the_web_port_when_a_metrics_port_is_set(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path, _env_file=None).metrics.probes_on_web_port
    s = load_settings(data_dir=tmp_path, _env_file=None, metrics={"port": 9464})
    assert not s.metrics.probes_on_web_port
    s = load_settings(data_dir=tmp_path, _env_file=None,
                      metrics={"port": 9464, "on_web_port": True})
    assert s.metrics.probes_on_web_port
