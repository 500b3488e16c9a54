"""ConvertOptions: everything that shapes one conversion, from the CLI flags or the webhook's rule options."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PermanentError

if TYPE_CHECKING:
    from .transport import Location

DEFAULT_BASE_LAYER = "/opt/overlaybd/baselayers/ext4_64"
ALGORITHMS = ("lz4", "zstd")
BLOCK_SIZES = (4096, 8192, 16384, 32768)
# Bumped whenever the bytes the engine writes for the same input change, so cached blobs stop matching.
ENGINE_FORMAT = "1"


class OptionsError(PermanentError, ValueError):
    """An option has a value the converter cannot honour; the message names the option."""


def _known_fields(cls: type, value: Mapping[str, Any], problem: str) -> dict[str, Any]:
    """The mapping as constructor arguments of the dataclass `cls`; unknown keys are an OptionsError."""
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise OptionsError(f"{problem} {', '.join(unknown)}")
    return dict(value)


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry: credentials, TLS and plain-HTTP choices (same for source and target).

    `endpoint` (webhook setting, e.g. "http://10.0.0.5:5000") overrides where the registry named in the
    reference is reached; its scheme chooses plain HTTP.
    """

    endpoint: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False  # skip TLS verification (with plain_http: speak HTTP)
    plain_http: bool = False
    cert_dir: str | None = None
    ca_file: str | None = None
    client_cert: tuple[str, str] | None = None
    docker_config: str | None = None

    @classmethod
    def coerce(cls, value: RegistryOptions | Mapping[str, Any] | None) -> RegistryOptions:
        if value is None:
            return cls()
        if isinstance(value, RegistryOptions):
            return value
        data = _known_fields(cls, value, "registry options: unknown key(s)")
        if data.get("client_cert") is not None:
            data["client_cert"] = tuple(data["client_cert"])
        return cls(**data)


ProgressFn = Callable[[str, Mapping[str, Any]], None]


@dataclass
class ConvertOptions:
    """Options of one conversion. Only `bytes_key()` fields change the bytes of converted blobs."""

    oci: bool = False  # OCI media types for the output (default: Docker, like the reference)
    referrer: bool = False  # artifactType + subject on the output (implies oci)
    mkfs: bool = True  # build the filesystem from scratch; False stacks on `base_layer`
    base_layer: str | None = None  # default DEFAULT_BASE_LAYER (only with mkfs=False)
    vsize: int = 64  # GiB
    fstype: str = "ext4"
    algorithm: str = "lz4"
    block_size: int = 4096
    platforms: Sequence[str] = ()  # "os/arch[/variant]" filters for indexes; empty = all
    concurrency_limit: int = 4  # child manifests converted at the same time
    work_dir: str | None = None  # temp blobs (-d/--dir); default the system temp dir
    cache_dir: str | None = None  # reuse cache; default the user cache dir
    cache_url: str | None = None  # redis://… : a reuse cache shared by converters on several machines
    use_cache: bool = True
    force: bool = False  # rebuild even if the target is up to date
    upload: bool = True  # False: build into work_dir and keep the blobs, push nothing
    reserve: bool = False  # keep the temp directory
    verify_diff_ids: bool = True  # hash each decompressed layer and compare with the config
    turbo_oci: bool = False  # the target gets a TurboOCIv1 image instead of a native one (--turboOCI alone)
    # also publish a TurboOCIv1 image there (--overlaybd T1 --turboOCI T2); the webhook passes a Location
    turbo_target: str | Location | None = None
    registry: RegistryOptions | Mapping[str, Any] | None = None
    progress: ProgressFn | None = field(default=None, repr=False, compare=False)
    cancel: threading.Event | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.registry = RegistryOptions.coerce(self.registry)
        if self.referrer:
            self.oci = True
        if self.fstype != "ext4":
            raise OptionsError(f"fstype {self.fstype!r} is not supported yet (only ext4)")
        if self.algorithm not in ALGORITHMS:
            raise OptionsError(f"algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.block_size not in BLOCK_SIZES:
            raise OptionsError(f"block_size {self.block_size}: choose one of {BLOCK_SIZES}")
        if not isinstance(self.vsize, int) or not 1 <= self.vsize <= 16384:
            raise OptionsError(f"vsize {self.vsize!r}: a whole number of GiB between 1 and 16384")
        if self.concurrency_limit < 1:
            raise OptionsError(f"concurrency_limit {self.concurrency_limit}: must be at least 1")
        if isinstance(self.platforms, str):
            self.platforms = (self.platforms,)
        self.platforms = tuple(self.platforms)
        if self.turbo_oci and self.turbo_target:
            raise OptionsError("turbo_oci (the target is the turbo image) and turbo_target (a second, turbo "
                               "target next to the native one) exclude each other")
        if not self.mkfs:
            self.base_layer = self.base_layer or DEFAULT_BASE_LAYER
            if not os.path.isfile(self.base_layer):
                raise OptionsError(f"base layer {self.base_layer!r} (needed without mkfs) does not exist")

    @classmethod
    def coerce(cls, value: ConvertOptions | Mapping[str, Any] | None) -> ConvertOptions:
        if value is None:
            return cls()
        if isinstance(value, ConvertOptions):
            return value
        return cls(**_known_fields(cls, value, "unknown conversion option(s)"))

    @property
    def registry_options(self) -> RegistryOptions:
        assert isinstance(self.registry, RegistryOptions)
        return self.registry

    def bytes_key(self, base_digest: str | None) -> str:
        """Digest of every option that changes converted blob bytes (the reuse cache and annotation key)."""
        shaping = {"engine": ENGINE_FORMAT, "fstype": self.fstype, "vsize": self.vsize, "algorithm": self.algorithm,
                   "block_size": self.block_size, "mkfs": self.mkfs, "base": base_digest}
        raw = json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(raw).hexdigest()
