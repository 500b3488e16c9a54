"""TurboOCIv1 layer blobs, `turboOCIv1.tar.gz` (turbooci reference §1.2–1.3), writer and reader, and the
opening of a turbo layer (meta layer + original blob + gzip index) for the stacked reader (§2.5, §6).

The blob is a gzip'd tar of, in this order: `ext4.fs.meta` (the meta layer, a bare ZFile: warp.py), the
empty marker `.turbo.ociv1`, and `gzip.meta` (gzindex.py) only when the original layer is gzip. Headers
are Go archive/tar USTAR headers byte for byte, and the stream ends with two zero blocks and no record
padding, so the inner tar (whose sha256 is the layer's DiffID) equals the reference convertor's. The
gzip wrapper has Go's 10-byte header, but its deflate bytes are ours (ISA-L), not Go's compress/gzip:
the blob digest differs from upstream's while the DiffID is identical (§1.2 "What can be reproduced").
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from isal import isal_zlib

from .common import SECTOR, FileView, FormatError
from .gzindex import GZIP_MAGIC, GzipIndex
from .lsmt import LsmtLayer
from .zfile import ZF_HT_SPACE, ZFileReader, is_zfile

MEMBER_EXT4_META = "ext4.fs.meta"
MEMBER_EROFS_META = "erofs.fs.meta"
MEMBER_MARKER = ".turbo.ociv1"
MEMBER_GZIP_INDEX = "gzip.meta"
MEMBER_MODE = 0o644  # what a native writer should use (§1.2: upstream's follows the umask)

TURBO_VERSION = "0.1.0-turbo.ociv1"
LEGACY_FASTOCI_VERSION = "0.1.0-fastoci"
ANNOTATION_BLOB_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
ANNOTATION_BLOB_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
ANNOTATION_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"
ANNOTATION_TARGET_MEDIA_TYPE = "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"
ANNOTATION_VERSION = "containerd.io/snapshot/overlaybd/version"
LEGACY_ANNOTATION_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/fastoci/target-digest"
LEGACY_ANNOTATION_TARGET_MEDIA_TYPE = "containerd.io/snapshot/overlaybd/fastoci/target-media-type"

MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ARTIFACT_TYPE_TURBO = "application/vnd.containerd.overlaybd.turbo.v1+json"  # --referrer (§1.4)

GO_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, XFL 0, OS 255
GZIP_LEVEL = 1  # ISA-L level for the outer gzip: the meta layer is LZ4 already, harder work gains little
COPY_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# Descriptor side (§1.3)


def layer_media_type(oci: bool) -> str:
    """mediaType of a turboOCIv1.tar.gz descriptor."""
    return MEDIA_TYPE_OCI_LAYER_GZIP if oci else MEDIA_TYPE_DOCKER_LAYER_GZIP


def target_media_type(source_media_type: str, compression: str) -> str:
    """turbo-oci/target-media-type: the source descriptor's family, with the *detected* compression
    ("gzip" or "none"); a wrong value makes the snapshotter read compressed bytes as tar (§8 #2)."""
    if compression not in ("gzip", "none"):
        raise FormatError(f"a turbo layer's original must be gzip or an uncompressed tar, not {compression}")
    gzip = compression == "gzip"
    if source_media_type.startswith("application/vnd.docker."):
        return MEDIA_TYPE_DOCKER_LAYER_GZIP if gzip else MEDIA_TYPE_DOCKER_LAYER
    return MEDIA_TYPE_OCI_LAYER_GZIP if gzip else MEDIA_TYPE_OCI_LAYER


def turbo_annotations(blob_digest: str, blob_size: int, target_digest: str, target_type: str) -> dict[str, str]:
    """The five annotations of a meta layer's descriptor, sorted as Go's encoder emits them."""
    values = {ANNOTATION_BLOB_DIGEST: blob_digest, ANNOTATION_BLOB_SIZE: str(blob_size),
              ANNOTATION_TARGET_DIGEST: target_digest, ANNOTATION_TARGET_MEDIA_TYPE: target_type,
              ANNOTATION_VERSION: TURBO_VERSION}
    return dict(sorted(values.items()))


def turbo_target(annotations: dict[str, str]) -> tuple[str, str] | None:
    """(target digest, target media type) when a descriptor's annotations say "turbo layer" (§6.1,
    legacy fastoci keys included), else None."""
    for digest_key, type_key in ((ANNOTATION_TARGET_DIGEST, ANNOTATION_TARGET_MEDIA_TYPE),
                                 (LEGACY_ANNOTATION_TARGET_DIGEST, LEGACY_ANNOTATION_TARGET_MEDIA_TYPE)):
        if digest_key in annotations:
            return annotations[digest_key], annotations.get(type_key, "")
    return None


# ----------------------------------------------------------------------------------------------------------
# Writer (§1.2)


def ustar_header(name: str, size: int, mode: int = MEMBER_MODE) -> bytes:
    """The Go archive/tar header of a regular file built from Name, Mode, Size and Typeflag only."""
    raw = name.encode()
    if len(raw) > 100:
        raise FormatError(f"turbo archive member name {name!r} is longer than 100 bytes")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:108] = b"%07o\0" % mode
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = h[337:345] = b"0000000\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@dataclass(frozen=True)
class TurboBlobInfo:
    path: str
    digest: str  # "sha256:<hex>" of turboOCIv1.tar.gz
    size: int
    diff_id: str  # "sha256:<hex>" of the inner tar
    meta_size: int  # bytes of the ext4.fs.meta member
    gzip_index_size: int | None  # bytes of gzip.meta, None when the original is not gzip


