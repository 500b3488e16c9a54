"""The §1.7/§8 model without a registry: chain IDs and UUIDs against the real convertor's layers, the index
rewrite, options validation and the reuse cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from converter.cache import CachedLayer, LayerCache
from converter.formats.stack import open_layer
from converter.image import (
    DOCKER_LIST,
    OCI_INDEX,
    ConvertedChild,
    chain_ids,
    is_attestation,
    platform_matches,
    rewrite_index,
    uuid_from_chain_id,
)
from converter.options import ConvertOptions, OptionsError
from converter.pipeline import convert
from tests.harness import oci
from tests.test_ext4_build import REAL, needs_vectors


def test_chain_id_and_uuid_by_hand() -> None:
    a, b = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    chain = chain_ids([a, b])
    assert chain[0] == a
    assert chain[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert uuid_from_chain_id("sha256:0123456789abcdef0123456789abcdef" + "f" * 32) == \
        "01234567-89AB-CDEF-0123-456789ABCDEF"


def _real_tars() -> list[bytes]:
    raw = [(REAL / name).read_bytes() for name in ("layer1.tar.gz", "layer2.tar", "layer3.tar.gz")]
    return [gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b for b in raw]


@needs_vectors
def test_uuids_match_the_real_convertor(tmp_path: Path) -> None:
    """Converting the real-tools source layers gives the UUID/parent pairs overlaybd-commit wrote."""
    tars = _real_tars()
    uuids = [uuid_from_chain_id(c) for c in chain_ids([oci.sha256(t) for t in tars])]
    assert uuids == ["185D10DB-2ADB-181A-AF87-E0708BA96AD9", "5CC26DB7-D982-C35F-78B8-965E94452903",
                     "34C46A89-BF1E-BA26-F415-914EBD832669"]
    layers = [oci.Layer(tar=t, compression=c) for t, c in zip(tars, ("gzip", "none", "gzip"), strict=True)]
    built = oci.build_layout(tmp_path / "src", oci.Image(layers), name="real")
    result = convert(f"oci:{built.layout}:real", f"oci:{tmp_path / 'out'}:real_obd",
                     {"use_cache": False, "work_dir": str(tmp_path)})
    ours = [tmp_path / "out" / "blobs" / "sha256" / x.digest[7:] for x in result.manifests[0].layers]
    for k, path in enumerate(ours):
        with open_layer(path) as mine, open_layer(REAL / f"layer{k + 1}.obd.commit") as real:
            assert (mine.uuid, mine.parent_uuid) == (real.uuid, real.parent_uuid)
            assert mine.virtual_size == real.virtual_size == 64 << 30


def test_index_rewrite_keeps_platform_and_annotations() -> None:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "annotations": {"org.example": "kept"},
             "manifests": [{"mediaType": "m", "digest": "sha256:" + "1" * 64, "size": 1,
                            "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                            "annotations": {"child": "kept"}}]}
    child = ConvertedChild(index["manifests"][0], "sha256:" + "2" * 64, 99, "application/x-new")
    out = json.loads(rewrite_index(index, [child], oci=False, annotations={"ours": "1"}))
    assert out["mediaType"] == DOCKER_LIST and "subject" not in out
    assert out["annotations"] == {"org.example": "kept", "ours": "1"}
    assert out["manifests"] == [{"mediaType": "application/x-new", "digest": "sha256:" + "2" * 64, "size": 99,
                                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                                 "annotations": {"child": "kept"}}]


def test_platform_filter_and_attestation_detection() -> None:
    arm = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert platform_matches(arm, ["linux/arm64"]) and platform_matches(arm, ["linux/arm64/v8"])
    assert not platform_matches(arm, ["linux/amd64"]) and not platform_matches(arm, ["linux/arm64/v7"])
    assert platform_matches(arm, [])
    assert is_attestation({"annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
    assert not is_attestation({"platform": arm})


def test_options_from_webhook_mapping_and_validation() -> None:
    opts = ConvertOptions.coerce({"referrer": True, "vsize": 8, "platforms": "linux/amd64",
                                  "registry": {"endpoint": "http://10.0.0.5:5000", "username": "u",
                                               "password": "s3cret-pw", "insecure": True}})
    assert opts.oci and opts.platforms == ("linux/amd64",) and opts.registry_options.endpoint.startswith("http://")
    assert "s3cret-pw" not in repr(opts)  # the password never shows up in logs
    with pytest.raises(OptionsError, match="unknown conversion option"):
        ConvertOptions.coerce({"compression": "gzip"})
    with pytest.raises(OptionsError, match="algorithm 'gzip'"):
        ConvertOptions(algorithm="gzip")
    # byte-shaping options change the cache key; output flavour and work dirs do not
    key = ConvertOptions().bytes_key(None)
    assert ConvertOptions(oci=True, work_dir="/x").bytes_key(None) == key
    assert ConvertOptions(algorithm="zstd").bytes_key(None) != key
    assert ConvertOptions(vsize=8).bytes_key(None) != key


def test_cache_roundtrip_and_forget(tmp_path: Path) -> None:
    with LayerCache(tmp_path) as cache:
        assert cache.get("r", "sha256:c", "o") is None
        cache.put("r", "sha256:c", "o", CachedLayer("sha256:d", 5, "repo"))
        cache.put("r", "sha256:c", "o", CachedLayer("sha256:e", 6, "other"))  # the newest wins
        assert cache.get("r", "sha256:c", "o") == CachedLayer("sha256:e", 6, "other")
        assert cache.get("r2", "sha256:c", "o") is None and cache.get("r", "sha256:c", "o2") is None
        cache.forget("r", "sha256:c", "o")
        assert cache.get("r", "sha256:c", "o") is None


def test_releasing_reader_gives_space_back_behind_the_read_position(tmp_path: Path, monkeypatch) -> None:
    from converter import transport

    monkeypatch.setattr(transport, "RELEASE_STEP", 1 << 20)
    data = os.urandom(8 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    os.fsync(os.open(path, os.O_RDONLY))
    before = path.stat().st_blocks
    released: list[int] = []
    with open(path, "r+b", buffering=0) as f:
        reader = transport.ReleasingReader(f, released.append)
        assert not reader.seekable()  # a lost upload session must not re-read released bytes
        got = b"".join(iter(lambda: reader.read(1 << 20), b""))
    assert got == data
    assert released == [n << 20 for n in range(1, 9)]  # each release reported, in order
    assert path.stat().st_size == len(data)
    assert path.stat().st_blocks * 512 <= before * 512 - (7 << 20)  # released in 1 MiB steps up to the end


def test_temp_budget_waits_for_the_upload_only_when_over() -> None:
    import threading
    import time

    from converter.pipeline import _TempBudget

    cancel = threading.Event()
    budget = _TempBudget(cancel.is_set)
    budget.wait_for_room(10 << 30)  # no upload running: never waits
    budget.upload_started(100 << 20)
    budget.released(60 << 20)  # 40 MiB of the previous blob left
    budget.wait_for_room(40 << 20)  # 40 + 16 (margin) + 40 <= 100: room
    assert budget.waited == 0
    threading.Timer(0.3, budget.released, (90 << 20,)).start()
    budget.wait_for_room(60 << 20)  # 60 + 16 + 40 > 100: waits until only 10 are left
    assert 0.2 < budget.waited < 2
    threading.Timer(0.3, budget.upload_finished).start()
    budget.wait_for_room(120 << 20)  # larger than every blob so far: waits for the upload to end
    assert budget.waited > 0.45
    budget.upload_started(10 << 20)
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    budget.wait_for_room(200 << 20)  # a cancelled conversion stops waiting
    assert time.monotonic() - started < 2



def test_budgeted_sink_checks_before_the_first_write(tmp_path: Path) -> None:
    """A layer smaller than the check interval must still wait while the previous blob is all on disk."""
    import threading

    from converter.formats.layer import LayerBlobWriter
    from converter.pipeline import _BudgetedSink, _TempBudget

    budget = _TempBudget(lambda: False)
    budget.upload_started(10 << 20)
    threading.Timer(0.3, budget.upload_finished).start()
    with LayerBlobWriter(tmp_path / "small.obd", virtual_size=1 << 30) as writer:
        _BudgetedSink(writer, budget).write(0, bytes(4096))
    assert budget.waited > 0.2
