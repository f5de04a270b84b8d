"""Files that tasks download (``download`` setup steps, ``cloud_file`` gold files), cached by URL.

    cache = DownloadCache.from_config()          # $AGENTENV_HOME/cache/downloads
    path = cache.get("http://host/file.xlsx")    # fetched once, then read from disk

Each URL is one file named by the SHA-256 of the URL, with a ``.json`` beside it (URL, size, SHA-256
of the content). Writes go to a temporary file renamed into place, under a lock per URL, so desktops
fetching the same file at once fetch it once. Offline (``env.serve.downloads.offline`` /
``AGENTENV_OFFLINE=1``) nothing is fetched: a URL that is not cached is an error naming it.
``agentenv tasks fetch DIR`` fills the cache on a machine with network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agentenv.config import DownloadConfig


class DownloadError(RuntimeError):
    """A file could not be fetched (network, HTTP status, size) or is not cached while offline."""


class NotCached(DownloadError):
    """Offline, and the URL is not in the cache."""


@dataclass
class DownloadCache:
    root: Path
    offline: bool = False
    timeout_s: float = 60.0
    max_bytes: int = 2 * 2**30

    @classmethod
    def from_config(cls, cfg: DownloadConfig | None = None) -> "DownloadCache":
        cfg = cfg or DownloadConfig.from_env()
        return cls(Path(cfg.resolved_dir()), offline=cfg.offline, timeout_s=cfg.timeout_s, max_bytes=cfg.max_bytes)

    def path_for(self, url: str) -> Path:
        key = hashlib.sha256(url.encode()).hexdigest()
        return self.root / key[:2] / key

    def cached(self, url: str) -> bool:
        return self.path_for(url).is_file()

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, url: str) -> Path:
        """The cached file of ``url``, fetched first if needed (and allowed)."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise DownloadError(f"not an http(s) URL: {url!r}")
        path = self.path_for(url)
        if path.is_file():
            return path
        if self.offline:
            raise NotCached(f"offline and not cached: {url} (run `agentenv tasks fetch` where there is network)")
        with self._locked(path):
            if path.is_file():  # another desktop fetched it while we waited
                return path
            self._fetch(url, path)
        return path

    def _fetch(self, url: str, path: Path) -> None:
        import httpx

        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        digest, size = hashlib.sha256(), 0
        t0 = time.monotonic()
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=self.timeout_s) as r:
                if r.status_code != 200:
                    raise DownloadError(f"{url}: HTTP {r.status_code}")
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 16):
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise DownloadError(f"{url}: over the limit of {self.max_bytes} bytes "
                                                "(env.serve.downloads.max_bytes, serve-envs --download-max-bytes)")
                        if time.monotonic() - t0 > self.timeout_s * 10:
                            raise DownloadError(f"{url}: still downloading after {self.timeout_s * 10:.0f} s")
                        digest.update(chunk)
                        f.write(chunk)
            os.replace(tmp, path)
        except httpx.HTTPError as e:
            raise DownloadError(f"{url}: {type(e).__name__}: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"url": url, "bytes": size, "sha256": digest.hexdigest(), "fetched_at": time.time()}
        path.with_name(path.name + ".json").write_text(json.dumps(meta))
