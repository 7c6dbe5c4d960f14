"""Content-addressed artifact cache: `<cache_dir>/<sha256>`, filled only with verified files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

import httpx

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
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    @staticmethod
    def _check_sha(sha256: str) -> str:
        sha = sha256.strip().lower()
        if not _SHA256.match(sha):
            raise ArtifactError(f"not a sha256 hex digest: {sha256!r}")
        return sha

    def path_for(self, sha256: str) -> Path:
        return self.root / self._check_sha(sha256)

    def get(self, sha256: str) -> Path | None:
        """The cached file for `sha256`, or None. Never touches the network."""
        path = self.path_for(sha256)
        return path if path.is_file() else None

    def download(
        self, client: httpx.Client, url: str, sha256: str, expected_size: int | None = None
    ) -> Path:
        """Return the cached file, downloading `url` with `client` on a miss.

        The body streams to a temporary file in the cache directory, is hashed on the way,
        and is renamed into place only when the sha256 (and size, if given) match; otherwise
        the temporary file is removed and ArtifactIntegrityError raised. An error status raises
        ArtifactDownloadError; transport errors propagate as httpx.TransportError.
        """
        target = self.path_for(sha256)
        if target.is_file():
            return target
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
            return target
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
