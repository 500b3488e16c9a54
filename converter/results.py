"""What `convert()` returns: per output image, its manifests and layers (JSON via `to_json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    format: str = "native"  # how the layer is stored: "native" (overlaybd blob) or "turbo" (TurboOCI meta layer)
    note: str = ""  # e.g. "zstd layer converted natively" inside a turbo image


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
    kind: str = "overlaybd"  # "overlaybd" (native) or "turbo" (TurboOCIv1)
    originals_copied: int = 0  # turbo: original layer blobs mounted or uploaded into the target
    turbo: ConvertResult | None = None  # --overlaybd T1 --turboOCI T2: the turbo image of the same run

    @property
    def digest(self) -> str:
        return self.target_digest

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        _strip(out)
        if out["turbo"] is None:
            del out["turbo"]
        else:
            _strip(out["turbo"])
            del out["turbo"]["turbo"]
        return out


def _strip(out: dict[str, Any]) -> None:
    out.pop("raw")
    for m in out["manifests"]:
        m.pop("raw")
        m.pop("config")
