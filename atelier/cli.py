"""The ``atelier`` command line: database, styles, accounts and credits, models, devices."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from atelier import serve
from atelier.apikey_cli import apikey_app
from atelier.app import open_store
from atelier.controlnet_cli import train_demo_controlnet
from atelier.db_cli import db_prune
from atelier.gallery_cli import gallery_app
from atelier.grow_cli import grow_demo
from atelier.wiring import (
    REPLACE_HELP,
    console,
    fail,
    keep_shipped,
    quiet_ml_libraries,
    recipe_from_options,
    settings_or_exit,
)
from core.errors import AtelierError
from core.redact import redact_url

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlmodel import Session

    from cluster.registry import ModelRegistry
    from core.settings import Settings
    from storage.accounts import AccountRead

app = typer.Typer(
    help="Atelier: a self-hosted image studio for chat communities.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
account_app = typer.Typer(help="Accounts and identities.", no_args_is_help=True)
credits_app = typer.Typer(help="Credits.", no_args_is_help=True)
app.add_typer(db_app, name="db")
db_app.command("prune")(db_prune)
app.add_typer(account_app, name="account")
app.add_typer(credits_app, name="credits")
bot_app = typer.Typer(help="Chat bots as processes of their own.", no_args_is_help=True)
app.add_typer(bot_app, name="bot")
app.add_typer(apikey_app, name="apikey")
app.add_typer(gallery_app, name="gallery")

_settings = settings_or_exit
_fail = fail


def _identity(spec: str) -> tuple[str, str]:
    platform, sep, user = spec.partition(":")
    if not sep or not platform or not user:
        raise typer.BadParameter(f"expected PLATFORM:USER (e.g. telegram:12345), got {spec!r}")
    return platform.lower(), user


_DURATION = re.compile(r"^(\d+)([dhm])$")


def _duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise typer.BadParameter(f"expected a duration like 90d, 12h or 30m, got {text!r}")
    n, unit = int(m[1]), m[2]
    return {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}[unit]


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (creates the SQLite file on first run)."""
    from storage.db import head_revision, upgrade

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    console.print(
        f"database at {redact_url(settings.db_url)} is at revision [bold]{head_revision()}[/bold]"
    )


@db_app.command("check")
def db_check() -> None:
    """Exit 0 when the database is at this code's revision, else 1 saying why (what a
    deployment's init container waits on before starting a process)."""
    from atelier.app import open_engine
    from atelier.wiring import err_console
    from storage.db import check_migrated

    settings = _settings()
    with open_engine(settings) as engine:
        try:
            check_migrated(engine)
        except AtelierError as exc:
            raise _fail(exc) from None
        except Exception as exc:  # not reachable yet: the caller tries again
            err_console.print(f"[red]error:[/red] database not reachable: {exc}")
            raise typer.Exit(1) from None
    console.print(f"database at {redact_url(settings.db_url)} is migrated")


@app.command("styles")
def styles() -> None:
    """List the curated styles."""
    from core.styles import default_registry

    table = Table("name", "label", "template")
    for style in default_registry().all():
        table.add_row(style.name, style.label, style.prompt)
    console.print(table)


