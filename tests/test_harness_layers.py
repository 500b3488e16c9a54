"""The layer-tar builder, read back by Python's tarfile and by GNU tar."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile

import pytest
import zstandard

from tests.harness import layers as L

# A valid VFS_CAP_REVISION_2 value (cap_net_bind_service, effective): bytes that are not UTF-8.
CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")
BINARY = bytes(range(256))
LONG = "deep/" * 30 + "name.txt"


def sample_entries() -> list[L.Entry]:
    return [
        L.dir("etc", mode=0o750, uid=1, gid=2, mtime=1_700_000_000),
        L.file("etc/hosts", b"127.0.0.1 localhost\n", uname="root", gname="root"),
        L.file("bin/ping", b"\x7fELF", mode=0o4755, xattrs={"security.capability": CAPABILITY}),
        L.file("big-ids", b"x", uid=3_000_000, gid=2_097_152, mtime=1.5),
        L.file("user-bin", xattrs={"user.blob": BINARY, "user.text": "ünï".encode()}),
        L.file(LONG, b"long"),
        L.symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        L.hardlink("bin/ping6", "bin/ping"),
        L.char("dev/null", 1, 3, mode=0o666),
        L.block("dev/loop0", 7, 0, mode=0o660),
        L.fifo("run/fifo"),
        L.whiteout("var/old"),
        L.opaque("var/cache/"),
    ]


def test_pax_round_trip_through_tarfile() -> None:
    with tarfile.open(fileobj=io.BytesIO(L.make_tar(sample_entries()))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        expected = [e.path.rstrip("/") for e in sample_entries()]
        assert list(members) == [*expected[:11], "var/.wh.old", "var/cache/.wh..wh..opq"]
        etc = members["etc"]
        assert (etc.type, etc.mode, etc.uid, etc.gid) == (tarfile.DIRTYPE, 0o750, 1, 2)
        assert etc.mtime == 1_700_000_000
        hosts = members["etc/hosts"]
        assert tar.extractfile(hosts).read() == b"127.0.0.1 localhost\n"
        assert (hosts.mode, hosts.uname, hosts.gname) == (0o644, "root", "root")
        ping = members["bin/ping"]
        assert ping.mode == 0o4755
        raw = ping.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
        assert raw == CAPABILITY
        ids = members["big-ids"]
        assert (ids.uid, ids.gid, ids.mtime) == (3_000_000, 2_097_152, 1.5)
        assert ids.pax_headers["uid"] == "3000000" and ids.pax_headers["mtime"] == "1.5"
        user = members["user-bin"].pax_headers
        assert user["SCHILY.xattr.user.blob"].encode("utf-8", "surrogateescape") == BINARY
        assert user["SCHILY.xattr.user.text"] == "ünï"
        assert "hdrcharset" not in user
        assert tar.extractfile(members[LONG]).read() == b"long"
        link = members["etc/localtime"]
        assert link.issym() and link.linkname == "/usr/share/zoneinfo/UTC" and link.mode == 0o777
        assert members["bin/ping6"].islnk() and members["bin/ping6"].linkname == "bin/ping"
        assert (members["dev/null"].ischr(), members["dev/null"].devmajor, members["dev/null"].devminor) == (
            True, 1, 3)
        assert members["dev/loop0"].isblk() and members["dev/loop0"].devmajor == 7
        assert members["run/fifo"].isfifo()
        assert members["var/.wh.old"].size == 0


def test_gnu_tar_extracts_everything(tmp_path) -> None:
    archive = tmp_path / "layer.tar"
    archive.write_bytes(L.make_tar(sample_entries()))
    out = tmp_path / "root"
    out.mkdir()
    run = subprocess.run(["tar", "-C", out, "--xattrs", "--xattrs-include=*", "--same-owner", "-xf", archive],
                         capture_output=True, text=True, check=True)
    assert run.stderr == ""  # no "unknown keyword" or other warnings
    assert os.getxattr(out / "bin/ping", "security.capability") == CAPABILITY
    assert os.getxattr(out / "user-bin", "user.blob") == BINARY
    st = os.lstat(out / "big-ids")
    assert (st.st_uid, st.st_gid, st.st_mtime) == (3_000_000, 2_097_152, 1.5)
    assert os.stat(out / "bin/ping").st_ino == os.stat(out / "bin/ping6").st_ino
    assert os.readlink(out / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.stat(out / "dev/null").st_rdev == os.makedev(1, 3)
    assert (out / LONG).read_bytes() == b"long"
    listing = subprocess.run(["tar", "-tvf", archive], capture_output=True, text=True, check=True).stdout
    assert "-rwsr-xr-x 0/0" in listing and "brw-rw---- 0/0             7,0" in listing


def test_output_is_deterministic() -> None:
    first = L.make_tar(sample_entries())
    assert first == L.make_tar(sample_entries())
    assert len(first) % tarfile.RECORDSIZE == 0
    for algo in ("gzip", "zstd", "none"):
        assert L.compress(first, algo) == L.compress(first, algo)
    assert gzip.decompress(L.compress(first, "gzip")) == first
    assert L.compress(first, "gzip")[4:8] == b"\0\0\0\0"  # gzip header mtime
    assert zstandard.ZstdDecompressor().decompress(L.compress(first, "zstd")) == first
    assert L.compress(first, "none") == first


@pytest.mark.parametrize("fmt", ["gnu", "ustar"])
def test_other_formats(fmt: str) -> None:
    entries = [L.dir("a"), L.file("a/b", b"data", uid=1000), L.symlink("a/c", "b")]
    if fmt == "gnu":
        entries.append(L.file(LONG, b"gnu long name"))
    with tarfile.open(fileobj=io.BytesIO(L.make_tar(entries, format=fmt))) as tar:
        assert tar.getmembers()[0].pax_headers == {}
        assert tar.extractfile("a/b").read() == b"data"
        if fmt == "gnu":
            assert tar.extractfile(LONG).read() == b"gnu long name"


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"'x'.*xattrs need the 'pax' format"):
        L.make_tar([L.file("x", xattrs={"user.a": b"1"})], format="ustar")
    with pytest.raises(ValueError, match="unknown kind 'socket'"):
        L.Entry("s", "socket")
    with pytest.raises(ValueError, match="only 'file' entries carry data"):
        L.Entry("d", "dir", data=b"x")
    with pytest.raises(ValueError, match="unknown compression 'lzma'"):
        L.compress(b"", "lzma")


def test_sparse_file_over_4gib(tmp_path) -> None:
    size = 5 * 2**30
    data_at = {0: b"head", 4096: b"x" * 1000, 10_000: b"y", size - 3: b"end"}
    archive = L.sparse_file_tar("big/sparse.img", size, data_at)
    assert len(archive) < 16 * 1024
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.getmember("big/sparse.img")
        assert member.size == size
        stream = tar.extractfile(member)
        for offset, data in data_at.items():
            stream.seek(offset)
            assert stream.read(len(data)) == data
        stream.seek(6000)
        assert stream.read(16) == bytes(16)

    path = tmp_path / "s.tar"
    path.write_bytes(archive)
    listing = subprocess.run(["tar", "-tvf", path], capture_output=True, text=True, check=True).stdout
    assert f" {size} " in listing and listing.rstrip().endswith("big/sparse.img")
    subprocess.run(["tar", "-C", tmp_path, "-xf", path], check=True)
    extracted = tmp_path / "big/sparse.img"
    st = extracted.stat()
    assert st.st_size == size and st.st_blocks * 512 < 1024 * 1024  # the holes stayed holes
    with open(extracted, "rb") as f:
        for offset, data in data_at.items():
            f.seek(offset)
            assert f.read(len(data)) == data


def test_sparse_trailing_hole_and_merging() -> None:
    # Regions closer than a block are merged; a trailing hole still yields the full size.
    archive = L.sparse_file_tar("f", 1 << 20, {0: b"a", 100: b"b"})
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.getmember("f")
        assert member.size == 1 << 20
        assert member.sparse == [(0, 101), (1 << 20, 0)]
        data = tar.extractfile(member).read()
        assert data[0:1] == b"a" and data[100:101] == b"b" and len(data) == 1 << 20
    with pytest.raises(ValueError, match="outside the file size"):
        L.sparse_file_tar("f", 10, {8: b"abc"})
