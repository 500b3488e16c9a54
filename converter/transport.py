"""Where images come from and go to: a registry repository, or an OCI image layout directory (`oci:PATH[:TAG]`).

Both stores offer the same small interface, so the pipeline never asks which one it has. Blobs read from
either are verified against their digest when the stream ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from .image import ImageError, canonical, sha256_digest
from .options import RegistryOptions
from .registry import (
    MANIFEST_TYPES,
    OCI_INDEX,
    Credentials,
    DigestMismatchError,
    InvalidReferenceError,
    Manifest,
    NotFoundError,
    Reference,
    RegistryClient,
    RetryPolicy,
    parse_reference,
)
from .registry.reference import DIGEST_RE, HOST_RE, MAX_REPOSITORY, REPOSITORY_RE, TAG_RE
from .shape import check_index, load_json_object

OCI_REF_NAME = "org.opencontainers.image.ref.name"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# Space is released in steps of this size behind the read position. Nothing re-reads released bytes: the
# registry client resends a failed chunk from memory, and a non-seekable source cannot be restarted.
RELEASE_STEP = 8 << 20
LAYOUT_PREFIX = "oci:"
COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class Location:
    """A parsed source or target: a registry reference, or a layout directory with an optional tag."""

    layout: str | None = None  # absolute path of an OCI layout
    reference: Reference | None = None
    ref: str | None = None  # tag or digest (layouts); registry references carry their own

    @property
    def is_layout(self) -> bool:
        return self.layout is not None

    @property
    def registry(self) -> str:
        """The cache's registry key: host[:port], or "oci:<path>" for a layout."""
        return LAYOUT_PREFIX + self.layout if self.layout is not None else self.reference.registry  # type: ignore[union-attr]

    @property
    def repository(self) -> str:
        return self.layout if self.layout is not None else self.reference.repository  # type: ignore[union-attr]

    @property
    def tag(self) -> str | None:
        if self.layout is not None:
            return None if self.ref is None or DIGEST_RE.fullmatch(self.ref) else self.ref
        return self.reference.tag  # type: ignore[union-attr]

    @property
    def digest(self) -> str | None:
        if self.layout is not None:
            return self.ref if self.ref and DIGEST_RE.fullmatch(self.ref) else None
        return self.reference.digest  # type: ignore[union-attr]

    def __str__(self) -> str:
        if self.layout is not None:
            return f"oci:{self.layout}" + (f":{self.ref}" if self.ref else "")
        return str(self.reference)


def parse_location(text: str) -> Location:
    """`oci:PATH[:TAG|@DIGEST]` (skopeo's form), `docker://REF` or a plain registry reference."""
    if text.startswith(LAYOUT_PREFIX):
        rest = text[len(LAYOUT_PREFIX):]
        path, ref = rest, None
        if "@" in rest and DIGEST_RE.fullmatch(rest.rsplit("@", 1)[1]):
            path, ref = rest.rsplit("@", 1)
        elif ":" in rest and "/" not in rest.rsplit(":", 1)[1]:
            path, ref = rest.rsplit(":", 1)
        if not path:
            raise ImageError(f"{text!r}: an OCI layout location needs a directory path")
        return Location(layout=os.path.abspath(path), ref=ref or None)
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    return Location(reference=parse_reference(text))


def registry_location(registry: str, repository: str, *, tag: str | None = None,
                      digest: str | None = None) -> Location:
    """A registry location from its parts, never from a parsed string: a single-label host such as
    `registry` (a compose or Kubernetes service) stays the registry instead of becoming a Docker Hub
    namespace, and nothing here can name an `oci:` layout. Each part must match the reference grammar."""
    if not HOST_RE.fullmatch(registry):
        raise InvalidReferenceError(f"invalid registry host {registry[:200]!r} (expected host[:port])")
    if len(repository) > MAX_REPOSITORY or not REPOSITORY_RE.fullmatch(repository):
        raise InvalidReferenceError(f"invalid repository {repository[:300]!r}")
    if tag is not None and not TAG_RE.fullmatch(tag):
        raise InvalidReferenceError(f"invalid tag {tag[:200]!r}")
    if digest is not None and not DIGEST_RE.fullmatch(digest):
        raise InvalidReferenceError(f"invalid digest {digest[:200]!r}")
    return Location(reference=Reference(registry, repository, tag, digest))