class _GzipOut:
    """Go-shaped gzip member around ISA-L raw deflate, hashing the inner tar and the blob on the way."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self._out = out
        self._deflate = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
        self.inner = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0
        self._crc = 0
        self._isize = 0
        self._emit(GO_GZIP_HEADER)

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self.blob.update(data)
            self.size += len(data)

    def write(self, data: bytes) -> None:
        self.inner.update(data)
        self._crc = zlib.crc32(data, self._crc)
        self._isize += len(data)
        self._emit(self._deflate.compress(data))

    def finish(self) -> None:
        self._emit(self._deflate.flush())
        self._emit(struct.pack("<II", self._crc, self._isize & 0xFFFFFFFF))


def write_turbo_blob(out_path: str | os.PathLike[str], meta_path: str | os.PathLike[str],
                     gzip_index: bytes | None = None, *, meta_name: str = MEMBER_EXT4_META,
                     level: int = GZIP_LEVEL) -> TurboBlobInfo:
    """Write turboOCIv1.tar.gz from the meta layer file and the gzip index (None for a tar original);
    returns its digest, size and DiffID. A failure removes the partial file."""
    out_path = os.fspath(out_path)
    try:
        with open(out_path, "wb") as out, open(meta_path, "rb") as meta:
            gz = _GzipOut(out, level)
            meta_size = os.fstat(meta.fileno()).st_size
            gz.write(ustar_header(meta_name, meta_size))
            copied = 0
            while chunk := meta.read(COPY_BYTES):
                gz.write(chunk)
                copied += len(chunk)
            if copied != meta_size:
                raise FormatError(f"{os.fspath(meta_path)} changed size while it was archived")
            gz.write(bytes(-meta_size % SECTOR))
            gz.write(ustar_header(MEMBER_MARKER, 0))
            if gzip_index is not None:
                gz.write(ustar_header(MEMBER_GZIP_INDEX, len(gzip_index)))
                gz.write(gzip_index + bytes(-len(gzip_index) % SECTOR))
            gz.write(bytes(2 * SECTOR))
            gz.finish()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out_path)
        raise
    return TurboBlobInfo(path=out_path, digest="sha256:" + gz.blob.hexdigest(), size=gz.size,
                         diff_id="sha256:" + gz.inner.hexdigest(), meta_size=meta_size,
                         gzip_index_size=None if gzip_index is None else len(gzip_index))


# ----------------------------------------------------------------------------------------------------------
# Reader


@dataclass
class TurboBlob:
    """The validated members of a turboOCIv1.tar.gz. `meta` is an anonymous temporary file holding the
    meta layer (closed by close()); `gzip_index` the gzip.meta bytes or None."""

    name: str
    meta_name: str
    meta: BinaryIO
    meta_size: int
    gzip_index: bytes | None
    diff_id: str

    def close(self) -> None:
        self.meta.close()


class _HashingReader:
    """Reads exactly, hashing what it returns (the DiffID is the sha256 of the whole inner tar)."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        self._raw = raw
        self._name = name
        self.sha = hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self._raw.read(n)
        self.sha.update(data)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise FormatError(f"{self._name}: turbo archive truncated in {what}")
        return data


