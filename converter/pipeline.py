"""Convert an image (registry or OCI layout) into overlaybd form and publish it: `convert(source, target, options)`.

Per image manifest:

    reuse prefix (cache + HEAD/mount)  ->  for each remaining layer:
        source blob stream -> decompress -> [sha256 = diff_id] -> ext4 apply -> LayerBlobWriter (temp file)
        -> upload in a background thread while the next layer converts -> delete the temp file
    -> config -> manifest by digest (index children) or by tag

An index converts its children in parallel (`concurrency_limit`) and is pushed by tag last, so the target
tag never points at anything partial. See docs/pipeline.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .cache import CachedLayer, LayerCache, RedisLayerCache, open_layer_cache
from .errors import ConversionError, PermanentError, TransientError
from .ext4 import BlockSink, ImageBuilder, LayerApplyError, LayerStats, derive_fs_ids
from .ext4.layerstream import LayerStream
from .formats.common import FormatError
from .formats.layer import BlobInfo, LayerBlobWriter, wrap_blob
from .formats.stack import StackedReader
from .image import (
    ANN_OPTIONS_DIGEST,
    ANN_SOURCE_DIGEST,
    BASE_LAYER_UUID,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ConvertedChild,
    ConvertedLayer,
    ImageError,
    SourceImage,
    SourceLayer,
    check_image_manifest,
    check_layer_count,
    check_not_overlaybd,
    derive_key,
    is_attestation,
    parse_manifest,
    platform_matches,
    platform_string,
    rewrite_config,
    rewrite_index,
    rewrite_manifest,
    source_image,
)
from .options import ConvertOptions
from .registry import DigestMismatchError, Manifest, RegistryError
from .transport import Location, Store, close_clients, open_store, parse_location

log = logging.getLogger("obd-convert")

__all__ = ["ConversionAborted", "ConvertOptions", "ConvertResult", "LayerConversionError", "LayerResult",
           "ManifestResult", "convert"]


class LayerConversionError(PermanentError):
    """A layer could not be converted (bad tar, corrupt compression, wrong digest); names the layer."""

    def __init__(self, message: str, *, layer: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.layer, self.entry = layer, entry


class ConversionAborted(TransientError):
    """Cancelled (SIGINT/SIGTERM or a failed sibling); nothing was tagged."""


def _naming_layer(exc: BaseException, label: str) -> BaseException:
    """A registry error about a layer blob, re-made with the layer in its message (same class and details)."""
    if isinstance(exc, RegistryError) and not str(exc).startswith("layer "):
        named = type(exc)(f"layer {label}: {exc}", status=exc.status, errors=exc.errors, method=exc.method,
                          path=exc.path)
        named.__cause__ = exc
        return named
    return exc


# ----------------------------------------------------------------------------------------- results


@dataclass
class LayerResult:
    index: int  # position in the converted manifest (the base layer is 0 with mkfs=False)
    digest: str
    size: int
    uuid: str
    status: str  # "converted" | "reused" | "base"
    source_digest: str | None = None
    diff_id: str | None = None
    chain_id: str | None = None
    seconds: float = 0.0
    tar_bytes: int = 0  # uncompressed source tar bytes
    files: int = 0


@dataclass
class ManifestResult:
    platform: str
    source_digest: str
    digest: str
    media_type: str
    size: int
    config_digest: str
    layers: list[LayerResult]
    raw: bytes = field(repr=False, default=b"")
    config: bytes = field(repr=False, default=b"")


@dataclass
class ConvertResult:
    source: str
    target: str
    source_digest: str
    target_digest: str
    media_type: str
    up_to_date: bool  # the target already matched: nothing was done
    pushed: bool  # False with upload=False (--no-upload)
    seconds: float
    bytes_written: int  # bytes of layer blobs uploaded (blobs the target already had excluded)
    blobs_uploaded: int
    layers_converted: int
    layers_reused: int
    manifests: list[ManifestResult] = field(default_factory=list)
    raw: bytes = field(repr=False, default=b"")  # the top-level manifest or index
    output_dir: str | None = None  # with upload=False: where blobs, config and manifests were written

    @property
    def digest(self) -> str:
        return self.target_digest

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("raw")
        for m in out["manifests"]:
            m.pop("raw")
            m.pop("config")
        return out


# ----------------------------------------------------------------------------------------- streams


class _SourceStream(io.RawIOBase):
    """The source blob as read by the decompressor: counts bytes, honours cancel, remembers the source's error.

    The ext4 builder turns any exception from its input into a LayerApplyError; keeping the original lets
    the pipeline re-raise registry errors with their transient/permanent class intact.
    """

    def __init__(self, raw: BinaryIO, cancelled: Callable[[], bool], on_bytes: Callable[[int], None]) -> None:
        super().__init__()
        self._raw, self._cancelled, self._on_bytes = raw, cancelled, on_bytes
        self.count = 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._cancelled():
            self.error = self.error or ConversionAborted("conversion cancelled")
            raise self.error
        try:
            n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        except BaseException as exc:
            self.error = self.error or exc
            raise
        self.count += n or 0
        if n:
            self._on_bytes(n)
        return n or 0


class _TempBudget:
    """Keeps the temp dir within the largest blob converted so far, while the previous blob uploads.

    Blob i uploads (its space given back behind the read position, transport.ReleasingReader) while blob
    i+1 is written. When the upload is slower than the conversion, the two together outgrow one blob; then
    the builder waits (it checks before its first write and then every CHECK_BYTES of layer data) until
    the upload has given back enough. MARGIN covers what the blob can grow by until the next check: the
    output still in flight in the ZFile writer (at most 7 MiB: its pending batch and the workers' slots)
    plus CHECK_BYTES of new data (LZ4 may grow incompressible data by 0.5 %)."""

    CHECK_BYTES = 8 << 20
    MARGIN = 16 << 20

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self._cond = threading.Condition()
        self._cancelled = cancelled
        self._largest = 0  # the largest blob finished so far
        self._upload_size = 0  # the blob being uploaded
        self._uploading = 0  # ... and how much of it is still on disk
        self.waited = 0.0  # seconds the builder spent waiting

    def upload_started(self, size: int) -> None:
        with self._cond:
            self._largest = max(self._largest, size)
            self._upload_size = self._uploading = size

    def released(self, released: int) -> None:
        """ReleasingReader's report: the first `released` bytes of the uploading blob are given back."""
        with self._cond:
            self._uploading = max(0, self._upload_size - released)
            self._cond.notify_all()

    def upload_finished(self) -> None:
        with self._cond:
            self._uploading = 0
            self._cond.notify_all()

    def wait_for_room(self, written: int) -> None:
        """Return once a blob of `written` bytes (so far) fits next to what is left of the upload."""
        with self._cond:
            if not self._over(written):
                return
            started = time.monotonic()
            while self._over(written) and not self._cancelled():
                self._cond.wait(0.2)
            self.waited += time.monotonic() - started

    def _over(self, written: int) -> bool:
        mine = written + self.MARGIN
        return self._uploading > 0 and mine + self._uploading > max(self._largest, mine)


class _BudgetedSink:
    """The layer blob writer, as the builder's sink, pausing when the temp dir would outgrow the budget."""

    def __init__(self, writer: LayerBlobWriter, budget: _TempBudget) -> None:
        self._writer = writer
        self._budget = budget
        self._until_check = 0  # the first write checks: a small layer may never reach CHECK_BYTES

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._until_check <= 0:
            self._until_check = self._budget.CHECK_BYTES
            self._budget.wait_for_room(self._writer.disk_bytes)
        self._until_check -= len(data)
        self._writer.write(offset, data)


class _Uploader:
    """Uploads one blob in the background while the next layer converts; at most one upload in flight,
    so at most two converted blobs sit in the temp dir at any time (and _TempBudget keeps the two within
    the largest one)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="obd-upload", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _DirStore(Store):
    """The --no-upload target: blobs, configs and manifests kept as files named by digest in a directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repository = str(path)
        self.cache_registry = "dir:" + str(path)
        self.name = f"dir:{path}"
        path.mkdir(parents=True, exist_ok=True)

    def blob_size(self, digest: str) -> int | None:
        p = self.path / digest.split(":", 1)[1]
        return p.stat().st_size if p.exists() else None

    def put_blob_file(self, path: str, digest: str, size: int, *, consume: bool = False,
                      on_release: Callable[[int], None] | None = None) -> None:
        os.replace(path, self.path / digest.split(":", 1)[1])

    def put_blob_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.path / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    def put_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        digest = self.put_blob_bytes(raw)
        if not ref.startswith("sha256:"):
            (self.path / "manifest.json").write_bytes(raw)
        return digest


# ----------------------------------------------------------------------------------------- the run


class _Conversion:
    def __init__(self, source: Location, target: Location, opts: ConvertOptions, src: Store, dst: Store,
                 run_dir: Path) -> None:
        self.source_loc, self.target_loc, self.opts = source, target, opts
        self.src, self.dst, self.run_dir = src, dst, run_dir
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self.blobs_uploaded = 0
        self.bytes_written = 0
        self.cache: LayerCache | RedisLayerCache | None = None
        if opts.use_cache and opts.upload:
            self.cache = open_layer_cache(opts.cache_dir, opts.cache_url)
        self.base: BlobInfo | None = None
        self.bytes_key = ""  # byte-shaping options (cache key); set once the base layer is known
        self.output_key = ""  # bytes_key + output flavour (our options annotation)

    def cancelled(self) -> bool:
        """Our own flag (a sibling platform failed) or the caller's (SIGINT/SIGTERM in the CLI)."""
        return self.cancel.is_set() or (self.opts.cancel is not None and self.opts.cancel.is_set())

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def emit(self, event: str, **data: Any) -> None:
        if self.opts.progress is not None:
            with contextlib.suppress(Exception):
                self.opts.progress(event, data)

    def check_cancel(self) -> None:
        if self.cancelled():
            raise ConversionAborted("conversion cancelled")

    # ------------------------------------------------------------------ top level

    def run(self) -> ConvertResult:
        started = time.monotonic()
        src_ref = self.source_loc.digest or self.source_loc.tag or ("" if self.source_loc.is_layout else "latest")
        top = self.src.get_manifest(src_ref)
        where = f"{self.source_loc}"
        top_json = parse_manifest(top.raw, top.media_type, where)
        self._check_layer_counts(top, top_json, where)  # before anything (even the base layer) is pushed
        if not self.opts.mkfs:
            self._prepare_base()
        self.bytes_key = self.opts.bytes_key(self.base.digest if self.base else None)
        self.output_key = derive_key(self.bytes_key, oci=self.opts.oci, referrer=self.opts.referrer)
        target_tag = self.target_loc.tag or ""

        if self.opts.upload and not self.opts.force:
            current = self._up_to_date(target_tag, top.digest)
            if current is not None:
                self.emit("up_to_date", target=str(self.target_loc), digest=current.digest)
                return self._result(top, current.digest, current.media_type, [], current.raw, started,
                                    up_to_date=True)

        if top.media_type in (OCI_INDEX, DOCKER_LIST):
            digest, media_type, raw, manifests = self._convert_index(top, top_json, target_tag)
        else:
            check_image_manifest(top_json, where)
            subject = self._subject(top.media_type, top.digest, len(top.raw))
            m = self._convert_image(top.digest, top.media_type, top_json, where, platform="", ref=target_tag,
                                    subject=subject)
            digest, media_type, raw, manifests = m.digest, m.media_type, m.raw, [m]
        return self._result(top, digest, media_type, manifests, raw, started, up_to_date=False)

    def _check_layer_counts(self, top: Manifest, top_json: dict[str, Any], where: str) -> None:
        if top.media_type not in (OCI_INDEX, DOCKER_LIST):
            check_layer_count(top_json, where, base_layer=not self.opts.mkfs)
            return
        for child in top_json.get("manifests") or []:
            if is_attestation(child) or not platform_matches(child.get("platform"), self.opts.platforms):
                continue
            manifest = self.src.get_manifest(child["digest"])
            child_where = f"{where} [{platform_string(child.get('platform')) or child['digest']}]"
            body = parse_manifest(manifest.raw, manifest.media_type, child_where)
            check_layer_count(body, child_where, base_layer=not self.opts.mkfs)

    def _result(self, top: Manifest, digest: str, media_type: str, manifests: list[ManifestResult], raw: bytes,
                started: float, *, up_to_date: bool) -> ConvertResult:
        layers = [layer for m in manifests for layer in m.layers]
        return ConvertResult(
            source=str(self.source_loc), target=str(self.target_loc), source_digest=top.digest, target_digest=digest,
            media_type=media_type, up_to_date=up_to_date, pushed=self.opts.upload and not up_to_date,
            seconds=round(time.monotonic() - started, 3), bytes_written=self.bytes_written,
            blobs_uploaded=self.blobs_uploaded, layers_converted=sum(x.status == "converted" for x in layers),
            layers_reused=sum(x.status == "reused" for x in layers), manifests=manifests, raw=raw,
            output_dir=None if self.opts.upload else str(self.run_dir))

    def _annotations(self, source_digest: str) -> dict[str, str]:
        return {ANN_SOURCE_DIGEST: source_digest, ANN_OPTIONS_DIGEST: self.output_key}

    def _subject(self, media_type: str, digest: str, size: int) -> dict[str, Any] | None:
        return {"mediaType": media_type, "digest": digest, "size": size} if self.opts.referrer else None

    def _index_referrer(self, subject: str, raw: bytes, media_type: str) -> None:
        if not self.opts.referrer or not self.opts.upload:
            return
        body = json.loads(raw)
        descriptor = {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
                      "size": len(raw), "artifactType": body["artifactType"]}
        if body.get("annotations"):
            descriptor["annotations"] = body["annotations"]
        self.dst.add_referrer(subject, descriptor)

    def _up_to_date(self, tag: str, source_digest: str) -> Manifest | None:
        """The target's manifest if it records this source and these options (one manifest GET)."""
        try:
            current = self.dst.find_manifest(tag)
        except PermanentError as exc:  # e.g. the tag holds something we cannot read: convert and replace it
            log.info("target %s:%s is not a readable image manifest (%s); converting", self.dst.name, tag, exc)
            return None
        if current is None:
            return None
        wanted = {ANN_SOURCE_DIGEST: source_digest, ANN_OPTIONS_DIGEST: self.output_key}
        try:  # whatever the tag holds now is replaced unless it is our up-to-date output
            annotations = json.loads(current.raw).get("annotations") or {}
            return current if all(annotations.get(k) == v for k, v in wanted.items()) else None
        except (ValueError, AttributeError, TypeError):
            return None

    def _prepare_base(self) -> None:
        """--mkfs=false: the base layer wrapped like the reference's uploadBaseLayer (§3.2), pushed as layer 0."""
        assert self.opts.base_layer is not None
        try:  # wrap_blob validates the layer (tar, ZFile, LSMT checks) while copying it
            self.base = wrap_blob(self.opts.base_layer, self.run_dir / "baselayer.tar")
        except FormatError as exc:
            raise ImageError(f"base layer {self.opts.base_layer}: {exc}") from exc
        if self.opts.upload:
            self._put_blob(self.base, delete=False)
        else:
            shutil.copyfile(self.base.path, Path(self.dst.repository) / self.base.digest.split(":", 1)[1])

    # ------------------------------------------------------------------ index

    def _convert_index(self, top: Manifest, index: dict[str, Any], tag: str
                       ) -> tuple[str, str, bytes, list[ManifestResult]]:
        where = str(self.source_loc)
        check_not_overlaybd(index, where)
        children = [c for c in index.get("manifests") or [] if not is_attestation(c)]
        children = [c for c in children if platform_matches(c.get("platform"), self.opts.platforms)]
        if not children:
            wanted = f" matching {', '.join(self.opts.platforms)}" if self.opts.platforms else ""
            raise ImageError(f"{where}: the index has no image manifests{wanted} to convert")
        for child in children:
            if child.get("mediaType") in (OCI_INDEX, DOCKER_LIST):
                raise ImageError(f"{where}: nested index {child.get('digest')} is not supported")

        def one(child: dict[str, Any]) -> ManifestResult:
            platform = platform_string(child.get("platform"))
            child_where = f"{where} [{platform or child['digest']}]"
            manifest = self.src.get_manifest(child["digest"])
            body = parse_manifest(manifest.raw, manifest.media_type, child_where)
            check_image_manifest(body, child_where)
            subject = self._subject(manifest.media_type, manifest.digest, len(manifest.raw))
            return self._convert_image(manifest.digest, manifest.media_type, body, child_where, platform=platform,
                                       ref="", subject=subject)

        with ThreadPoolExecutor(max_workers=self.opts.concurrency_limit, thread_name_prefix="obd-child") as pool:
            futures = [pool.submit(one, child) for child in children]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                self.cancel.set()  # siblings stop at their next read
                wait(futures)
                errors = [f.exception() for f in futures if f.exception() is not None]
                # the sibling that failed first is the cause; the others were only cancelled
                raise next((e for e in errors if not isinstance(e, ConversionAborted)), errors[0])  # type: ignore[misc]
            results = [f.result() for f in futures]
        converted = [ConvertedChild(child, r.digest, r.size, r.media_type) for child, r in zip(children, results,
                                                                                                 strict=True)]
        raw = rewrite_index(index, converted, oci=self.opts.oci, annotations=self._annotations(top.digest),
                            subject=self._subject(top.media_type, top.digest, len(top.raw)))
        media_type = OCI_INDEX if self.opts.oci else DOCKER_LIST
        self.check_cancel()
        digest = self.dst.put_manifest(tag, raw, media_type)
        self._index_referrer(top.digest, raw, media_type)
        self.emit("manifest_pushed", ref=tag, digest=digest, media_type=media_type)
        return digest, media_type, raw, results

    # ------------------------------------------------------------------ one image

    def _convert_image(self, digest: str, media_type: str, manifest: dict[str, Any], where: str, *, platform: str,
                       ref: str, subject: dict[str, Any] | None) -> ManifestResult:
        config_desc = manifest["config"]
        config_raw = self.src.read_blob(config_desc["digest"], config_desc.get("size"))
        image = source_image(digest, media_type, manifest, config_raw, where)
        results: list[LayerResult] = []
        converted: list[ConvertedLayer] = []
        if self.base is not None:
            results.append(LayerResult(0, self.base.digest, self.base.size, BASE_LAYER_UUID, "base"))
            converted.append(ConvertedLayer(self.base.digest, self.base.size))
        offset = len(results)

        reused = self._reuse_prefix(image)
        for layer, hit in zip(image.layers, reused, strict=False):
            results.append(LayerResult(offset + layer.index, hit.digest, hit.size, layer.uuid, "reused",
                                       layer.digest, layer.diff_id, layer.chain_id))
            converted.append(ConvertedLayer(hit.digest, hit.size))
            self.emit("layer_reused", platform=platform, index=layer.index, count=len(image.layers),
                      digest=hit.digest)
        if len(reused) < len(image.layers):
            tag = hashlib.sha256(digest.encode()).hexdigest()[:12]
            builder = self._builder(image, list(converted), tag)
            uploader = _Uploader()
            # Converted blobs are deleted as they upload: keep the temp dir within the largest of them.
            budget = _TempBudget(self.cancelled) if self.opts.upload and not self.opts.reserve else None
            try:
                for layer in image.layers[len(reused):]:
                    self.check_cancel()
                    info, result = self._convert_layer(builder, image, layer, platform, tag, offset, budget)
                    results.append(result)
                    converted.append(ConvertedLayer(info.digest, info.size))
                    uploader.wait()  # the previous upload ends before the budget follows this one
                    if budget is not None:
                        budget.upload_started(info.size)
                    uploader.submit(lambda info=info, layer=layer: self._upload_layer(info, layer, budget))
                uploader.wait()
            except BaseException:
                with contextlib.suppress(BaseException):
                    uploader.wait()
                raise

        config_out = rewrite_config(image.config, converted)
        raw = rewrite_manifest(image, config_out, converted, oci=self.opts.oci,
                               annotations=self._annotations(digest), subject=subject)
        out_type = OCI_MANIFEST if self.opts.oci else DOCKER_MANIFEST
        self.check_cancel()
        config_digest = self.dst.put_blob_bytes(config_out)
        out_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        pushed = self.dst.put_manifest(ref or out_digest, raw, out_type)
        self._index_referrer(digest, raw, out_type)
        self.emit("manifest_pushed", ref=ref or out_digest, digest=pushed, media_type=out_type, platform=platform)
        return ManifestResult(platform, digest, pushed, out_type, len(raw), config_digest, results, raw, config_out)

    def _reuse_prefix(self, image: SourceImage) -> list[CachedLayer]:
        """The longest prefix of layers converted before with the same options and present in the target."""
        if self.cache is None or self.opts.force:
            return []
        prefix: list[CachedLayer] = []
        for layer in image.layers:
            hit = self.cache.get(self.dst.cache_registry, layer.chain_id, self.bytes_key)
            if hit is None:
                break
            if self.dst.blob_size(hit.digest) == hit.size:
                prefix.append(hit)
                continue
            if self.dst.same_registry_mounts and self.dst.mount_blob(hit.digest, hit.repository):
                self.cache.put(self.dst.cache_registry, layer.chain_id, self.bytes_key,
                               CachedLayer(hit.digest, hit.size, self.dst.repository))
                prefix.append(hit)
                continue
            self.cache.forget(self.dst.cache_registry, layer.chain_id, self.bytes_key)
            break
        return prefix

    def _builder(self, image: SourceImage, lower: list[ConvertedLayer], tag: str) -> ImageBuilder:
        if not lower:
            fs_uuid, hash_seed = derive_fs_ids(image.layers[0].chain_id.encode())
            return ImageBuilder(self.opts.vsize << 30, fs_uuid=fs_uuid, hash_seed=hash_seed)
        # Rebuild the filesystem state from the converted lower blobs (the base layer, reused layers).
        paths: list[str] = []
        fetched: list[str] = []
        try:
            for k, layer in enumerate(lower):
                if self.base is not None and k == 0:
                    paths.append(self.base.path)
                    continue
                dest = str(self.run_dir / f"{tag}-lower-{k}.obd")
                path = self.dst.fetch_blob(layer.digest, layer.size, dest)
                if path == dest:
                    fetched.append(dest)
                paths.append(path)
            with StackedReader(paths) as disk:
                return ImageBuilder.from_disk(disk)
        except FormatError as exc:
            raise ImageError(f"{image.digest}: cannot reload the converted lower layers: {exc}") from exc
        finally:
            for path in fetched:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _convert_layer(self, builder: ImageBuilder, image: SourceImage, layer: SourceLayer, platform: str, tag: str,
                       offset: int, budget: _TempBudget | None = None) -> tuple[BlobInfo, LayerResult]:
        started = time.monotonic()
        label = layer.label
        count = len(image.layers)
        self.emit("layer_start", platform=platform, index=layer.index, count=count, size=layer.size,
                  digest=layer.digest)
        parent = image.layers[layer.index - 1].uuid if layer.index else None
        path = self.run_dir / f"{tag}-layer-{layer.index}.obd"
        try:
            raw = self.src.open_blob(layer.digest, layer.size)
        except RegistryError as exc:
            raise _naming_layer(exc, label) from exc
        source = _SourceStream(raw, self.cancelled, lambda n: self.emit("layer_bytes", platform=platform,
                                                                      index=layer.index, bytes=n))
        tar: LayerStream | None = None
        try:
            with LayerBlobWriter(path, virtual_size=builder.vsize, uuid=layer.uuid, parent_uuid=parent,
                                 algorithm=self.opts.algorithm, block_size=self.opts.block_size) as writer:
                # decompressed and hashed (the diff_id) on a helper thread, ahead of the builder
                tar = LayerStream(source, hash_content=True)  # type: ignore[arg-type]
                sink = writer if budget is None else _BudgetedSink(writer, budget)
                stats = self._apply(builder, tar, sink, label, source)
                if source.error is not None:
                    raise source.error
                self._finish_source(tar, source, layer)
            info = writer.info
            assert info is not None
        finally:
            if tar is not None:
                tar.close()
            raw.close()
        seconds = time.monotonic() - started
        self.emit("layer_done", platform=platform, index=layer.index, count=count, digest=info.digest,
                  size=info.size, tar_bytes=tar.count, files=stats.files, seconds=seconds)
        log.info("layer %s%s: %d files, %.1f MB tar -> %s (%.1f MB) in %.2f s (%.0f MB/s)", label,
                 f" [{platform}]" if platform else "", stats.files, tar.count / 1e6, info.digest, info.size / 1e6,
                 seconds, tar.count / 1e6 / max(seconds, 1e-6))
        return info, LayerResult(offset + layer.index, info.digest, info.size, layer.uuid, "converted", layer.digest,
                                 layer.diff_id, layer.chain_id, round(seconds, 3), tar.count, stats.files)

    def _apply(self, builder: ImageBuilder, tar: LayerStream, writer: BlockSink, label: str,
               source: _SourceStream) -> LayerStats:
        try:
            return builder.apply_layer(tar, writer, label=label)
        except LayerApplyError as exc:
            if isinstance(source.error, DigestMismatchError):
                raise LayerConversionError(f"layer {label}: {source.error}", layer=label) from exc
            if isinstance(source.error, ConversionError):
                raise _naming_layer(source.error, label) from exc  # registry trouble or cancel: keep its class
            if isinstance(source.error, Exception):
                raise TransientError(f"layer {label}: reading the source failed: {source.error}") from exc
            raise LayerConversionError(str(exc), layer=label, entry=exc.entry) from exc

    def _finish_source(self, tar: LayerStream, source: _SourceStream, layer: SourceLayer) -> None:
        """Read both streams to their end (which verifies the blob digest) and check the diff_id."""
        try:
            tar.drain()
            while source.readinto(bytearray(1 << 20)):
                pass
        except DigestMismatchError as exc:
            raise LayerConversionError(f"layer {layer.label}: {exc}", layer=layer.label) from exc
        except ConversionError as exc:
            raise _naming_layer(exc, layer.label) from exc
        except (OSError, EOFError, ValueError) as exc:
            raise LayerConversionError(f"layer {layer.label}: cannot read layer data after the tar end: {exc}",
                                       layer=layer.label) from exc
        diff_id = "sha256:" + tar.hexdigest()
        if self.opts.verify_diff_ids and diff_id != layer.diff_id:
            raise LayerConversionError(f"layer {layer.label}: uncompressed content has digest {diff_id}, but the "
                                       f"config's rootfs.diff_ids[{layer.index}] says {layer.diff_id}",
                                       layer=layer.label)

    def _put_blob(self, info: BlobInfo, *, delete: bool, on_release: Callable[[int], None] | None = None) -> None:
        existed = self.dst.blob_size(info.digest) == info.size
        try:
            if not existed:
                consume = delete and not self.opts.reserve
                self.dst.put_blob_file(info.path, info.digest, info.size, consume=consume, on_release=on_release)
        finally:
            if delete and not self.opts.reserve:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(info.path)
        if not existed:
            with self._lock:
                self.blobs_uploaded += 1
                self.bytes_written += info.size

    def _upload_layer(self, info: BlobInfo, layer: SourceLayer, budget: _TempBudget | None = None) -> None:
        try:
            if self.cancelled():
                return
            started = time.monotonic()
            self._put_blob(info, delete=self.opts.upload, on_release=None if budget is None else budget.released)
        finally:
            if budget is not None:
                budget.upload_finished()  # the blob is gone (or the upload failed: its error comes from wait())
        if self.cache is not None:
            self.cache.put(self.dst.cache_registry, layer.chain_id, self.bytes_key,
                           CachedLayer(info.digest, info.size, self.dst.repository))
        self.emit("layer_uploaded", index=layer.index, digest=info.digest, size=info.size,
                  seconds=time.monotonic() - started)


def convert(source: str | Location, target: str | Location,
            options: ConvertOptions | Mapping[str, Any] | None = None) -> ConvertResult:
    """Convert `source` (registry reference or `oci:PATH[:TAG]`) and publish it as `target` (same forms).
    Either may also be a `Location` built from its parts (`transport.registry_location`, the webhook's way).

    `options` may be a ConvertOptions or a mapping of its fields (the webhook passes its rule options plus a
    "registry" mapping). Raises TransientError/PermanentError subclasses (converter.errors); on any error no
    tag is pushed.
    """
    opts = ConvertOptions.coerce(options)
    src_loc = source if isinstance(source, Location) else parse_location(source)
    dst_loc = target if isinstance(target, Location) else parse_location(target)
    if opts.upload and not dst_loc.tag:
        raise ImageError(f"target {target!r} needs a tag (e.g. {target}:latest_obd)")
    clients: dict[str, Any] = {}
    if opts.work_dir:
        Path(opts.work_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="obd-convert-", dir=opts.work_dir))
    keep = opts.reserve or not opts.upload
    conversion: _Conversion | None = None
    # A layout this run creates is removed again if the run fails; one that existed before is never touched.
    new_layout = _first_missing(Path(dst_loc.layout)) if dst_loc.layout is not None and opts.upload else None
    try:
        src = open_store(src_loc, opts.registry_options, clients)
        dst = (open_store(dst_loc, opts.registry_options, clients, create=True) if opts.upload
               else _DirStore(run_dir / "output"))
        conversion = _Conversion(src_loc, dst_loc, opts, src, dst, run_dir)
        result = conversion.run()
        new_layout = None  # converted: the new layout stays
        return result
    except (AttributeError, TypeError, KeyError) as exc:
        # Bad image data that slipped past the shape checks (converter/shape.py): permanent, one line
        log.debug("conversion of %s failed on malformed data", source, exc_info=True)
        raise ImageError(f"{source}: malformed image data ({type(exc).__name__}: {exc})") from exc
    finally:
        if conversion is not None:
            conversion.close()
        close_clients(clients)
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        if new_layout is not None:
            shutil.rmtree(new_layout, ignore_errors=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory that creating `path` would make (None if `path` exists already)."""
    missing = None
    path = path.absolute()
    while not path.exists():
        missing, path = path, path.parent
    return missing
