"""Shape checks of the JSON we read: manifests, indexes, descriptors, configs and a layout's index.json.

Everything that comes from a registry or a layout is data, and bad data must give a one-line permanent
error (ImageError) naming the document and the field, never an AttributeError or TypeError deep in the
pipeline (the webhook would take those for transient and retry them for hours). Each check runs once,
right after json.loads; code after it may use the fields it checked without further isinstance tests.

Only what we use is checked, with the types the OCI image spec gives: a descriptor's mediaType (string),
digest (algorithm:hex) and size (non-negative integer), annotations (string to string), platform (strings),
a manifest's config and layers, an index's manifests, a config's rootfs.diff_ids.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import MAX_NAME, ImageError, shorten
from .registry.reference import DIGEST_RE


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _fail(where: str, path: str, problem: str) -> ImageError:
    return ImageError(f"{where}: {path} {problem}")


def load_json_object(raw: bytes, where: str, what: str) -> dict[str, Any]:
    """`raw` parsed as a JSON object, or an ImageError saying why not."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{where}: {what} is not valid JSON: {shorten(str(exc), MAX_NAME)}") from None
    if not isinstance(value, dict):
        raise ImageError(f"{where}: {what} is {_kind(value)}, not a JSON object")
    return value


def check_string_map(value: object, where: str, path: str) -> None:
    if not isinstance(value, dict):
        raise _fail(where, path, f"is {_kind(value)}, expected an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _fail(where, f"{path}[{shorten(key, 200)!r}]", f"is {_kind(item)}, expected a string")


def check_descriptor(desc: object, where: str, path: str) -> None:
    """An OCI content descriptor: mediaType, digest and size (and annotations, platform, urls if present)."""
    if not isinstance(desc, dict):
        raise _fail(where, path, f"is {_kind(desc)}, expected a descriptor object")
    media_type = desc.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise _fail(where, f"{path}.mediaType", f"is {_kind(media_type)}, expected a string")
    digest = desc.get("digest")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        shown = repr(shorten(digest, 100)) if isinstance(digest, str) else _kind(digest)
        raise _fail(where, f"{path}.digest", f"is {shown}, expected a sha256 or sha512 digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _fail(where, f"{path}.size", f"is {_kind(size) if not isinstance(size, int) else size}, expected a "
                                           "non-negative integer")
    if "annotations" in desc:
        check_string_map(desc["annotations"], where, f"{path}.annotations")
    if "platform" in desc:
        platform = desc["platform"]
        if not isinstance(platform, dict):
            raise _fail(where, f"{path}.platform", f"is {_kind(platform)}, expected an object")
        for key in ("os", "architecture", "variant", "os.version"):
            if key in platform and not isinstance(platform[key], str):
                raise _fail(where, f"{path}.platform.{key}", f"is {_kind(platform[key])}, expected a string")
    if "urls" in desc and not (isinstance(desc["urls"], list) and all(isinstance(u, str) for u in desc["urls"])):
        raise _fail(where, f"{path}.urls", "is not a list of strings")


def _check_common(doc: dict[str, Any], where: str, what: str) -> None:
    for key in ("mediaType", "artifactType"):
        if key in doc and not isinstance(doc[key], str):
            raise _fail(where, f"{what} {key}", f"is {_kind(doc[key])}, expected a string")
    if "annotations" in doc:
        check_string_map(doc["annotations"], where, f"{what} annotations")
    if "subject" in doc:
        check_descriptor(doc["subject"], where, f"{what} subject")


def check_manifest(doc: dict[str, Any], where: str) -> None:
    """An image manifest (or an artifact manifest: config and layers are checked when present)."""
    _check_common(doc, where, "manifest")
    if "config" in doc:
        check_descriptor(doc["config"], where, "manifest config")
    if "layers" in doc:
        layers = doc["layers"]
        if not isinstance(layers, list):
            raise _fail(where, "manifest layers", f"is {_kind(layers)}, expected a list of descriptors")
        for k, layer in enumerate(layers):
            check_descriptor(layer, where, f"manifest layers[{k}]")


def check_index(doc: dict[str, Any], where: str, what: str = "index") -> None:
    """An image index or Docker manifest list (also a layout's index.json)."""
    _check_common(doc, where, what)
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise _fail(where, f"{what} manifests", f"is {_kind(manifests)}, expected a list of descriptors")
    for k, desc in enumerate(manifests):
        check_descriptor(desc, where, f"{what} manifests[{k}]")


def check_config(doc: dict[str, Any], where: str) -> list[str]:
    """An image config's rootfs.diff_ids (the only part the conversion reads), returned."""
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise _fail(where, "config rootfs", f"is {_kind(rootfs)}, expected an object")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise _fail(where, "config rootfs.diff_ids", f"is {_kind(diff_ids)}, expected a list of digests")
    for k, diff_id in enumerate(diff_ids):
        if not isinstance(diff_id, str) or not DIGEST_RE.fullmatch(diff_id):
            shown = repr(shorten(diff_id, 100)) if isinstance(diff_id, str) else _kind(diff_id)
            raise _fail(where, f"config rootfs.diff_ids[{k}]", f"is {shown}, expected a sha256 or sha512 digest")
    return diff_ids
