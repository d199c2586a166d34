"""Migrations: they build exactly the models' schema, and an un-migrated database is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text

from core.errors import ConfigError, DatabaseNotMigrated
from storage.db import (
    alembic_config,
    check_migrated,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    normalize_url,
    schema_diff,
    upgrade,
)


def test_unmigrated_database_is_refused(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(DatabaseNotMigrated) as err:
            check_migrated(engine)
        assert current_revision(engine) is None
    finally:
        engine.dispose()
    message = err.value.message
    assert message.startswith("the database at ")
    assert f"is not migrated (at revision none, code needs {head_revision()}); " in message
    assert message.endswith("run `atelier db upgrade`")


def test_upgrade_matches_the_models(engine: Engine) -> None:
    check_migrated(engine)
    assert current_revision(engine) == head_revision()
    assert schema_diff(engine) == []


def test_database_from_a_newer_release_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(DatabaseNotMigrated, match="revision ffff, which this code does not know"):
        check_migrated(engine)


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(db_url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert current_revision(engine) is None
        upgrade(db_url)
        upgrade(db_url)  # a no-op when already at head
        check_migrated(engine)
    finally:
        engine.dispose()


def test_sqlite_connections_are_configured(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            conn.rollback()
    finally:
        engine.dispose()


def test_database_urls_are_normalized() -> None:
    assert normalize_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ConfigError, match="unsupported database driver 'mysql'"):
        normalize_url("mysql://h/db")


def test_0002_marks_jobs_finished_before_it_delivered(db_url: str) -> None:
    """Jobs finished before delivered_at existed were delivered the old way: the upgrade marks
    them (at their finish time), or dispatchers would re-announce them; unfinished stay NULL."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO accounts (id, tier, created_at) VALUES (1, 'free', :t)"
            ), {"t": "2026-11-01 10:00:00"})
            for job_id, status, finished in (("a", "succeeded", "2026-11-01 10:05:00"),
                                             ("b", "queued", None)):
                conn.execute(text(
                    "INSERT INTO jobs (id, idempotency_key, account_id, request_json, status, "
                    "attempts, delivery_json, cost, created_at, finished_at, updated_at) VALUES "
                    "(:id, :id, 1, '{}', :status, 0, '{}', 1, :t, :f, :t)"
                ), {"id": job_id, "status": status, "t": "2026-11-01 10:00:00", "f": finished})
        upgrade(db_url)
        check_migrated(engine)
        with engine.connect() as conn:
            rows = dict(conn.execute(text(
                "SELECT id, delivered_at IS NOT NULL AND delivered_at = finished_at FROM jobs"
            )).all())
            conn.rollback()
        assert {k: bool(v) for k, v in rows.items()} == {"a": True, "b": False}
    finally:
        engine.dispose()


def test_0005_backfills_styles_and_platforms(db_url: str) -> None:
    """Images stored before 0005 get their image_styles rows and platform (from the job's
    identity; '' without one), so the indexed filters find them as the LIKE scan did."""
    from storage import gallery

    upgrade(db_url, "0004")
    engine = make_engine(db_url)
    t = "2026-11-01 10:00:00"
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO accounts (id, tier, created_at) VALUES (1, 'free', :t)"),
                         {"t": t})
            conn.execute(text(
                "INSERT INTO identities (id, platform, platform_user_id, account_id, created_at) "
                "VALUES (1, 'discord', 'u1', 1, :t)"), {"t": t})
            for job_id, identity in (("a", 1), ("b", None)):
                conn.execute(text(
                    "INSERT INTO jobs (id, idempotency_key, account_id, identity_id, "
                    "request_json, status, attempts, delivery_json, cost, created_at, updated_at) "
                    "VALUES (:id, :id, 1, :identity, '{}', 'succeeded', 1, '{}', 1, :t, :t)"
                ), {"id": job_id, "identity": identity, "t": t})
            for n, (job_id, styles) in enumerate(
                (("a", "anime,photo"), ("a", ""), ("b", "photo")), start=1
            ):
                conn.execute(text(
                    'INSERT INTO images (id, job_id, account_id, "index", seed, width, height, '
                    "blob_key, sha256, prompt, negative, styles, model, infotext, created_at) "
                    "VALUES (:n, :job, 1, :n, 1, 64, 64, 'k', 's', 'p', '', :styles, 'sd15', '', "
                    ":t)"), {"n": n, "job": job_id, "styles": styles, "t": t})
        upgrade(db_url)
        check_migrated(engine)
        from sqlmodel import Session

        with Session(engine) as s:
            def ids(**kw: str) -> set[int]:
                page = gallery.list_images(session=s, account_id=1, **kw)  # type: ignore[arg-type]
                return {i.id for i in page.items}

            assert ids(style="photo") == {1, 3}
            assert ids(style="anime") == {1}
            assert ids(platform="discord") == {1, 2}
            assert ids() == {1, 2, 3}
            s.rollback()
    finally:
        engine.dispose()


