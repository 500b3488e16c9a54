"""Convert an image (registry or OCI layout) and publish it: `convert(source, target, options)`.

Per image manifest, for every requested output (native overlaybd, TurboOCI; converter/outputs/):

    reuse prefix (cache + HEAD/mount)  ->  for each remaining layer:
        source blob stream -> decompress (+ gzip index for turbo) -> [sha256 = diff_id] -> ONE ext4 apply
        -> each output's sinks (native blob / turbo meta layer) -> upload in a background thread while the
        next layer converts -> delete the temp files
    -> per output: config -> manifest by digest (index children) or by tag

An index converts its children in parallel (`concurrency_limit`) and is pushed by tag last, so the target
tag never points at anything partial. See docs/pipeline.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .cache import CachedLayer, LayerCache, RedisLayerCache, open_layer_cache
from .errors import ConversionError, PermanentError, TransientError
from .ext4 import BlockSink, ImageBuilder, LayerApplyError, LayerStats, RemoteSink, derive_fs_ids
from .ext4.layerstream import LayerStream
from .formats.common import FormatError
from .formats.gzindex import MultiMemberError
from .formats.layer import BlobInfo, LayerBlobWriter, wrap_blob
from .formats.stack import StackedReader
from .image import (
    ANN_OPTIONS_DIGEST,
    ANN_SOURCE_DIGEST,
    BASE_LAYER_UUID,
    DOCKER_LIST,
    OCI_INDEX,
    ConvertedChild,
    ConvertedLayer,
    ImageError,
    SourceImage,
    SourceLayer,
    check_image_manifest,
    check_layer_count,
    check_not_overlaybd,
    is_attestation,
    parse_manifest,
    platform_matches,
    platform_string,
    rewrite_index,
    source_image,
)
from .options import ConvertOptions
from .outputs import LayerBlob, LayerContext, LayerJob, Lower, Output, Upload
from .outputs.native import NativeOutput
from .outputs.turbo import TurboOutput, meta_lower
from .plumbing import BudgetedSink, ConversionAborted, DirStore, SourceStream, TeeSink, TempBudget, Uploader
from .registry import DigestMismatchError, Manifest, RegistryError
from .results import ConvertResult, LayerResult, ManifestResult
from .transport import Location, Store, close_clients, open_store, parse_location

# the names tests and older callers import from here
_TempBudget, _BudgetedSink = TempBudget, BudgetedSink

log = logging.getLogger("obd-convert")

__all__ = ["ConversionAborted", "ConvertOptions", "ConvertResult", "LayerConversionError", "LayerResult",
           "ManifestResult", "convert"]


class LayerConversionError(PermanentError):
    """A layer could not be converted (bad tar, corrupt compression, wrong digest); names the layer."""

    def __init__(self, message: str, *, layer: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.layer, self.entry = layer, entry


def _naming_layer(exc: BaseException, label: str) -> BaseException:
    """A registry error about a layer blob, re-made with the layer in its message (same class and details)."""
    if isinstance(exc, RegistryError) and not str(exc).startswith("layer "):
        named = type(exc)(f"layer {label}: {exc}", status=exc.status, errors=exc.errors, method=exc.method,
                          path=exc.path)
        named.__cause__ = exc
        return named
    return exc


@dataclass
class _Target:
    """One requested output image: its kind, where it is published, and what this run pushed there."""

    output: Output
    location: Location
    dst: Store
    blobs_uploaded: int = 0
    bytes_written: int = 0
    originals_uploaded: int = 0

    @property
    def tag(self) -> str:
        return self.location.tag or ""


@dataclass
class _Layer:
    """One converted layer as every target sees it."""

    blobs: list[LayerBlob]
    seconds: float
    tar_bytes: int
    files: int


# ----------------------------------------------------------------------------------------- the run


class _Conversion:
    def __init__(self, source: Location, targets: list[_Target], opts: ConvertOptions, src: Store,
                 run_dir: Path) -> None:
        self.source_loc, self.targets, self.opts = source, targets, opts
        self.src, self.run_dir = src, run_dir
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self.cache: LayerCache | RedisLayerCache | None = None
        if opts.use_cache and opts.upload:
            self.cache = open_layer_cache(opts.cache_dir, opts.cache_url)
        self.base: BlobInfo | None = None
        # source layers a turbo output converts natively after all: multi-member gzip (eStargz), whose
        # second member no gzip index can reach (turbooci §3.6); found while reading, so the image is redone
        self.native_layers: set[str] = set()
        for t in targets:
            if isinstance(t.output, TurboOutput):
                t.output.native_layers = self.native_layers

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

    def run(self) -> list[ConvertResult]:
        """One result per target, in the order of `self.targets`."""
        started = time.monotonic()
        src_ref = self.source_loc.digest or self.source_loc.tag or ("" if self.source_loc.is_layout else "latest")
        top = self.src.get_manifest(src_ref)
        where = f"{self.source_loc}"
        top_json = parse_manifest(top.raw, top.media_type, where)
        self._check_layer_counts(top, top_json, where)  # before anything (even the base layer) is pushed
        if not self.opts.mkfs:
            self._prepare_base()
        bytes_key = self.opts.bytes_key(self.base.digest if self.base else None)
        for t in self.targets:
            t.output.set_keys(bytes_key)

        done: dict[int, ConvertResult] = {}
        if self.opts.upload and not self.opts.force:
            for k, t in enumerate(self.targets):
                current = self._up_to_date(t, top.digest)
                if current is not None:
                    self.emit("up_to_date", target=str(t.location), digest=current.digest)
                    done[k] = self._result(t, top, current.digest, current.media_type, [], current.raw, started,
                                           up_to_date=True)
        todo = [t for k, t in enumerate(self.targets) if k not in done]
        if todo:
            if top.media_type in (OCI_INDEX, DOCKER_LIST):
                outcomes = self._convert_index(top, top_json, todo)
            else:
                check_image_manifest(top_json, where)
                subject = self._subject(top.media_type, top.digest, len(top.raw))
                images = self._convert_image(todo, top.digest, top.media_type, top_json, where, platform="",
                                             by_tag=True, subject=subject)
                outcomes = [(m.digest, m.media_type, m.raw, [m]) for m in images]
            for t, (digest, media_type, raw, manifests) in zip(todo, outcomes, strict=True):
                done[self.targets.index(t)] = self._result(t, top, digest, media_type, manifests, raw, started,
                                                           up_to_date=False)
        return [done[k] for k in range(len(self.targets))]

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

    def _result(self, t: _Target, top: Manifest, digest: str, media_type: str, manifests: list[ManifestResult],
                raw: bytes, started: float, *, up_to_date: bool) -> ConvertResult:
        layers = [layer for m in manifests for layer in m.layers]
        mounted = t.output.originals_copied if isinstance(t.output, TurboOutput) else 0
        return ConvertResult(
            source=str(self.source_loc), target=str(t.location), source_digest=top.digest, target_digest=digest,
            media_type=media_type, up_to_date=up_to_date, pushed=self.opts.upload and not up_to_date,
            seconds=round(time.monotonic() - started, 3), bytes_written=t.bytes_written,
            blobs_uploaded=t.blobs_uploaded, layers_converted=sum(x.status == "converted" for x in layers),
            layers_reused=sum(x.status == "reused" for x in layers), manifests=manifests, raw=raw,
            output_dir=None if self.opts.upload else str(self.run_dir), kind=t.output.kind,
            originals_copied=mounted + t.originals_uploaded)

    def _annotations(self, t: _Target, source_digest: str) -> dict[str, str]:
        return {ANN_SOURCE_DIGEST: source_digest, ANN_OPTIONS_DIGEST: t.output.output_key}

    def _subject(self, media_type: str, digest: str, size: int) -> dict[str, Any] | None:
        return {"mediaType": media_type, "digest": digest, "size": size} if self.opts.referrer else None

    def _index_referrer(self, t: _Target, subject: str, raw: bytes, media_type: str) -> None:
        if not self.opts.referrer or not self.opts.upload:
            return
        body = json.loads(raw)
        descriptor = {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
                      "size": len(raw), "artifactType": body["artifactType"]}
        if body.get("annotations"):
            descriptor["annotations"] = body["annotations"]
        t.dst.add_referrer(subject, descriptor)

    def _up_to_date(self, t: _Target, source_digest: str) -> Manifest | None:
        """The target's manifest if it records this source and these options (one manifest GET)."""
        try:
            current = t.dst.find_manifest(t.tag)
        except PermanentError as exc:  # e.g. the tag holds something we cannot read: convert and replace it
            log.info("target %s:%s is not a readable image manifest (%s); converting", t.dst.name, t.tag, exc)
            return None
        if current is None:
            return None
        try:  # whatever the tag holds now is replaced unless it is our up-to-date output
            annotations = json.loads(current.raw).get("annotations") or {}
            wanted = {ANN_SOURCE_DIGEST: source_digest, ANN_OPTIONS_DIGEST: t.output.output_key}
            return current if all(annotations.get(k) == v for k, v in wanted.items()) else None
        except (ValueError, AttributeError, TypeError):
            return None

    def _prepare_base(self) -> None:
        """--mkfs=false: the base layer wrapped like the reference's uploadBaseLayer (§3.2), pushed as layer 0
        of every output (TurboOCI §1.1: native format, prepended)."""
        assert self.opts.base_layer is not None
        try:  # wrap_blob validates the layer (tar, ZFile, LSMT checks) while copying it
            self.base = wrap_blob(self.opts.base_layer, self.run_dir / "baselayer.tar")
        except FormatError as exc:
            raise ImageError(f"base layer {self.opts.base_layer}: {exc}") from exc
        for t in self.targets:
            if self.opts.upload:
                self._put(t, Upload(self.base.path, self.base.digest, self.base.size, delete=False))
            else:
                shutil.copyfile(self.base.path, Path(t.dst.repository) / self.base.digest.split(":", 1)[1])

    # ------------------------------------------------------------------ index

    def _convert_index(self, top: Manifest, index: dict[str, Any], targets: list[_Target]
                       ) -> list[tuple[str, str, bytes, list[ManifestResult]]]:
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

        def one(child: dict[str, Any]) -> list[ManifestResult]:
            platform = platform_string(child.get("platform"))
            child_where = f"{where} [{platform or child['digest']}]"
            manifest = self.src.get_manifest(child["digest"])
            body = parse_manifest(manifest.raw, manifest.media_type, child_where)
            check_image_manifest(body, child_where)
            subject = self._subject(manifest.media_type, manifest.digest, len(manifest.raw))
            return self._convert_image(targets, manifest.digest, manifest.media_type, body, child_where,
                                       platform=platform, by_tag=False, subject=subject)

        with ThreadPoolExecutor(max_workers=self.opts.concurrency_limit, thread_name_prefix="obd-child") as pool:
            futures = [pool.submit(one, child) for child in children]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                self.cancel.set()  # siblings stop at their next read
                wait(futures)
                errors = [f.exception() for f in futures if f.exception() is not None]
                # the sibling that failed first is the cause; the others were only cancelled
                raise next((e for e in errors if not isinstance(e, ConversionAborted)), errors[0])  # type: ignore[misc]
            per_child = [f.result() for f in futures]
        media_type = OCI_INDEX if self.opts.oci else DOCKER_LIST
        outcomes = []
        for k, t in enumerate(targets):
            results = [r[k] for r in per_child]
            converted = [ConvertedChild(child, r.digest, r.size, r.media_type)
                         for child, r in zip(children, results, strict=True)]
            raw = rewrite_index(index, converted, oci=self.opts.oci, annotations=self._annotations(t, top.digest),
                                subject=self._subject(top.media_type, top.digest, len(top.raw)),
                                artifact_type=t.output.artifact_type)
            self.check_cancel()
            digest = t.dst.put_manifest(t.tag, raw, media_type)
            self._index_referrer(t, top.digest, raw, media_type)
            self.emit("manifest_pushed", ref=t.tag, digest=digest, media_type=media_type)
            outcomes.append((digest, media_type, raw, results))
        return outcomes

    # ------------------------------------------------------------------ one image

    def _convert_image(self, targets: list[_Target], digest: str, media_type: str, manifest: dict[str, Any],
                       where: str, *, platform: str, by_tag: bool, subject: dict[str, Any] | None
                       ) -> list[ManifestResult]:
        while True:
            try:
                return self._convert_image_once(targets, digest, media_type, manifest, where, platform=platform,
                                                by_tag=by_tag, subject=subject)
            except LayerConversionError as exc:
                source = _multi_member_layer(exc, manifest)
                if source is None or not any(isinstance(t.output, TurboOutput) for t in targets):
                    raise
                with self._lock:
                    if source in self.native_layers:
                        raise
                    self.native_layers.add(source)
                log.warning("%s: layer %s is a multi-member gzip (eStargz?) blob, which a TurboOCI layer cannot "
                            "serve; converting it natively and starting the image again (converted layers come "
                            "from the reuse cache)", where, source)

    def _convert_image_once(self, targets: list[_Target], digest: str, media_type: str, manifest: dict[str, Any],
                            where: str, *, platform: str, by_tag: bool, subject: dict[str, Any] | None
                            ) -> list[ManifestResult]:
        config_desc = manifest["config"]
        config_raw = self.src.read_blob(config_desc["digest"], config_desc.get("size"))
        image = source_image(digest, media_type, manifest, config_raw, where)
        results: list[list[LayerResult]] = [[] for _ in targets]
        converted: list[list[ConvertedLayer]] = [[] for _ in targets]
        lowers: list[Lower] = []
        if self.base is not None:
            lowers.append(Lower(self.base.path, temporary=False))
            for k in range(len(targets)):
                results[k].append(LayerResult(0, self.base.digest, self.base.size, BASE_LAYER_UUID, "base"))
                converted[k].append(ConvertedLayer(self.base.digest, self.base.size))
        offset = 1 if self.base is not None else 0
        tag = hashlib.sha256(digest.encode()).hexdigest()[:12]

        try:
            prefixes = [self._reuse_prefix(t, image) for t in targets]
            reused = min(len(p) for p in prefixes)
            for layer in image.layers[:reused]:
                for k, t in enumerate(targets):
                    hit = prefixes[k][layer.index]
                    work = self.run_dir / f"{tag}-lower-{k}-{layer.index}"
                    conv, lower = t.output.reused(layer, hit, work)
                    results[k].append(LayerResult(offset + layer.index, hit.digest, hit.size, layer.uuid, "reused",
                                                  layer.digest, layer.diff_id, layer.chain_id,
                                                  format="turbo" if lower.meta else "native"))
                    converted[k].append(conv)
                    if k == 0:  # the first target's lower files rebuild the filesystem
                        lowers.append(lower)
                    elif lower.temporary:
                        os.unlink(lower.path)
                self.emit("layer_reused", platform=platform, index=layer.index, count=len(image.layers),
                          digest=prefixes[0][layer.index].digest)
            if reused < len(image.layers):
                builder = self._builder(image, lowers)
                self._convert_layers(builder, image, image.layers[reused:], targets, platform, tag, offset, results,
                                     converted)
        finally:
            for lower in lowers:
                if lower.temporary:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lower.path)

        out = []
        for k, t in enumerate(targets):
            config_out, raw, out_type = t.output.image_manifest(image, converted[k], self._annotations(t, digest),
                                                                subject)
            self.check_cancel()
            config_digest = t.dst.put_blob_bytes(config_out)
            out_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            ref = t.tag if by_tag else out_digest
            pushed = t.dst.put_manifest(ref, raw, out_type)
            self._index_referrer(t, digest, raw, out_type)
            self.emit("manifest_pushed", ref=ref, digest=pushed, media_type=out_type, platform=platform)
            out.append(ManifestResult(platform, digest, pushed, out_type, len(raw), config_digest, results[k], raw,
                                      config_out))
        return out

    def _convert_layers(self, builder: ImageBuilder, image: SourceImage, layers: tuple[SourceLayer, ...],
                        targets: list[_Target], platform: str, tag: str, offset: int,
                        results: list[list[LayerResult]], converted: list[list[ConvertedLayer]]) -> None:
        uploader = Uploader()
        # Converted blobs are deleted as they upload: keep the temp dir within the largest of them.
        budget = TempBudget(self.cancelled) if self.opts.upload and not self.opts.reserve else None
        try:
            for layer in layers:
                self.check_cancel()
                done = self._convert_layer(builder, image, layer, targets, platform, tag, budget)
                for k, blob in enumerate(done.blobs):
                    results[k].append(LayerResult(
                        offset + layer.index, blob.layer.digest, blob.layer.size, layer.uuid, "converted",
                        layer.digest, layer.diff_id, layer.chain_id, round(done.seconds, 3), done.tar_bytes,
                        done.files, blob.format, blob.note))
                    converted[k].append(blob.layer)
                uploader.wait()  # the previous upload ends before the budget follows this one
                if budget is not None:
                    budget.upload_started(sum(u.size for b in done.blobs for u in b.uploads))
                uploader.submit(lambda done=done, layer=layer: self._upload_layer(targets, done, layer, budget))
            uploader.wait()
        except BaseException:
            with contextlib.suppress(BaseException):
                uploader.wait()
            raise

    def _reuse_prefix(self, t: _Target, image: SourceImage) -> list[CachedLayer]:
        """The longest prefix of layers converted before with the same options and present in the target."""
        if self.cache is None or self.opts.force:
            return []
        prefix: list[CachedLayer] = []
        key = t.output.bytes_key
        for layer in image.layers:
            hit = self.cache.get(t.dst.cache_registry, layer.chain_id, key)
            if hit is None or not t.output.ready_for_reuse(layer):
                break
            if t.dst.blob_size(hit.digest) == hit.size:
                prefix.append(hit)
                continue
            if t.dst.same_registry_mounts and t.dst.mount_blob(hit.digest, hit.repository):
                self.cache.put(t.dst.cache_registry, layer.chain_id, key,
                               CachedLayer(hit.digest, hit.size, t.dst.repository))
                prefix.append(hit)
                continue
            self.cache.forget(t.dst.cache_registry, layer.chain_id, key)
            break
        return prefix

    def _builder(self, image: SourceImage, lowers: list[Lower]) -> ImageBuilder:
        if not lowers:
            fs_uuid, hash_seed = derive_fs_ids(image.layers[0].chain_id.encode())
            return ImageBuilder(self.opts.vsize << 30, fs_uuid=fs_uuid, hash_seed=hash_seed)
        # Rebuild the filesystem state from the converted lower layers (the base layer, reused layers): only
        # their metadata is read, so a turbo layer's meta LSMT is enough (its tag-1 data is not needed).
        opened = []
        try:
            opened = [meta_lower(x.path) for x in lowers if x.meta]
            metas = iter(opened)
            with StackedReader([next(metas) if x.meta else x.path for x in lowers]) as disk:
                return ImageBuilder.from_disk(disk)
        except FormatError as exc:
            raise ImageError(f"{image.digest}: cannot reload the converted lower layers: {exc}") from exc
        finally:
            for layer in opened:
                layer.close()

    def _convert_layer(self, builder: ImageBuilder, image: SourceImage, layer: SourceLayer, targets: list[_Target],
                       platform: str, tag: str, budget: TempBudget | None = None) -> _Layer:
        started = time.monotonic()
        label = layer.label
        count = len(image.layers)
        self.emit("layer_start", platform=platform, index=layer.index, count=count, size=layer.size,
                  digest=layer.digest)
        work = self.run_dir / f"{tag}-layer-{layer.index}"
        copy_path = f"{work}.orig" if any(t.output.needs_original(layer) for t in targets) else None
        try:
            raw = self.src.open_blob(layer.digest, layer.size)
        except RegistryError as exc:
            raise _naming_layer(exc, label) from exc
        copy: BinaryIO | None = open(copy_path, "wb") if copy_path else None  # noqa: SIM115 (closed below)
        source = SourceStream(raw, self.cancelled, lambda n: self.emit("layer_bytes", platform=platform,
                                                                     index=layer.index, bytes=n), copy)
        tar: LayerStream | None = None
        jobs: list[LayerJob] = []
        blobs: list[LayerBlob] = []
        turbo = any(isinstance(t.output, TurboOutput) for t in targets) and layer.digest not in self.native_layers
        try:
            # decompressed and hashed (the diff_id) on a helper thread, ahead of the builder; for a turbo
            # output a gzip layer's random-access index is built in the same pass
            tar = LayerStream(source, hash_content=True, gzip_index=turbo)  # type: ignore[arg-type]
            parent = image.layers[layer.index - 1].uuid if layer.index else None
            for k, t in enumerate(targets):
                ctx = LayerContext(layer, parent, builder.vsize, tar.compression, Path(f"{work}-{k}"), copy_path)
                jobs.append(t.output.start_layer(ctx))
            native_sinks = [self._budgeted(j.native, budget) for j in jobs if j.native is not None]
            metas: list[RemoteSink] = [j.turbo for j in jobs if j.turbo is not None]
            native: BlockSink | None = (native_sinks[0] if len(native_sinks) == 1
                                        else TeeSink(*native_sinks) if native_sinks else None)
            stats = self._apply(builder, tar, native, metas[0] if metas else None, label, source)
            if source.error is not None:
                raise source.error
            self._finish_source(tar, source, layer)
            if copy is not None:
                copy.close()
            blobs = [job.finish(tar) for job in jobs]
        except BaseException:
            for job in jobs[len(blobs):]:
                with contextlib.suppress(Exception):
                    job.abort()
            for blob in blobs:
                for up in blob.uploads:
                    if up.delete:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(up.path)
            if copy_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(copy_path)
            raise
        finally:
            if copy is not None:
                copy.close()
            if tar is not None:
                tar.close()
            raw.close()
        if copy_path is not None and not any(u.path == copy_path for b in blobs for u in b.uploads):
            os.unlink(copy_path)  # e.g. a zstd layer: converted natively, its original is not referenced
        seconds = time.monotonic() - started
        first = blobs[0].layer
        self.emit("layer_done", platform=platform, index=layer.index, count=count, digest=first.digest,
                  size=first.size, tar_bytes=tar.count, files=stats.files, seconds=seconds)
        log.info("layer %s%s: %d files, %.1f MB tar -> %s in %.2f s (%.0f MB/s)", label,
                 f" [{platform}]" if platform else "", stats.files, tar.count / 1e6,
                 ", ".join(f"{b.layer.digest} ({b.format}, {b.layer.size / 1e6:.1f} MB)" for b in blobs),
                 seconds, tar.count / 1e6 / max(seconds, 1e-6))
        return _Layer(blobs, seconds, tar.count, stats.files)

    @staticmethod
    def _budgeted(sink: BlockSink, budget: TempBudget | None) -> BlockSink:
        if budget is None or not isinstance(sink, LayerBlobWriter):
            return sink
        return BudgetedSink(sink, budget)

    def _apply(self, builder: ImageBuilder, tar: LayerStream, native: BlockSink | None, turbo: RemoteSink | None,
               label: str, source: SourceStream) -> LayerStats:
        try:
            return builder.apply_layer(tar, native, label=label, turbo=turbo)
        except LayerApplyError as exc:
            if isinstance(source.error, DigestMismatchError):
                raise LayerConversionError(f"layer {label}: {source.error}", layer=label) from exc
            if isinstance(source.error, ConversionError):
                raise _naming_layer(source.error, label) from exc  # registry trouble or cancel: keep its class
            if isinstance(source.error, Exception):
                raise TransientError(f"layer {label}: reading the source failed: {source.error}") from exc
            raise LayerConversionError(str(exc), layer=label, entry=exc.entry) from exc

    def _finish_source(self, tar: LayerStream, source: SourceStream, layer: SourceLayer) -> None:
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

    def _put(self, t: _Target, up: Upload, on_release: Any = None) -> bool:
        """Put one file into the target unless it is there already; True if it was uploaded."""
        existed = t.dst.blob_size(up.digest) == up.size
        delete = up.delete and not self.opts.reserve
        try:
            if not existed:
                t.dst.put_blob_file(up.path, up.digest, up.size, consume=delete, on_release=on_release)
        finally:
            if delete:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(up.path)
        if not existed:
            with self._lock:
                t.blobs_uploaded += 1
                t.bytes_written += up.size
        return not existed

    def _upload_layer(self, targets: list[_Target], done: _Layer, layer: SourceLayer,
                      budget: TempBudget | None = None) -> None:
        started = time.monotonic()
        try:
            if self.cancelled():
                return
            released = 0
            for t, blob in zip(targets, done.blobs, strict=True):
                for up in blob.uploads:
                    base = released

                    def report(n: int, base: int = base) -> None:
                        if budget is not None:
                            budget.released(base + n)

                    if self._put(t, up, on_release=report if budget is not None else None) \
                            and up.digest == layer.digest:
                        with self._lock:
                            t.originals_uploaded += 1
                    released += up.size
                    if budget is not None:
                        budget.released(released)
        finally:
            if budget is not None:
                budget.upload_finished()  # the blobs are gone (or the upload failed: its error comes from wait())
        for t, blob in zip(targets, done.blobs, strict=True):
            if self.cache is not None:
                self.cache.put(t.dst.cache_registry, layer.chain_id, t.output.bytes_key,
                               CachedLayer(blob.layer.digest, blob.layer.size, t.dst.repository))
            self.emit("layer_uploaded", index=layer.index, digest=blob.layer.digest, size=blob.layer.size,
                      seconds=time.monotonic() - started, kind=t.output.kind)