def read_ustar_header(block: bytes, where: str) -> tuple[str, int, bytes]:
    """(name, size, typeflag) of a USTAR header block, after checking its checksum (the reading side of
    ustar_header(); any USTAR writer's headers are accepted, Go's or others)."""
    stored = block[148:156].split(b"\0", 1)[0].strip()
    try:
        checksum = int(stored or b"-1", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise FormatError(f"{where}: not a tar header (checksum {stored!r})") from None
    if checksum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise FormatError(f"{where}: tar header checksum mismatch")
    prefix = block[345:500].split(b"\0", 1)[0]
    name = block[:100].split(b"\0", 1)[0]
    full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
    return full, size, block[156:157]


def read_turbo_blob(path: str | os.PathLike[str]) -> TurboBlob:
    """Open a turboOCIv1.tar.gz and check it is one: a gzip'd tar whose members are the regular files
    meta layer (ext4.fs.meta or erofs.fs.meta), the empty `.turbo.ociv1` marker and at most a gzip.meta,
    in that order, then only zero blocks. The tar is read strictly (a damaged header is an error, never
    an early end), the DiffID computed on the way, the meta layer spooled to an anonymous temp file."""
    name = os.fspath(path)
    expected = f"expected {MEMBER_EXT4_META}, {MEMBER_MARKER}, [{MEMBER_GZIP_INDEX}]"
    with open(name, "rb") as raw:
        if raw.read(2) != GZIP_MAGIC:
            raise FormatError(f"{name}: not a turboOCIv1.tar.gz: the blob is not gzip")
        raw.seek(0)
        inner = _HashingReader(gzip.GzipFile(fileobj=raw, mode="rb"), name)  # type: ignore[arg-type]
        meta = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the returned TurboBlob
        try:
            seen: list[str] = []
            meta_name, meta_size, gz_index = "", 0, None
            try:
                while (block := inner.read_exact(SECTOR, "a member header")) != bytes(SECTOR):
                    member, size, typeflag = read_ustar_header(block, f"{name}: member {len(seen) + 1}")
                    seen.append(member)
                    if typeflag not in (b"0", b"\0"):
                        raise FormatError(f"{name}: turbo archive member {member!r} is not a regular file "
                                          f"(typeflag {typeflag!r})")
                    if member in (MEMBER_EXT4_META, MEMBER_EROFS_META) and len(seen) == 1:
                        meta_name, meta_size = member, size
                        for pos in range(0, size, COPY_BYTES):
                            meta.write(inner.read_exact(min(COPY_BYTES, size - pos), member))
                    elif member == MEMBER_MARKER and len(seen) == 2:
                        if size:
                            raise FormatError(f"{name}: {MEMBER_MARKER} must be empty, it has {size} B")
                    elif member == MEMBER_GZIP_INDEX and len(seen) == 3:
                        gz_index = inner.read_exact(size, member)
                    else:
                        raise FormatError(f"{name}: unexpected turbo archive member {member!r} at position "
                                          f"{len(seen)}; {expected}")
                    inner.read_exact(-size % SECTOR, f"{member}'s padding")
                while rest := inner.read(COPY_BYTES):  # the end-of-archive blocks (and any record padding)
                    if rest.count(0) != len(rest):
                        raise FormatError(f"{name}: data after the turbo archive's end-of-archive block")
            except (OSError, EOFError, zlib.error) as exc:
                raise FormatError(f"{name}: corrupt turboOCIv1.tar.gz: {exc}") from None
            if len(seen) < 2:
                raise FormatError(f"{name}: turbo archive has members {seen}; it needs at least "
                                  f"{MEMBER_EXT4_META} and {MEMBER_MARKER}")
            meta.flush()
            meta.seek(0)
            return TurboBlob(name=name, meta_name=meta_name, meta=meta, meta_size=meta_size, gzip_index=gz_index,
                             diff_id="sha256:" + inner.sha.hexdigest())
        except BaseException:
            meta.close()
            raise


# ----------------------------------------------------------------------------------------------------------
# Opening a turbo layer for reading (§2.5, §6.2)


@dataclass(frozen=True)
class TurboLayerSpec:
    """One turbo layer of a stack: the meta (turboOCIv1.tar.gz, or a bare ext4.fs.meta) and its original
    blob; `gzip_index` (bytes or a path) only needed with a bare meta of a gzip original;
    `target_digest` ("sha256:…", e.g. the descriptor's turbo-oci/target-digest) makes the reader check
    the original blob."""

    meta: str
    target: str
    gzip_index: bytes | str | None = None
    target_digest: str | None = None


def sha256_path(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def open_turbo_layer(spec: TurboLayerSpec, *, verify_blocks: bool = True) -> LsmtLayer:
    """The meta layer as an LsmtLayer in warp mode whose tag-1 entries read the original layer's
    uncompressed tar (the plain blob, or the gzip blob through its gzip index). Checks, each with a clear
    error: the archive members, the meta layer (ZFile, LSMT, ≥ 1 tag-0 entry), the original's digest when
    known, the gzip index against the original, and every tag-1 range inside the tar."""
    closers: list[Callable[[], None]] = []

    def close_all() -> None:
        for close in reversed(closers):
            close()

    try:
        gz_index: bytes | None
        if _is_gzip_file(spec.meta):
            blob = read_turbo_blob(spec.meta)
            closers.append(blob.meta.close)
            meta_view = FileView(spec.meta, fd=blob.meta.fileno(), size=blob.meta_size,
                                 name=f"{spec.meta}!{blob.meta_name}")
            gz_index = blob.gzip_index
        else:
            meta_view = FileView(spec.meta)
            closers.append(meta_view.close)
            gz_index = None
        if spec.gzip_index is not None:
            gz_index = spec.gzip_index if isinstance(spec.gzip_index, bytes) else _read_file(spec.gzip_index)
        if spec.target_digest is not None:
            actual = sha256_path(spec.target)
            if actual != spec.target_digest:
                raise FormatError(f"{spec.meta}: original layer {spec.target} has digest {actual}, but the meta "
                                  f"layer's turbo-oci/target-digest is {spec.target_digest}: wrong or changed "
                                  f"original blob")
        target = FileView(spec.target)
        closers.append(target.close)
        target_is_gzip = target.size >= 2 and target.pread(0, 2) == GZIP_MAGIC
        tar: FileView | GzipIndex
        if target_is_gzip:
            if gz_index is None:
                raise FormatError(f"{spec.meta}: the original layer {spec.target} is gzip but there is no "
                                  f"gzip.meta to read it through")
            tar = GzipIndex(gz_index, name=f"{spec.meta}!{MEMBER_GZIP_INDEX}", target=target)
            closers.append(tar.close)
        else:
            if gz_index is not None:
                raise FormatError(f"{spec.meta}: has a gzip.meta but the original layer {spec.target} is not gzip")
            tar = target
        if not is_zfile(meta_view.pread(0, min(ZF_HT_SPACE, meta_view.size))):
            raise FormatError(f"{meta_view.name}: a meta layer must be a bare ZFile (turbooci §2.1)")
        zfile = ZFileReader(meta_view, verify_blocks=verify_blocks)
        layer = LsmtLayer(zfile, zfile=zfile, warp=True, on_close=close_all)
    except BaseException:
        close_all()
        raise
    try:
        layer.attach_remote(tar)
    except BaseException:
        layer.close()
        raise
    return layer


def _is_gzip_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def describe_turbo_blob(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """What `obd-convert inspect` reports about a turboOCIv1.tar.gz (None when `path` is not gzip): its
    validated members, DiffID and gzip index header."""
    if not _is_gzip_file(os.fspath(path)):
        return None
    blob = read_turbo_blob(path)
    try:
        members = [{"name": blob.meta_name, "size": blob.meta_size}, {"name": MEMBER_MARKER, "size": 0}]
        info: dict[str, object] = {"diff_id": blob.diff_id, "members": members}
        if blob.gzip_index is not None:
            members.append({"name": MEMBER_GZIP_INDEX, "size": len(blob.gzip_index)})
            info["gzip_index"] = GzipIndex(blob.gzip_index, name=f"{os.fspath(path)}!{MEMBER_GZIP_INDEX}").describe()
        return info
    finally:
        blob.close()


def open_turbo_meta(path: str | os.PathLike[str], *, verify_blocks: bool = True) -> LsmtLayer:
    """The meta layer of a turboOCIv1.tar.gz, or a bare ext4.fs.meta, on its own (no original attached:
    for inspection; its tag-1 data cannot be read)."""
    name = os.fspath(path)
    if _is_gzip_file(name):
        blob = read_turbo_blob(name)
        view = FileView(name, fd=blob.meta.fileno(), size=blob.meta_size, name=f"{name}!{blob.meta_name}")
        release = blob.close
    else:
        view = FileView(name)
        release = view.close
    try:
        if not is_zfile(view.pread(0, min(ZF_HT_SPACE, view.size))):
            raise FormatError(f"{view.name}: a meta layer must be a bare ZFile (turbooci §2.1)")
        zfile = ZFileReader(view, verify_blocks=verify_blocks)
        return LsmtLayer(zfile, zfile=zfile, warp=True, on_close=release)
    except BaseException:
        release()
        raise