@account_app.command("show")
def account_show(
    identity: str = typer.Argument(..., help="PLATFORM:USER, e.g. telegram:12345"),
) -> None:
    """Show the account behind an identity: tier, linked identities, balance."""
    from bots.common.texts import describe_balance
    from storage import accounts, ledger

    platform, user = _identity(identity)
    settings = _settings()
    now = datetime.now(UTC)
    try:
        with open_store(settings) as tx, tx() as session:
            acc = accounts.find_account(session=session, platform=platform, platform_user_id=user)
            ids = accounts.list_identities(session=session, account_id=acc.id)
            bal = ledger.balance(session=session, account_id=acc.id, now=now, tiers=settings.tiers)
    except AtelierError as exc:
        raise _fail(exc) from None
    table = Table(show_header=False)
    table.add_row("account", str(acc.id))
    table.add_row("tier", acc.tier)
    table.add_row("created", acc.created_at.isoformat(timespec="seconds"))
    if acc.blocked_at is not None:
        since = acc.blocked_at.isoformat(timespec="seconds")
        table.add_row("blocked", f"since {since}: {acc.blocked_reason}")
    else:
        table.add_row("blocked", "no")
    table.add_row("identities", ", ".join(f"{i.platform}:{i.platform_user_id}" for i in ids))
    table.add_row("credits", f"{bal.total} ({describe_balance(bal, now)})")
    for pack in bal.packs:
        expiry = pack.expires_at.date().isoformat() if pack.expires_at else "never"
        table.add_row("  pack", f"{pack.amount} (expires {expiry})")
    console.print(table)


@credits_app.command("grant")
def credits_grant(
    identity: str = typer.Argument(..., help="PLATFORM:USER, e.g. telegram:12345"),
    amount: int = typer.Argument(..., min=1, help="credits to add"),
    expires: str | None = typer.Option(None, help="expiry from now, e.g. 90d, 12h; default never"),
    key: str | None = typer.Option(None, help="idempotency key (e.g. a payment id)"),
) -> None:
    """Grant a credit pack to an identity's account (created if new)."""
    import secrets as _secrets

    from storage import accounts, ledger
    from storage.models import CreditKind

    platform, user = _identity(identity)
    ttl = _duration(expires) if expires else None
    settings = _settings()
    now = datetime.now(UTC)
    try:
        with open_store(settings) as tx, tx.begin() as session:
            acc = accounts.resolve_account(
                session=session,
                platform=platform,
                platform_user_id=user,
                default_tier=settings.default_tier,
                now=now,
            )
            pack = ledger.grant(
                session=session,
                account_id=acc.id,
                amount=amount,
                key=key or f"cli:{_secrets.token_hex(8)}",
                kind=CreditKind.admin,
                expires_at=now + ttl if ttl else None,
                now=now,
                note="atelier credits grant",
            )
            bal = ledger.balance(session=session, account_id=acc.id, now=now, tiers=settings.tiers)
    except AtelierError as exc:
        raise _fail(exc) from None
    expiry = pack.expires_at.isoformat(timespec="minutes") if pack.expires_at else "never"
    console.print(
        f"granted {pack.granted} credits to account {acc.id} ({platform}:{user}), "
        f"expires {expiry}; balance now {bal.total}"
    )


@account_app.command("set-tier")
def account_set_tier(
    identity: str = typer.Argument(..., help="PLATFORM:USER, e.g. telegram:12345"),
    tier: str = typer.Argument(..., help="one of the tiers (ATELIER_TIERS)"),
) -> None:
    """Put an identity's account on a tier (its next daily allowance follows it)."""
    from storage import accounts

    settings = _settings()
    acc, _, who = _change_account(settings, identity, lambda s, a: accounts.set_tier(
        session=s, account_id=a.id, tier=tier, known_tiers=settings.tiers))
    console.print(f"account {acc.id} ({who}) is now on tier [bold]{acc.tier}[/bold]")


@account_app.command("block")
def account_block(
    identity: str = typer.Argument(..., help="PLATFORM:USER, e.g. telegram:12345"),
    reason: str = typer.Option(..., help="why (shown to the person when refused; 1-300 chars)"),
) -> None:
    """Block an identity's account: new jobs and payments are refused with the reason."""
    from storage import accounts

    acc, _, who = _change_account(_settings(), identity, lambda s, a: accounts.block(
        session=s, account_id=a.id, reason=reason))
    console.print(
        f"account {acc.id} ({who}) is blocked: {acc.blocked_reason} "
        "(jobs already accepted still finish; `atelier account unblock` lifts it)"
    )


