"""Content-addressed blob store on the filesystem: ``ab/cd/<sha256>.png`` under the blob dir,
written atomically; keys are validated so that no key can reach outside the store (a read of
such a key finds nothing, and is logged: a stored row should never hold one)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from core.errors import InvalidRequest, NotFound
from core.settings import Settings

KEY_RE = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})(\.[a-z0-9]{1,8})$")
SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,8}$")
TEMP_PREFIX = ".tmp-"
log = logging.getLogger(__name__)


class BlobStore:
    """Immutable blobs named by their SHA-256: the same bytes are stored once."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStore:
        return cls(settings.blob_dir)

    def put(self, data: bytes, suffix: str = ".png") -> str:
        """Store ``data``; returns its key. Readers see the whole file or none of it."""
        if not SUFFIX_RE.match(suffix):
            raise InvalidRequest(f"blob suffix must look like .png, got {suffix!r}")
        digest = hashlib.sha256(data).hexdigest()
        key = f"{digest[:2]}/{digest[2:4]}/{digest}{suffix}"
        target = self._resolve(key)
        if target.is_file():
            return key
        self._write(target, key, data)
        return key

    def put_named(self, key: str, data: bytes) -> str:
        """Store ``data`` under a given valid key (a derived blob named by its source's hash,
        such as a thumbnail in a store of its own); replaces what was there, atomically."""
        self._write(self._resolve(key), key, data)
        return key

    def _write(self, target: Path, key: str, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        self._resolve(key)  # the fan-out dirs must not lead outside either
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def path(self, key: str) -> Path:
        """The file of an existing blob (e.g. to stream it); NotFound if it is not stored, or
        if the key is not one or leads outside the store (then a warning is logged)."""
        target = self._reading(key)
        if not target.is_file():
            raise NotFound(f"blob {key} is not stored")
        return target

    def exists(self, key: str) -> bool:
        try:
            return self._reading(key).is_file()
        except NotFound:
            return False

    def delete(self, key: str) -> bool:
        """Remove a blob; returns whether it was there. Callers check no image still uses it."""
        try:
            self._reading(key).unlink()
        except (NotFound, FileNotFoundError):
            return False
        return True

    def _reading(self, key: str) -> Path:
        """``_resolve`` for reads: a key that cannot name a stored blob names none (NotFound)."""
        try:
            return self._resolve(key)
        except InvalidRequest as exc:
            log.warning("blob store %s: refused %s", self.root, exc.message)
            raise NotFound(f"blob {key[:100]!r} is not stored") from None

    def _resolve(self, key: str) -> Path:
        match = KEY_RE.match(key)
        if match is None or not match.group(3).startswith(match.group(1) + match.group(2)):
            raise InvalidRequest(f"not a blob key: {key[:100]!r}")
        # Resolving follows symlinks, so a linked directory or file pointing outside is caught.
        target = (self.root / key).resolve()
        if not target.is_relative_to(self.root):
            raise InvalidRequest(f"blob key {key!r} leads outside the blob store")
        return target


def sha256_of(key: str) -> str:
    """The content hash a valid key names."""
    match = KEY_RE.match(key)
    if match is None:
        raise InvalidRequest(f"not a blob key: {key[:100]!r}")
    return match.group(3)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