class VerifyingReader(io.RawIOBase):
    """Wraps a file: hashes what is read and raises DigestMismatchError at EOF if digest or size differ."""

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, name: str) -> None:
        super().__init__()
        self._raw, self._digest, self._size, self._name = raw, digest, size, name
        self._hash = hashlib.sha256()
        self._read = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._hash.update(memoryview(buffer)[:n])
            self._read += n
            return n
        if not self._checked:
            self._checked = True
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self._digest or (self._size is not None and self._read != self._size):
                raise DigestMismatchError(f"{self._name}: blob {self._digest} has digest {actual} and size "
                                          f"{self._read}" + (f" (expected {self._size})" if self._size else ""))
        return 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def _load_fallocate() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


class ReleasingReader(io.RawIOBase):
    """Reads a temp file that is deleted after the upload, giving its disk space back as the upload advances
    (fallocate PUNCH_HOLE behind the read position). While layer i uploads, layer i+1 is being written; this
    keeps the temp dir near one blob instead of two. Not seekable, so a registry that loses the upload session
    gives a transient error (retry the conversion) instead of a re-read of released bytes."""

    def __init__(self, raw: BinaryIO, on_release: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._fd = raw.fileno()
        self._released = 0
        self._position = 0
        self._punch = _fallocate
        self._on_release = on_release  # told the number of bytes given back so far

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        self._position += n or 0
        release_to = self._position // RELEASE_STEP * RELEASE_STEP
        if self._punch is not None and release_to > self._released:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if self._punch(self._fd, mode, self._released, release_to - self._released) != 0:
                self._punch = None  # the filesystem cannot punch holes: keep the file whole
            else:
                self._released = release_to
                if self._on_release is not None:
                    self._on_release(release_to)
        return n or 0


class Store:
    """Interface of a source or target location (see RegistryStore, LayoutStore)."""

    name: str
    cache_registry: str
    repository: str
    same_registry_mounts: bool = False

    def get_manifest(self, ref: str) -> Manifest:
        raise NotImplementedError

    def find_manifest(self, ref: str) -> Manifest | None:
        try:
            return self.get_manifest(ref)
        except NotFoundError:
            return None

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        raise NotImplementedError

    def read_blob(self, digest: str, size: int | None = None, limit: int = 16 << 20) -> bytes:
        with self.open_blob(digest, size) as stream:
            data = stream.read(limit + 1)
            if len(data) > limit:
                raise ImageError(f"{self.name}: blob {digest} is larger than {limit} bytes")
            stream.read()  # reach EOF: the digest check happens there
        return data

    def blob_size(self, digest: str) -> int | None:
        raise NotImplementedError

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        return False

    def put_blob_file(self, path: str, digest: str, size: int, *, consume: bool = False,
                      on_release: Callable[[int], None] | None = None) -> None:
        """Store the file's bytes as blob `digest`; with `consume` the caller deletes the file afterwards,
        so its space may be released while it is read (`on_release(bytes given back so far)` follows it)."""
        raise NotImplementedError

    def put_blob_bytes(self, data: bytes) -> str:
        raise NotImplementedError

    def put_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        raise NotImplementedError

    def add_referrer(self, subject: str, descriptor: Mapping[str, Any]) -> None:
        """Make `descriptor` findable as a referrer of `subject` without the referrers API: the OCI
        distribution 1.1 tag schema (an OCI index tagged `sha256-<hex>` listing the referrers)."""
        tag = subject.replace(":", "-", 1)
        current = self.find_manifest(tag)
        manifests: list[dict[str, Any]] = []
        if current is not None:
            where = f"{self.name}:{tag}"
            existing = load_json_object(current.raw, where, "referrers index")
            check_index(existing, where, "referrers index")
            manifests = list(existing["manifests"])
        if any(m.get("digest") == descriptor["digest"] for m in manifests):
            return
        manifests.append(dict(descriptor))
        self.put_manifest(tag, canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
                          OCI_INDEX)

    def fetch_blob(self, digest: str, size: int, dest: str) -> str:
        """A local file with the blob's bytes: `dest` after a verified download (layouts return their own file)."""
        with self.open_blob(digest, size) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, COPY_CHUNK)
        return dest

    def close(self) -> None:
        pass