def _multi_member_layer(exc: BaseException, manifest: Mapping[str, Any]) -> str | None:
    """The source layer digest if `exc` comes from reading a multi-member gzip layer in turbo mode."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, MultiMemberError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    layer = getattr(exc, "layer", "")
    return next((d["digest"] for d in manifest["layers"] if d["digest"] in layer), None)


def _targets(src: Store, target: Location, opts: ConvertOptions, run_dir: Path,
             clients: dict[str, Any]) -> list[_Target]:
    """The requested outputs: `target` is native (or turbo with `turbo_oci`); `turbo_target` adds a turbo one."""
    wanted = [(target, opts.turbo_oci)]
    if opts.turbo_target:
        turbo_target = opts.turbo_target
        wanted.append((turbo_target if isinstance(turbo_target, Location) else parse_location(turbo_target), True))
    targets = []
    for k, (loc, turbo) in enumerate(wanted):
        if opts.upload and not loc.tag:
            raise ImageError(f"target {loc} needs a tag (e.g. {loc}:latest_{'turbo' if turbo else 'obd'})")
        dst = (open_store(loc, opts.registry_options, clients, create=True) if opts.upload
               else DirStore(run_dir / ("output" if k == 0 else "output-turbo")))
        output: Output = TurboOutput(dst, loc.tag or "", opts, src) if turbo else NativeOutput(dst, loc.tag or "", opts)
        targets.append(_Target(output, loc, dst))
    if len({str(t.location) for t in targets}) < len(targets):
        raise ImageError(f"the native and the turbo image cannot both be {target}")
    return targets


def convert(source: str | Location, target: str | Location,
            options: ConvertOptions | Mapping[str, Any] | None = None) -> ConvertResult:
    """Convert `source` (registry reference or `oci:PATH[:TAG]`) and publish it as `target` (same forms).
    Either may also be a `Location` built from its parts (`transport.registry_location`, the webhook's way).

    `target` gets the native overlaybd image, or the TurboOCI image with `options.turbo_oci`; with
    `options.turbo_target` the same run also publishes a TurboOCI image there (the result's `.turbo`).
    `options` may be a ConvertOptions or a mapping of its fields (the webhook passes its rule options plus a
    "registry" mapping). Raises TransientError/PermanentError subclasses (converter.errors); on any error no
    tag is pushed.
    """
    opts = ConvertOptions.coerce(options)
    src_loc = source if isinstance(source, Location) else parse_location(source)
    dst_loc = target if isinstance(target, Location) else parse_location(target)
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
        targets = _targets(src, dst_loc, opts, run_dir, clients)
        conversion = _Conversion(src_loc, targets, opts, src, run_dir)
        results = conversion.run()
        main = results[0]
        if len(results) > 1:
            main.turbo = results[1]
        new_layout = None  # converted: the new layout stays
        return main
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
