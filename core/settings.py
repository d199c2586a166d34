"""The one Settings object: every knob, read from ``ATELIER_*`` variables and ``.env``.

Nothing else in Atelier reads ``os.environ``; everything receives a ``Settings``.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

SIGNING_KEY_FILE = "signing.key"


class Mode(StrEnum):
    single_box = "single-box"
    production = "production"


class Tier(BaseModel):
    """What an account of a tier may do each day."""

    daily_allowance: int = Field(ge=0)
    concurrency: int = Field(ge=1)
    max_side: int = Field(ge=64)


def _default_tiers() -> dict[str, Tier]:
    return {
        "free": Tier(daily_allowance=10, concurrency=2, max_side=1024),
        "supporter": Tier(daily_allowance=50, concurrency=4, max_side=1536),
        "pro": Tier(daily_allowance=200, concurrency=8, max_side=2048),
    }


class Limits(BaseModel):
    """Hard limits on any request, whatever the tier."""

    max_prompt_chars: int = Field(default=1000, ge=1)
    min_side: int = Field(default=64, ge=8)
    max_side: int = Field(default=2048, ge=64)
    max_count: int = Field(default=4, ge=1, le=4)
    max_steps: int = Field(default=60, ge=1)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_upload_pixels: int = Field(default=4096 * 4096, ge=64 * 64)


class GridLimits(BaseModel):
    """X/Y/Z grids (``/grid``, the A1111 "x/y/z plot" script): how big one may be. A grid is
    priced as the sum of its cells; one over either cap is refused before anything is charged."""

    max_cells: int = Field(default=64, ge=1)
    max_credits: int = Field(default=48, ge=1)


class Dispatch(BaseModel):
    """How dispatchers batch and retry (``ATELIER_DISPATCH__GATHER_WINDOW_MS=80`` and so on)."""

    # Batching: after a job arrives at an idle worker, keep gathering compatible jobs while
    # more keep arriving (each within ``gather_gap_ms`` of the last), for at most
    # ``gather_window_ms``. A lone job waits only the gap; a burst is gathered whole.
    gather_window_ms: int = Field(default=50, ge=0, le=5000)
    gather_gap_ms: int = Field(default=12, ge=0, le=5000)
    max_batch_items: int = Field(default=8, ge=1, le=64)
    job_timeout_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    # A dispatcher renews each running batch's lease with its worker; should the dispatcher
    # die, the worker stops the orphaned batch about this long after the last renewal.
    worker_lease_s: float = Field(default=10.0, ge=1.0, le=3600.0)
    # Queue entries un-acked this long are claimed by another dispatcher.
    claim_timeout_ms: int = Field(default=60_000, ge=1000)
    # Finished jobs a front end has not confirmed are announced again after this grace,
    # with doubling back-off, for at most the window.
    redeliver_grace_s: float = Field(default=60.0, gt=0)
    redeliver_window_s: float = Field(default=24 * 3600.0, gt=0)

    @model_validator(mode="after")
    def _gap_within_window(self) -> Dispatch:
        if self.gather_gap_ms > self.gather_window_ms:
            raise ValueError(
                f"gather_gap_ms ({self.gather_gap_ms}) must not exceed gather_window_ms "
                f"({self.gather_window_ms})"
            )
        return self


class WebRate(BaseModel):
    """Requests the web app takes per window (``ATELIER_WEB_RATE__PER_KEY=120``), counted in
    the broker so every web process shares them; 0 turns a limit off."""

    # Per API key: every /api/v1 and /sdapi/v1 call made with it.
    per_key: int = Field(default=120, ge=0)
    # Per client address (behind a proxy, the one uvicorn's proxy headers give): every request
    # but /healthz, /readyz, /metrics and static files. A gallery page loads its thumbnails.
    per_ip: int = Field(default=1200, ge=0)
    window_s: float = Field(default=60.0, gt=0, le=3600)


class Metrics(BaseModel):
    """The HTTP endpoint each long-running process serves: /metrics (Prometheus), /healthz
    and /readyz (``ATELIER_METRICS__PORT=9464``; no port: not served)."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    # Each readiness check (store, broker, Ray) must answer within this.
    check_timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Whether the web app's own (public) port answers /metrics and /readyz too. Default: only
    # when no port is set here; with one, they stay on it (unpublished) and the public port
    # serves the app alone.
    on_web_port: bool | None = None

    @property
    def probes_on_web_port(self) -> bool:
        return self.port is None if self.on_web_port is None else self.on_web_port