class RegistryStore(Store):
    same_registry_mounts = True

    def __init__(self, client: RegistryClient, reference: Reference) -> None:
        self.client, self.reference = client, reference
        self.repository = reference.repository
        self.cache_registry = reference.registry
        self.name = f"{reference.registry}/{reference.repository}"

    def get_manifest(self, ref: str) -> Manifest:
        return self.client.get_manifest(self.repository, ref)

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        return self.client.open_blob(self.repository, digest, size)  # type: ignore[return-value]

    def blob_size(self, digest: str) -> int | None:
        return self.client.blob_exists(self.repository, digest)

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        if from_repository == self.repository:
            return False
        return self.client.mount_blob(self.repository, digest, from_repository)

    def put_blob_file(self, path: str, digest: str, size: int, *, consume: bool = False,
                      on_release: Callable[[int], None] | None = None) -> None:
        with open(path, "r+b" if consume else "rb", buffering=0) as f:  # hole punching needs a writable fd
            source: BinaryIO = ReleasingReader(f, on_release) if consume else f  # type: ignore[assignment]
            # The digest comes from the layer writer's own pass over this file; the registry checks it again.
            self.client.upload_blob(self.repository, source, digest=digest, size=size, trust_digest=True)

    def put_blob_bytes(self, data: bytes) -> str:
        return self.client.upload_blob(self.repository, data, digest=sha256_digest(data), size=len(data))

    def put_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        return self.client.put_manifest(self.repository, ref, raw, media_type)

    def add_referrer(self, subject: str, descriptor: Mapping[str, Any]) -> None:
        # A registry with the referrers API indexes the pushed manifest itself.
        if any(d.get("digest") == descriptor["digest"] for d in self.client.referrers(self.repository, subject)):
            return
        super().add_referrer(subject, descriptor)