def _one_image(db_url: str, prompt: str) -> None:
    """Account 1 with one job and one image, inserted in SQL (at whichever revision)."""
    engine = make_engine(db_url)
    t = "2026-11-01 10:00:00"
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO accounts (id, tier, created_at) VALUES (1, 'free', :t)"),
                         {"t": t})
            conn.execute(text(
                "INSERT INTO jobs (id, idempotency_key, account_id, request_json, status, "
                "attempts, delivery_json, cost, created_at, updated_at) "
                "VALUES ('a', 'a', 1, '{}', 'succeeded', 1, '{}', 1, :t, :t)"), {"t": t})
            conn.execute(text(
                'INSERT INTO images (id, job_id, account_id, "index", seed, width, height, '
                "blob_key, sha256, prompt, negative, styles, model, infotext, created_at) "
                "VALUES (1, 'a', 1, 0, 1, 64, 64, 'k', 's', :p, '', '', 'sd15', '', :t)"),
                {"p": prompt, "t": t})
    finally:
        engine.dispose()


def _search_state(db_url: str, q: str | None) -> tuple[set[int], set[str]]:
    """The images of account 1 that ``q`` finds (none searched for None), and the PostgreSQL
    prompt indexes there."""
    from sqlmodel import Session

    from storage import gallery

    engine = make_engine(db_url)
    try:
        found: set[int] = set()
        with Session(engine) as s:
            if q is not None:
                found = {i.id for i in gallery.list_images(session=s, account_id=1,
                                                           search=q).items}
            s.rollback()
        indexes: set[str] = set()
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                indexes = set(conn.execute(text(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'images' "
                    "AND indexname IN ('ix_images_search', 'ix_images_prompt_fts', "
                    "'ix_images_words')"
                )).scalars())
                conn.rollback()
        return found, indexes
    finally:
        engine.dispose()


def test_0006_keys_prompt_search_by_account(db_url: str) -> None:
    """0006 replaces the all-accounts words index with one keyed by account (PostgreSQL);
    images from before it are found, and a downgrade brings the old index back."""
    upgrade(db_url, "0005")
    _one_image(db_url, "a red fox at dusk")
    upgrade(db_url, "0007")
    pg = db_url.startswith("postgresql")
    # (Today's search reads 0011's index: at 0007, only which index is there is checked.)
    assert _search_state(db_url, None)[1] == ({"ix_images_search"} if pg else set())
    downgrade(db_url, "0005")
    assert _search_state(db_url, None)[1] == ({"ix_images_prompt_fts"} if pg else set())


def test_0006_without_btree_gin_keeps_the_old_index(
    pg_admin: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A role that may not create extensions (no CREATE on its database) still upgrades:
    search keeps the all-accounts index, and the upgrade says why."""
    import uuid

    import psycopg

    if pg_admin is None:
        pytest.skip("PostgreSQL is unreachable")
    name = f"atelier_noext_{uuid.uuid4().hex[:10]}"
    base = pg_admin.rsplit("/", 1)[0]
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(f"{base}/{name}", autocommit=True) as conn:
            conn.execute(f'GRANT CREATE ON SCHEMA public TO "{name}"')
            conn.execute(f'REVOKE CREATE ON DATABASE "{name}" FROM PUBLIC, "{name}"')
        url = f"postgresql://{name}@" + base.split("@", 1)[1] + f"/{name}"
        with caplog.at_level("WARNING", logger="alembic.runtime.migration"):
            upgrade(url)
        assert "btree_gin is not available" in caplog.text
        assert "keeping ix_images_prompt_fts" in caplog.text
        _one_image(url, "a red fox at dusk")
        # 0011's index needs no extension: it replaces the all-accounts one there too.
        assert _search_state(url, "fox dusk") == ({1}, {"ix_images_words"})
        engine = make_engine(url)
        try:
            check_migrated(engine)
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def test_0011_keys_each_word_by_its_account(db_url: str) -> None:
    """0011 indexes each prompt word under its account ('1:fox') and drops 0007's index
    (PostgreSQL); a person's search finds only their own images, before and after; a
    downgrade brings 0007's index back."""
    upgrade(db_url, "0010")
    _one_image(db_url, "a red fox at dusk")
    upgrade(db_url)
    pg = db_url.startswith("postgresql")
    assert _search_state(db_url, "fox dusk") == ({1}, {"ix_images_words"} if pg else set())
    assert _search_state(db_url, "fox owl")[0] == set()
    engine = make_engine(db_url)
    try:
        check_migrated(engine)
        if pg:
            with engine.connect() as conn:
                words = conn.execute(text(
                    "SELECT atelier_account_words(7, 'A red FOX, at dusk!')")).scalar_one()
                conn.rollback()
            assert sorted(words) == ["7:a", "7:at", "7:dusk", "7:fox", "7:red"]
    finally:
        engine.dispose()
    downgrade(db_url, "0010")
    assert _search_state(db_url, None)[1] == ({"ix_images_search"} if pg else set())