class Retention(BaseModel):
    """What `atelier db prune` keeps (``ATELIER_RETENTION__DAYS=90``): settled jobs, ledger rows,
    reservations and spent daily buckets for ``days``; soft-deleted images' rows for
    ``deleted_images_days``. Images live until their owner deletes them. ``every_h``: how often
    `atelier db prune --repeat` runs (storage/retention.py says what goes)."""

    days: int = Field(default=90, ge=2, le=36500)
    deleted_images_days: int = Field(default=30, ge=0, le=36500)
    every_h: float = Field(default=24.0, gt=0, le=24 * 365)
    batch: int = Field(default=5000, ge=1, le=100_000)


class AutoscaleClass(BaseModel):
    """One device class the cluster can add workers of (a KubeRay worker group)."""

    memory_gb: float = Field(gt=0)  # device memory: which models fit (min_vram_gb)
    run_s: float = Field(default=10.0, gt=0)  # expected seconds per job until measured
    max_workers: int = Field(default=8, ge=0)
    cpus: float = Field(default=1.0, ge=0)  # what one worker asks of its node besides the device
    gpus: float = Field(default=1.0, ge=0)


class Autoscale(BaseModel):
    """Asking Ray's autoscaler for workers from the queue (``ATELIER_AUTOSCALE__ENABLED=true``,
    ``ATELIER_AUTOSCALE__CLASSES='{"a100-80gb": {"memory_gb": 80}}'``). Off on a single box."""

    enabled: bool = False
    # A queued job should start within this: workers wanted = ceil(jobs x run time / target).
    latency_target_s: float = Field(default=60.0, gt=0)
    classes: dict[str, AutoscaleClass] = Field(default_factory=dict)
    interval_s: float = Field(default=5.0, gt=0)
    # A worker this dispatcher started is stopped after idling this long with nothing queued
    # for its class, so its node goes idle and the autoscaler can remove it.
    idle_release_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _classes_when_on(self) -> Autoscale:
        if self.enabled and not self.classes:
            raise ValueError("autoscale is enabled but no classes are configured "
                             "(ATELIER_AUTOSCALE__CLASSES)")
        return self