class LayoutStore(Store):
    """An OCI image layout: blobs/sha256/<hex>, index.json naming tags with org.opencontainers.image.ref.name."""

    _index_lock = threading.Lock()

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = Path(path)
        self.repository = str(self.path)
        self.cache_registry = LAYOUT_PREFIX + str(self.path)
        self.name = f"oci:{self.path}"
        if create:
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not (self.path / "oci-layout").exists():
                (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
            if not (self.path / "index.json").exists():
                self._write_index([])
        elif not (self.path / "oci-layout").is_file():
            raise NotFoundError(f"{self.path} is not an OCI image layout (no oci-layout file)")

    def _blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise ImageError(f"{self.name}: invalid digest {digest!r}")
        algo, hexpart = digest.split(":", 1)
        return self.path / "blobs" / algo / hexpart

    def _index(self) -> list[dict[str, Any]]:
        """The entries of index.json, checked as data (a layout is input like any manifest)."""
        try:
            raw = (self.path / "index.json").read_bytes()
        except FileNotFoundError:
            return []
        index = load_json_object(raw, self.name, "index.json")
        check_index(index, self.name, "index.json")
        return list(index["manifests"])

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        data = canonical({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                          "manifests": manifests})
        tmp = self.path / "index.json.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / "index.json")

    def _resolve(self, ref: str) -> dict[str, Any]:
        entries = self._index()
        if DIGEST_RE.fullmatch(ref):
            for entry in entries:
                if entry.get("digest") == ref:
                    return entry
            return {"digest": ref}
        if ref == "":
            if len(entries) == 1:
                return entries[0]
            raise ImageError(f"{self.name}: the layout holds {len(entries)} images; name one with oci:PATH:TAG")
        for entry in entries:
            if (entry.get("annotations") or {}).get(OCI_REF_NAME) == ref:
                return entry
        raise NotFoundError(f"{self.name}: no image tagged {ref!r} in index.json")

    def get_manifest(self, ref: str) -> Manifest:
        entry = self._resolve(ref)
        digest = entry["digest"]
        path = self._blob_path(digest)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: manifest {digest} is missing from blobs/") from None
        if sha256_digest(raw) != digest:
            raise DigestMismatchError(f"{self.name}: manifest blob {digest} has digest {sha256_digest(raw)}")
        body = load_json_object(raw, self.name, f"manifest {digest}")
        media_type = body.get("mediaType") or entry.get("mediaType") or ""
        if not isinstance(media_type, str) or media_type not in MANIFEST_TYPES:
            raise ImageError(f"{self.name}: {digest} has unsupported manifest media type {media_type!r}")
        return Manifest(raw, media_type, digest)

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        try:
            f = open(self._blob_path(digest), "rb", buffering=0)  # noqa: SIM115 - closed by the reader
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: blob {digest} is missing") from None
        return VerifyingReader(f, digest, size, self.name)  # type: ignore[return-value]

    def blob_size(self, digest: str) -> int | None:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def put_blob_file(self, path: str, digest: str, size: int, *, consume: bool = False,
                      on_release: Callable[[int], None] | None = None) -> None:
        dest = self._blob_path(digest)
        if dest.exists():
            return
        tmp = dest.with_name(dest.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_blob_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        dest = self._blob_path(digest)
        if not dest.exists():
            with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, dest)
        return digest

    def put_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        digest = self.put_blob_bytes(raw)
        if DIGEST_RE.fullmatch(ref):
            return digest
        with self._index_lock:
            entries = [e for e in self._index() if (e.get("annotations") or {}).get(OCI_REF_NAME) != ref]
            entries.append({"mediaType": media_type, "digest": digest, "size": len(raw),
                            "annotations": {OCI_REF_NAME: ref}})
            self._write_index(entries)
        return digest

    def fetch_blob(self, digest: str, size: int, dest: str) -> str:
        return str(self._blob_path(digest))


def registry_client(host_registry: str, options: RegistryOptions, retry: RetryPolicy | None = None,
                    rate_limit: float | None = None) -> RegistryClient:
    """A client for the registry named in a reference, honouring an endpoint override and TLS choices."""
    host, plain_http = host_registry, options.plain_http
    if options.endpoint:
        parts = urlsplit(options.endpoint if "://" in options.endpoint else "https://" + options.endpoint)
        host, plain_http = parts.netloc, parts.scheme == "http" or plain_http
    credentials = Credentials(options.username, options.password or "") if options.username else None
    return RegistryClient(host, credentials=credentials, docker_config=options.docker_config, plain_http=plain_http,
                          insecure=options.insecure, ca_file=options.ca_file, cert_dir=options.cert_dir,
                          client_cert=options.client_cert, retry=retry, rate_limit=rate_limit)


def open_store(location: Location, options: RegistryOptions, clients: dict[str, RegistryClient], *,
               create: bool = False) -> Store:
    """The store for a location; registry clients are shared per host through `clients`."""
    if location.layout is not None:
        return LayoutStore(location.layout, create=create)
    assert location.reference is not None
    host = location.reference.api_host
    if host not in clients:
        clients[host] = registry_client(host, options)
    return RegistryStore(clients[host], location.reference)


def close_clients(clients: Mapping[str, RegistryClient]) -> None:
    for client in clients.values():
        with contextlib.suppress(Exception):
            client.close()
