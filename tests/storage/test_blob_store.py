"""Blob store: content addressing, atomic writes, and keys that cannot escape the store."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from core.errors import InvalidRequest, NotFound
from core.settings import Settings
from storage.blobs import TEMP_PREFIX, BlobStore, sha256_of


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_is_content_addressed_and_dedups(store: BlobStore) -> None:
    data = b"\x89PNG fake image"
    digest = hashlib.sha256(data).hexdigest()
    key = store.put(data)
    assert key == f"{digest[:2]}/{digest[2:4]}/{digest}.png"
    assert store.put(data) == key
    assert store.get(key) == data and store.exists(key) and sha256_of(key) == digest
    assert store.path(key) == store.root / key
    assert _files(store.root) == [store.root / key]
    other = store.put(b"other", suffix=".webp")
    assert other.endswith(".webp") and len(_files(store.root)) == 2
    assert store.delete(key) and not store.exists(key) and not store.delete(key)
    with pytest.raises(NotFound):
        store.get(key)


def test_from_settings_uses_the_blob_dir(tmp_path: Path) -> None:
    store = BlobStore.from_settings(Settings(data_dir=tmp_path))
    assert store.root == (tmp_path / "blobs").resolve()


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "ab/cd/../../../x.png",
        "ab/cd/" + "0" * 64 + ".png",  # fan-out does not match the hash
        "AB/CD/" + "ab" * 32 + ".png",
        "ab/cd/" + "abcd" + "0" * 60 + ".png/..",
        "ab\\cd\\" + "abcd" + "0" * 60 + ".png",
        "",
    ],
)
def test_bad_keys_name_no_blob_and_are_logged(
    store: BlobStore, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A read finds nothing there (a 404 at the web edge, not a 500), and says so in the log.
    for op in (store.get, store.path):
        with pytest.raises(NotFound), caplog.at_level(logging.WARNING, "storage.blobs"):
            op(key)
    assert not store.exists(key) and not store.delete(key)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 4
    with pytest.raises(InvalidRequest):
        store.put_named(key, b"x")


def test_symlinks_out_of_the_store_are_refused(
    store: BlobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret")
    digest = hashlib.sha256(b"top secret").hexdigest()
    key = f"{digest[:2]}/{digest[2:4]}/{digest}.png"
    # A fan-out directory that is a symlink to somewhere else...
    outside = tmp_path / "elsewhere"
    (outside / digest[2:4]).mkdir(parents=True)
    os.symlink(secret, outside / digest[2:4] / f"{digest}.png")
    os.symlink(outside, store.root / digest[:2])
    with pytest.raises(NotFound), caplog.at_level(logging.WARNING, "storage.blobs"):
        store.get(key)
    assert "outside" in caplog.text
    with pytest.raises(InvalidRequest, match="outside"):
        store.put(b"top secret")
    # ...and a blob file that is a symlink out.
    os.unlink(store.root / digest[:2])
    (store.root / digest[:2] / digest[2:4]).mkdir(parents=True)
    os.symlink(secret, store.root / key)
    with pytest.raises(NotFound):
        store.path(key)
    assert not store.delete(key) and secret.exists()


def test_bad_suffix_is_refused(store: BlobStore) -> None:
    for suffix in ("png", ".PNG", "./../x", ".p/ng", ""):
        with pytest.raises(InvalidRequest):
            store.put(b"x", suffix=suffix)


def test_writes_are_atomic_and_leave_no_temp_files(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = store.put(b"complete")
    assert not [p for p in store.root.rglob(TEMP_PREFIX + "*")]

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put(b"never lands")
    monkeypatch.undo()
    assert _files(store.root) == [store.root / key]  # no partial blob, no temp file
    digest = hashlib.sha256(b"never lands").hexdigest()
    assert not store.exists(f"{digest[:2]}/{digest[2:4]}/{digest}.png")