class WorkerConfig(BaseModel):
    """What a worker actor needs of the settings (the model registry and the blocklist), and
    nothing else: workers run on other machines, so bot tokens and the signing key stay home."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    models_file: Path | None = None
    blocklist_file: Path | None = None
    # How the actor logs (its process is Ray's, which reads no ATELIER_* variables).
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """All configuration. Invalid values fail at start-up naming the ``ATELIER_`` variable."""

    model_config = SettingsConfigDict(
        env_prefix="ATELIER_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    mode: Mode = Mode.single_box
    data_dir: Path = Path("~/.local/share/atelier")
    database_url: str | None = None
    redis_url: str | None = None
    signing_key: SecretStr | None = None

    telegram_token: SecretStr | None = None
    telegram_api_base_url: str = "https://api.telegram.org/bot"
    telegram_file_base_url: str = "https://api.telegram.org/file/bot"
    # Webhook mode for the Telegram bot (long polling when no URL is set): Telegram POSTs
    # updates to this public HTTPS URL; the bot listens on listen:port behind it. Without a
    # secret, a random one is registered with Telegram at each start.
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: SecretStr | None = None
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = Field(default=8443, ge=1, le=65535)
    # Plain text (not a command) in a private chat gets a preview with an Imagine button;
    # False: it is taken as a prompt and charged at once (the behaviour before issue 10).
    telegram_plain_text_preview: bool = True
    discord_token: SecretStr | None = None
    # Where the Discord bot finds the REST API and the gateway (a proxy, or a test's fake).
    discord_api_base_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    public_base_url: str = "http://127.0.0.1:8000"
    # Where `atelier up` / `atelier web` serve the web app: HOST:PORT ([::1]:8000 for IPv6).
    web_listen: str = "127.0.0.1:8000"
    web_rate: WebRate = Field(default_factory=WebRate)
    # The largest request body the web app reads (413 past it). A1111 clients send images as
    # base64 in JSON, 4/3 of the file: 8 MiB takes a 6 MB image.
    web_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    default_tier: str = "free"
    tiers: dict[str, Tier] = Field(default_factory=_default_tiers)
    # Credits for one image at 512x512 with up to ``cost_base_steps`` steps.
    cost_base_pixels: int = Field(default=512 * 512, ge=64 * 64)
    cost_base_steps: int = Field(default=30, ge=1)
    limits: Limits = Field(default_factory=Limits)
    dispatch: Dispatch = Field(default_factory=Dispatch)
    grid: GridLimits = Field(default_factory=GridLimits)
    blocklist_file: Path | None = None
    # Extra/overriding model entries (TOML); default: {data_dir}/models.toml when present.
    models_file: Path | None = None
    # The shop's catalogue (TOML, core/shop.py); default: {data_dir}/shop.toml when present.
    shop_file: Path | None = None
    # Identities (``telegram:123``, ``discord:456``) that may refund payments from the chat.
    operators: list[str] = Field(default_factory=list)
    link_code_ttl_s: int = Field(default=600, ge=30)
    # How long a gallery link opens the gallery (the bots' /gallery, `atelier gallery link`).
    gallery_link_ttl_s: int = Field(default=7 * 86400, ge=60)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics: Metrics = Field(default_factory=Metrics)
    autoscale: Autoscale = Field(default_factory=Autoscale)
    retention: Retention = Field(default_factory=Retention)

    @field_validator(
        "signing_key", "telegram_token", "discord_token", "telegram_webhook_secret",
        "database_url", "models_file", "blocklist_file", "shop_file", mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        # `ATELIER_TELEGRAM_TOKEN=` in an env file (compose's, a Secret's) means "not set".
        return None if isinstance(v, str) and v.strip() == "" else v

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("telegram_api_base_url", "telegram_file_base_url", "public_base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v

    @field_validator("discord_api_base_url")
    @classmethod
    def _discord_api(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("discord_gateway_url")
    @classmethod
    def _discord_gateway(cls, v: str) -> str:
        if not v.startswith(("ws://", "wss://")):
            raise ValueError(f"must start with ws:// or wss://, got {v!r}")
        return v

    @field_validator("web_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("telegram_webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        if v is not None and v.strip() == "":
            return None
        if v is not None and not v.startswith("https://"):
            raise ValueError(f"Telegram only posts to https:// URLs, got {v!r}")
        return v

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _webhook_secret(cls, v: SecretStr | None) -> SecretStr | None:
        # What Telegram accepts as a secret_token.
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", v.get_secret_value()):
            raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return v

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("sqlite", "postgresql")):
            raise ValueError(f"must be a sqlite:// or postgresql:// URL, got {v.split('://')[0]!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and v.strip() == "":
            return None
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_tier not in self.tiers:
            raise ValueError(
                f"default_tier {self.default_tier!r} is not one of the tiers {sorted(self.tiers)}"
            )
        if self.limits.min_side > self.limits.max_side:
            raise ValueError("limits.min_side must not exceed limits.max_side")
        if self.mode is Mode.production:
            if self.signing_key is None:
                raise ValueError("ATELIER_SIGNING_KEY is required in production mode")
            if self.database_url is None:
                raise ValueError("ATELIER_DATABASE_URL is required in production mode")
        if self.signing_key is not None and len(self.signing_key.get_secret_value()) < 32:
            raise ValueError("ATELIER_SIGNING_KEY must be at least 32 characters")
        return self

    # Derived values -----------------------------------------------------------------

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'atelier.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    def worker_config(self) -> WorkerConfig:
        """The part of these settings a worker actor receives."""
        return WorkerConfig(
            data_dir=self.data_dir, models_file=self.models_file,
            blocklist_file=self.blocklist_file, log_format=self.log_format,
            log_level=self.log_level,
        )

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise ConfigError(f"unknown tier {name!r}; known tiers: {sorted(self.tiers)}") from None

    @cached_property
    def resolved_signing_key(self) -> bytes:
        """The link-signing key. Single-box: generated once into the data dir and reused."""
        if self.signing_key is not None:
            return self.signing_key.get_secret_value().encode()
        path = self.data_dir / SIGNING_KEY_FILE
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(48))
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_text().strip().encode()


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) as (host, port); ValueError naming the text otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT like 127.0.0.1:8000, got {text!r}")
    return host, int(port)


def _variable_name(loc: tuple[Any, ...]) -> str:
    return "ATELIER_" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))


def load_settings(**overrides: Any) -> Settings:
    """Build Settings or raise ConfigError naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = _variable_name(err["loc"]) if err["loc"] else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
