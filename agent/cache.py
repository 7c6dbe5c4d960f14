"""Content-addressed artifact cache: `<cache_dir>/<sha256>`, filled only with verified files.

A hit re-hashes the file (artifacts are small models) and touches its mtime, so the mtime orders
the files by last use; a file that no longer hashes to its name is deleted and downloaded again.
After a download, the least recently used files are evicted until the cache fits its size cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """The artifact could not be put in the cache."""


class ArtifactDownloadError(ArtifactError):
    """The server answered the download with an error status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ArtifactIntegrityError(ArtifactError):
    """The downloaded bytes do not hash (or size) to what the job announced."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactCache:
    """`max_bytes` caps the total size of the cached files (None: no cap)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes

    @staticmethod
    def _check_sha(sha256: str) -> str:
        sha = sha256.strip().lower()
        if not _SHA256.match(sha):
            raise ArtifactError(f"not a sha256 hex digest: {sha256!r}")
        return sha

    def path_for(self, sha256: str) -> Path:
        return self.root / self._check_sha(sha256)

    def get(self, sha256: str) -> Path | None:
        """The cached file for `sha256`, verified and marked as just used; or None. A cached file
        that does not hash to `sha256` is deleted. Never touches the network."""
        path = self.path_for(sha256)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            return None
        if actual != path.name:
            log.warning("cached artifact %s is corrupt (hashes to %s); deleting it", path.name, actual)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        return path

    def download(
        self, client: httpx.Client, url: str, sha256: str, expected_size: int | None = None
    ) -> Path:
        """Return the cached file, downloading `url` with `client` on a miss.

        The body streams to a temporary file in the cache directory, is hashed on the way,
        and is renamed into place only when the sha256 (and size, if given) match; otherwise
        the temporary file is removed and ArtifactIntegrityError raised. An error status raises
        ArtifactDownloadError; transport errors propagate as httpx.TransportError. A download
        is followed by `evict`, which never removes the file just downloaded.
        """
        hit = self.get(sha256)
        if hit is not None:
            return hit
        target = self.path_for(sha256)
        expected = target.name
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".partial-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out, client.stream("GET", url) as response:
                if response.status_code != 200:
                    response.read()
                    raise ArtifactDownloadError(
                        f"GET {url} -> HTTP {response.status_code}: {response.text[:500]}",
                        status_code=response.status_code,
                    )
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual != expected:
                raise ArtifactIntegrityError(f"sha256 mismatch for {url}: expected {expected}, got {actual}")
            if expected_size is not None and expected_size > 0 and size != expected_size:
                raise ArtifactIntegrityError(f"size mismatch for {url}: expected {expected_size} bytes, got {size}")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.evict(keep=target)
        return target

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used files until the cache fits `max_bytes`; `keep` is never
        deleted (so one file larger than the cap stays). Returns the deleted files."""
        if self.max_bytes is None:
            return []
        entries: list[tuple[float, int, Path]] = []
        for path in self.root.iterdir():
            if not _SHA256.match(path.name):
                continue  # a download in progress, or not ours
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        evicted: list[Path] = []
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
            evicted.append(path)
        if evicted:
            log.info("artifact cache: evicted %d file(s) to stay under %d bytes", len(evicted), self.max_bytes)
        return evicted