@account_app.command("unblock")
def account_unblock(
    identity: str = typer.Argument(..., help="PLATFORM:USER, e.g. telegram:12345"),
) -> None:
    """Lift the block on an identity's account."""
    from storage import accounts

    acc, before, who = _change_account(_settings(), identity, lambda s, a: accounts.unblock(
        session=s, account_id=a.id))
    state = "is no longer blocked" if before.blocked else "was not blocked"
    console.print(f"account {acc.id} ({who}) {state}")


def _change_account(
    settings: Settings, identity: str, change: Callable[[Session, AccountRead], AccountRead]
) -> tuple[AccountRead, AccountRead, str]:
    """``change`` an identity's account in one transaction: (after, before, "platform:user");
    our errors end the command with their message."""
    from storage import accounts

    platform, user = _identity(identity)
    try:
        with open_store(settings) as tx, tx.begin() as session:
            before = accounts.find_account(
                session=session, platform=platform, platform_user_id=user
            )
            return change(session, before), before, f"{platform}:{user}"
    except AtelierError as exc:
        raise _fail(exc) from None


@credits_app.command("purchases")
def credits_purchases(
    identity: str = typer.Argument(..., help="PLATFORM:USER, e.g. telegram:12345"),
) -> None:
    """List what an identity's account bought: packs, subscriptions, refunds."""
    from storage import accounts, purchases

    platform, user = _identity(identity)
    settings = _settings()
    try:
        with open_store(settings) as tx, tx() as session:
            acc = accounts.find_account(session=session, platform=platform, platform_user_id=user)
            bought = purchases.list_purchases(session=session, account_id=acc.id)
    except AtelierError as exc:
        raise _fail(exc) from None
    console.print(f"account {acc.id} (tier {acc.tier}): {len(bought)} purchase(s)")
    for p in bought:  # one line each: keys are long, a table would wrap them
        what = f"{p.kind.value} {p.product}" + (f" (tier {p.tier})" if p.tier else "")
        expires = p.expires_at.isoformat(timespec="minutes") if p.expires_at else "never"
        line = (
            f"{p.key}  {what}  {p.credits} credits  {p.status.value}  "
            f"bought {p.created_at.isoformat(timespec='minutes')}  expires {expires}"
        )
        if p.status.value == "refunded":
            line += f"  taken back {p.clawed_back}, owed {p.owed}"
        console.print(line, soft_wrap=True, highlight=False)


