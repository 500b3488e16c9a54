"""The conversion hook: what a worker calls for one job.

A worker only knows the `ConvertFn` signature. The default implementation hands the job to the
conversion engine (`converter.pipeline.convert`), imported lazily so the HTTP front end never loads it;
tests and deployments can name another callable with the `convert_callable` setting ("module:function").
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from converter.errors import PermanentError
from webhook.config import TURBO_TAG_OPTION, RegistrySettings
from webhook.store import ImageRefs


class RegistryRefused(PermanentError):
    """A job names a registry the service may not contact (queued before it was removed from the
    configuration, or by an older version): never converted."""

    def __init__(self, registry: str) -> None:
        super().__init__(f"registry {registry[:200]!r} is not configured for this service (host_not_allowed)")


class ConversionFailed(Exception):
    """A failed conversion as recorded (message already clipped); what RQ keeps of the failure."""


@dataclass(frozen=True)
class ConversionRequest(ImageRefs):
    """One conversion to perform: the pushed image (pinned by digest) and the tag to publish."""

    job_id: str
    registry: str
    repository: str
    tag: str
    digest: str
    target_tag: str
    options: Mapping[str, Any] = field(default_factory=dict)
    registry_settings: RegistrySettings | None = field(default=None, repr=False)
    attempt: int = 1
    action: str = "convert"  # convert | delete (webhook.lifecycle.mirror_delete)
    # Set by the worker pool when a shutdown's grace period ends; conversions should stop soon after.
    cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


@dataclass(frozen=True)
class ConversionResult:
    target_ref: str
    target_digest: str | None = None
    bytes_written: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)


ConvertFn = Callable[[ConversionRequest], ConversionResult]


def default_convert(job: ConversionRequest) -> ConversionResult:
    """Run the conversion engine: `converter.pipeline.convert(source, target, ConvertOptions)`.

    The options are the rule's, plus the job host's registry settings (endpoint, credentials,
    insecure) under "registry" and the job's cancel event, so a worker shutting down can abort it
    (the engine then raises a TransientError and publishes nothing).
    """
    try:
        pipeline = importlib.import_module("converter.pipeline")  # heavy; only workers load it
        transport = importlib.import_module("converter.transport")
    except ImportError as exc:
        raise PermanentError(f"conversion engine not available (converter.pipeline): {exc}") from exc
    options: dict[str, Any] = dict(job.options)
    if job.registry_settings is not None:
        options["registry"] = job.registry_settings.client_options()
    # Registry and repository go to the engine as they were stored, never re-parsed from "host/repo"
    # text (which would read a single-label host as a Docker Hub namespace).
    source = transport.registry_location(job.registry, job.repository, digest=job.digest)
    target = transport.registry_location(job.registry, job.repository, tag=job.target_tag)
    if turbo_tag := options.pop(TURBO_TAG_OPTION, None):  # a second, TurboOCI output of the same run
        options["turbo_target"] = transport.registry_location(job.registry, job.repository, tag=str(turbo_tag))
    result = pipeline.convert(source, target, pipeline.ConvertOptions(**options, cancel=job.cancel))
    return ConversionResult(
        target_ref=job.target_ref, target_digest=result.target_digest, bytes_written=result.bytes_written,
        details={"up_to_date": result.up_to_date, "layers_converted": result.layers_converted,
                 "layers_reused": result.layers_reused, "seconds": result.seconds, "kind": result.kind,
                 **({"turbo_target": result.turbo.target, "turbo_digest": result.turbo.target_digest}
                    if result.turbo is not None else {})},
    )


def perform(job: ConversionRequest, convert: ConvertFn) -> ConversionResult:
    """Run one job: `convert` for conversions, delete mirroring for delete jobs."""
    if job.action == "delete":
        from webhook.lifecycle import mirror_delete

        return mirror_delete(job)
    if job.action != "convert":
        raise PermanentError(f"job {job.job_id}: unknown action {job.action!r}")
    return convert(job)


def load_convert_callable(spec: str) -> ConvertFn:
    """Resolve "package.module:function" to the callable (a clear error if it does not exist)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"convert_callable: expected 'module:function', got {spec!r}")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"convert_callable: {spec!r} is not a callable")
    return fn
