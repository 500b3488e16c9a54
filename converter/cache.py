"""The reuse cache: which converted blob a (registry, source chain ID, options) already produced.

Two stores with the same four methods: one SQLite file (WAL, so CLI runs and webhook workers on one machine
share it), or Redis (`cache_url`, the webhook's redis mode) so that workers on different machines reuse
each other's converted layers. A converted layer blob depends only on
its source chain ID (all layers below it included) and the byte-shaping options, so that triple is the key.
The row also says in which repository the blob was pushed, so another repository of the same registry can
mount it instead of converting again. The filesystem state above a reused prefix is not stored here: the
pipeline rebuilds it from the converted lower blobs themselves (ImageBuilder.from_disk).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs

SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    registry   TEXT NOT NULL,
    chain_id   TEXT NOT NULL,
    options    TEXT NOT NULL,
    digest     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    repository TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (registry, chain_id, options)
)
"""


def default_cache_dir() -> Path:
    return platformdirs.user_cache_path("obd-autoconvert")


@dataclass(frozen=True)
class CachedLayer:
    digest: str
    size: int
    repository: str


class LayerCache:
    """Thread-safe; every call is one short transaction."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        path = Path(directory) if directory else default_cache_dir()
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "layers.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def get(self, registry: str, chain_id: str, options: str) -> CachedLayer | None:
        with self._lock:
            row = self._db.execute("SELECT digest, size, repository FROM layers WHERE registry=? AND chain_id=? "
                                   "AND options=?", (registry, chain_id, options)).fetchone()
        return CachedLayer(row[0], int(row[1]), row[2]) if row else None

    def put(self, registry: str, chain_id: str, options: str, layer: CachedLayer) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (registry, chain_id, options, layer.digest, layer.size, layer.repository, time.time()))

    def forget(self, registry: str, chain_id: str, options: str) -> None:
        """Drop a row whose blob turned out to be gone from the registry."""
        with self._lock:
            self._db.execute("DELETE FROM layers WHERE registry=? AND chain_id=? AND options=?",
                             (registry, chain_id, options))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LayerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisLayerCache:
    """The same cache in Redis: one hash per (registry, chain ID, options) key. redis-py is thread-safe."""

    PREFIX = "obd:layer-cache:"

    def __init__(self, url: str) -> None:
        from redis import Redis  # installed with rq, which the webhook's redis mode already needs

        self._redis = Redis.from_url(url)

    def _key(self, registry: str, chain_id: str, options: str) -> str:
        return f"{self.PREFIX}{registry}|{chain_id}|{options}"

    def get(self, registry: str, chain_id: str, options: str) -> CachedLayer | None:
        row = self._redis.hgetall(self._key(registry, chain_id, options))
        if not row:
            return None
        return CachedLayer(row[b"digest"].decode(), int(row[b"size"]), row[b"repository"].decode())

    def put(self, registry: str, chain_id: str, options: str, layer: CachedLayer) -> None:
        self._redis.hset(self._key(registry, chain_id, options), mapping={
            "digest": layer.digest, "size": layer.size, "repository": layer.repository, "updated_at": time.time()})

    def forget(self, registry: str, chain_id: str, options: str) -> None:
        self._redis.delete(self._key(registry, chain_id, options))

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> RedisLayerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_layer_cache(directory: str | os.PathLike[str] | None = None,
                     url: str | None = None) -> LayerCache | RedisLayerCache:
    """Redis when a redis:// (rediss://, unix://) URL is given, else SQLite in `directory`."""
    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"cache_url must be a redis://, rediss:// or unix:// URL, got {url!r}")
        return RedisLayerCache(url)
    return LayerCache(directory)