models_app = typer.Typer(help="The model registry and offline tiny models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """List the registered models and whether each is available on this machine."""
    from cluster.availability import registry_table_rows
    from cluster.registry import ModelRegistry

    settings = _settings()
    try:
        registry = ModelRegistry.load(settings)
    except AtelierError as exc:
        raise _fail(exc) from None
    table = Table(
        "name", "family", "size", "steps", "VRAM", "here", "source", caption="* the default model"
    )
    table.columns[-1].overflow = "fold"
    for row in registry_table_rows(registry):
        name = f"{row['name']} *" if row["default"] else str(row["name"])
        table.add_row(
            name,
            str(row["family"]),
            str(row["default_size"]),
            str(row["default_steps"]),
            f"{row['min_vram_gb']:g}G",
            str(row["availability"]) if row["available"] else "no",
            str(row["source"]),
        )
    console.print(table)
    for row in registry_table_rows(registry):
        if not row["available"]:
            console.print(f"{row['name']}: {row['how']}", markup=False)
    _adapters_table(registry)


def _adapters_table(registry: ModelRegistry) -> None:
    """The LoRAs and embeddings of ``registry`` with their availability here."""
    from cluster.availability import adapter_table_rows

    rows = adapter_table_rows(registry)
    if not rows:
        console.print(
            "No LoRAs or embeddings: add [loras.NAME] to your models.toml.", markup=False
        )
        return
    table = Table("adapter", "kind", "family", "weight", "triggers", "here", "source")
    table.columns[-1].overflow = "fold"  # a long path folds; the short columns stay whole
    for column in table.columns[:-1]:
        column.no_wrap = True
    for row in rows:
        table.add_row(
            str(row["name"]), str(row["kind"]),
            f"{row['family']} ({row['models']})" if row["models"] else str(row["family"]),
            f"{row['default_weight']:g}", str(row["triggers"]),
            str(row["availability"]) if row["available"] else "no", str(row["source"]),
        )
    console.print(table)
    for row in rows:
        if not row["available"]:
            console.print(f"{row['name']}: {row['how']}", markup=False)


@models_app.command("make-tiny")
def models_make_tiny(
    directory: str | None = typer.Argument(
        None, help="where to save one pipeline; default: both tiny models in the data dir"
    ),
    family: str = typer.Option("sd15", help="sd15 or sdxl (with DIR)"),
    seed: int = typer.Option(0, help="weight seed"),
) -> None:
    """Build tiny random-weight pipelines offline (for tests and trying Atelier without a GPU)."""
    from pathlib import Path

    from engine.tiny import TINY_MODEL_DIRS, make_tiny, make_tiny_models

    settings = _settings()
    quiet_ml_libraries()
    if directory is None:
        made = make_tiny_models(settings.data_dir / "models", seed=seed)
        for fam, path in made.items():
            name = "tiny" if fam == "sd15" else "tiny-xl"
            console.print(f"{fam}: {path}  (use it as --model {name})")
        return
    if family not in TINY_MODEL_DIRS:
        raise typer.BadParameter(f"family must be one of {sorted(TINY_MODEL_DIRS)}, got {family!r}")
    path = make_tiny(Path(directory), family, seed)  # type: ignore[arg-type]
    console.print(f"{family}: {path}\nregister it in your models file, e.g.")
    console.print(
        f'  [models.my-tiny]\n  path = "{path.resolve()}"\n  family = "{family}"', markup=False
    )


@models_app.command("train-demo")
def models_train_demo(
    out: str | None = typer.Option(
        None, help="where to save the pipeline; default: cluster/data/demo, the shipped one "
        "(with --replace)"
    ),
    minutes: float = typer.Option(28.0, help="wall-clock budget for the whole training"),
    seed: int = typer.Option(0, help="the seed of the scenes and the weights"),
    device: str = typer.Option(
        "auto", help="cpu, cuda (the shipped model: an H200, 5.8 min) or auto (cuda if present)"
    ),
    steps: int | None = typer.Option(None, help="stop after this many denoiser steps"),
    init_from: str | None = typer.Option(
        None, "--from", help="a demo model folder to go on training instead of starting afresh"
    ),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="a recipe field, e.g. --set lr=5e-4 --set sided=0.6 (see Recipe)"
    ),
    replace: bool = typer.Option(False, "--replace", help=REPLACE_HELP),
) -> None:
    """Train the demo model from scratch (shapes in colours, from captions), or go on training
    one (--from); it is the default model whenever the configured one is not available."""
    from pathlib import Path

    import torch

    from cluster.registry import DEMO_MODEL_DIR
    from engine.demo.train import Recipe, train_demo

    quiet_ml_libraries()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = Path(out) if out else DEMO_MODEL_DIR
    keep_shipped(target, replace)
    recipe = Recipe(seed=seed, minutes=minutes, device=device,
                    init_from=init_from)
    recipe = recipe_from_options(recipe, steps, overrides)
    record = train_demo(target, recipe, progress=console.print)
    console.print(f"demo model: {target} ({record['unet_steps']} denoiser steps in "
                  f"{record['minutes']} min on {device}; recipe in {target / 'recipe.json'})")


models_app.command("train-demo-controlnet")(train_demo_controlnet)
models_app.command("grow-demo")(grow_demo)


@models_app.command("train-demo-lora")
def models_train_demo_lora(
    out: str | None = typer.Option(
        None, help="where to save the LoRA; default: cluster/data/demo-lora, the shipped one "
        "(with --replace)"
    ),
    model_dir: str | None = typer.Option(
        None, "--model-dir", help="the demo model folder to train on; default: the shipped one"
    ),
    minutes: float = typer.Option(10.0, help="wall-clock budget"),
    steps: int | None = typer.Option(None, help="stop after this many steps"),
    seed: int = typer.Option(0, help="the seed of the scenes and the LoRA"),
    threads: int = typer.Option(1, help="CPU threads for torch"),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="a recipe field, e.g. --set rank=8 --set lr=1e-3 (see LoraRecipe)"
    ),
    replace: bool = typer.Option(False, "--replace", help=REPLACE_HELP),
) -> None:
    """Train the demo model's LoRA: every shape drawn as an outline (use it as
    `--model demo --lora outline`)."""
    from pathlib import Path

    from cluster.registry import DEMO_LORA_DIR, DEMO_MODEL_DIR
    from engine.demo.lora import LORA_FILE, LoraRecipe, train_demo_lora

    quiet_ml_libraries()
    target = Path(out) if out else DEMO_LORA_DIR
    keep_shipped(target, replace)
    recipe = LoraRecipe(seed=seed, minutes=minutes, threads=threads)
    recipe = recipe_from_options(recipe, steps, overrides)
    base = Path(model_dir) if model_dir else DEMO_MODEL_DIR
    record = train_demo_lora(base, target, recipe, progress=console.print)
    console.print(f"demo LoRA: {target / LORA_FILE} ({record['bytes']:,} bytes, "
                  f"{record['steps']} steps in {record['minutes']} min; recipe in "
                  f"{target / 'recipe.json'})")
    if out:
        console.print("register it in your models file, e.g.")
        console.print(f'  [loras.my-outline]\n  file = "{(target / LORA_FILE).resolve()}"\n'
                      '  family = "sd15"\n  models = ["demo"]', markup=False)


@app.command("devices")
def devices(
    measure: bool = typer.Option(False, "--measure", help="Calibrate: time fp32/bf16/int8/"
                                 "compiled UNet variants here and store the figures."),
    family: str = typer.Option("sd15", help="Model family the profile (and --measure) is for."),
    side: int = typer.Option(256, help="--measure: image side in pixels."),
    tiny: bool = typer.Option(False, help="--measure with the tests' tiny UNet (seconds)."),
    compile: bool = typer.Option(True, help="--measure: also time torch.compile (minutes)."),
) -> None:
    """Show the devices this machine has and the profile a worker would use on each; with
    --measure, first calibrate the first device (stored beside the data dir)."""
    from engine.calibrate import calibration_path, load_calibration
    from engine.devices import choose_profile, describe_profile, detect_devices

    path = calibration_path(_settings().data_dir)
    try:
        calibration = load_calibration(path)
        if measure:
            from atelier.measure import measure_first_device

            calibration = measure_first_device(path, calibration, family, side, tiny,
                                               compile=compile)
    except AtelierError as exc:
        raise _fail(exc) from None
    for info in detect_devices():
        profile = choose_profile(info, family, compile=True, quantize="int8",
                                 calibration=calibration)
        console.print(describe_profile(profile), markup=False)
        found = calibration.find(profile.device_class, family) if calibration else None
        if found is not None:
            from engine.calibrate import describe_measurement

            console.print(describe_measurement(found), markup=False)
        console.print(f"(a model that opts into compile and int8; calibration: {path})")
        console.print()


app.command("up")(serve.up)
app.command("imagine")(serve.imagine)
app.command("dispatcher")(serve.dispatcher)
app.command("worker")(serve.worker)
app.command("jobs")(serve.jobs)
app.command("web")(serve.web)
bot_app.command("telegram")(serve.bot_telegram)
bot_app.command("discord")(serve.bot_discord)
