"""Independent judges for built filesystems: the expected tree of an OCI image computed straight from
its layer tars (with Python's tarfile and path-string bookkeeping, sharing no code with the builder),
and the tree as e2fsck, debugfs and the kernel's own ext4 driver see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

HASH_LIMIT = 64 << 20  # files larger than this are compared by size and sampled reads, not hashed


@dataclass
class Node:
    kind: str  # file dir symlink char block fifo
    mode: int  # permission bits, 0o7777
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int | None = None  # regular files
    sha256: str | None = None  # regular files up to HASH_LIMIT
    target: bytes | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # devices
    xattrs: dict[str, bytes] = field(default_factory=dict)


Tree = dict[str, Node]  # "/a/b" -> node; hardlinked paths share one Node object


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Expected tree from layer tars (OCI semantics, containerd-style)


def _clean(name: str) -> list[str]:
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        parts.append(comp)
    return parts


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


class ExpectedImage:
    def __init__(self) -> None:
        self.tree: Tree = {"/": Node("dir", 0o755)}

    def _resolve_parent(self, parts: list[str], added: set[str]) -> list[str]:
        """Follow symlinks in parent components inside the root; create missing directories."""
        out: list[str] = []
        pending = list(parts)
        follows = 0
        while pending:
            comp = pending.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if out:
                    out.pop()
                continue
            path = _join([*out, comp])
            node = self.tree.get(path)
            if node is not None and node.kind == "symlink":
                follows += 1
                assert follows < 256
                target = node.target.decode("utf-8", "surrogateescape")
                if target.startswith("/"):
                    out = []
                pending = target.split("/") + pending
                continue
            if node is None:
                self.tree[path] = Node("dir", 0o755)
            out.append(comp)
            added.add(path)
        return out

    def _remove(self, path: str, keep: set[str], *, children_only: bool = False) -> None:
        node = self.tree.get(path)
        if node is None:
            return
        if not children_only and path not in keep:
            del self.tree[path]
        if node.kind == "dir":
            prefix = path.rstrip("/") + "/"
            for p in [p for p in self.tree if p.startswith(prefix) and p not in keep]:
                del self.tree[p]

    def apply(self, layer: bytes) -> None:
        added: set[str] = set()
        if layer.startswith(b"\x28\xb5\x2f\xfd"):  # tarfile has no zstd support before Python 3.14
            import zstandard

            layer = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(layer)).read()
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tf:
            for m in tf:
                parts = _clean(m.name)
                if not parts:
                    if m.isdir():
                        self._set_meta(self.tree["/"], m)
                    continue
                parent = self._resolve_parent(parts[:-1], added)
                base = parts[-1]
                path = _join([*parent, base])
                if base == ".wh..wh..opq":
                    prefix = _join(parent).rstrip("/") + "/"
                    for p in [p for p in self.tree if p.startswith(prefix) and p not in added]:
                        del self.tree[p]
                    continue
                if base.startswith(".wh."):
                    if base.startswith(".wh..wh."):
                        continue
                    victim = _join([*parent, base[4:]])
                    self._remove(victim, added, children_only=victim in added)
                    continue
                existing = self.tree.get(path)
                if m.isdir():
                    if existing is not None and existing.kind == "dir":
                        self._set_meta(existing, m)
                    else:
                        self._remove(path, set())
                        self.tree[path] = self._set_meta(Node("dir", 0), m)
                elif m.islnk():
                    target = _join(_clean(m.linkname))
                    node = self.tree[target]
                    if existing is not node:
                        self._remove(path, set())
                        self.tree[path] = node
                    self._set_meta(node, m)  # overlaybd semantics: the link header's metadata wins
                else:
                    self._remove(path, set())
                    self.tree[path] = self._new_node(tf, m)
                added.add(path)

    @staticmethod
    def _set_meta(node: Node, m: tarfile.TarInfo) -> Node:
        if node.kind != "symlink":
            node.mode = m.mode & 0o7777
        node.uid, node.gid = m.uid, m.gid
        raw = m.pax_headers.get("mtime")
        if raw is not None:
            whole, _, frac = raw.partition(".")
            node.mtime_ns = int(whole) * 10**9 + int((frac + "000000000")[:9] or 0)
        else:
            node.mtime_ns = int(m.mtime) * 10**9
        node.xattrs = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        return node

    def _new_node(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> Node:
        if m.isreg():
            node = self._set_meta(Node("file", 0), m)
            node.size = m.size
            if m.size <= HASH_LIMIT:
                f = tf.extractfile(m)
                assert f is not None
                node.sha256 = _digest(f.read())
            return node
        if m.issym():
            node = self._set_meta(Node("symlink", 0o777), m)
            node.target = m.linkname.encode("utf-8", "surrogateescape")
            return node
        if m.ischr() or m.isblk():
            node = self._set_meta(Node("char" if m.ischr() else "block", 0), m)
            node.rdev = (m.devmajor, m.devminor)
            return node
        if m.isfifo():
            return self._set_meta(Node("fifo", 0), m)
        raise AssertionError(f"unexpected member type {m.type!r}")


def expected_tree(layers: list[bytes]) -> Tree:
    image = ExpectedImage()
    for layer in layers:
        image.apply(layer)
    return image.tree


# --------------------------------------------------------------------------------------------------
# What the real tools see


def e2fsck(disk: Path) -> str:
    """Run `e2fsck -fn`; assert exit 0 and no complaint. Returns the summary output."""
    proc = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert proc.returncode == 0, f"e2fsck exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    noise = [line for line in proc.stdout.splitlines() if not line.startswith(("Pass ", str(disk)))]
    assert not noise, "e2fsck reported:\n" + "\n".join(noise)
    return proc.stdout


@contextlib.contextmanager
def mounted(disk: Path) -> Iterator[Path]:
    """Loop-mount read-only through the kernel's ext4 driver (root only)."""
    with tempfile.TemporaryDirectory(prefix="obd-mnt-") as mnt:
        subprocess.run(["mount", "-t", "ext4", "-o", "loop,ro,noload", str(disk), mnt], check=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)


def can_mount() -> bool:
    return os.geteuid() == 0 and Path("/dev/loop-control").exists()


def kernel_tree(root: Path, *, skip: tuple[str, ...] = ("/lost+found",)) -> Tree:
    """The tree read through the mounted filesystem; hardlinks share Node objects by inode."""
    tree: Tree = {}
    by_inode: dict[int, Node] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            full = Path(dirpath) / name if name != "." else Path(dirpath)
            rel = "/" + os.path.relpath(full, root) if full != root else "/"
            rel = rel.replace("/./", "/") if rel != "/." else "/"
            if name == "." and full != root:
                continue
            if rel in skip or any(rel.startswith(s + "/") for s in skip):
                continue
            st = os.lstat(full)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and st.st_ino in by_inode:
                tree[rel] = by_inode[st.st_ino]
                continue
            node = _node_from_stat(full, st)
            by_inode[st.st_ino] = node
            tree[rel] = node
        dirnames[:] = [d for d in dirnames if "/" + os.path.relpath(Path(dirpath) / d, root) not in skip]
    return tree


def _node_from_stat(path: Path, st: os.stat_result) -> Node:
    mode = st.st_mode
    kind = (
        "dir"
        if stat.S_ISDIR(mode)
        else "file"
        if stat.S_ISREG(mode)
        else "symlink"
        if stat.S_ISLNK(mode)
        else "char"
        if stat.S_ISCHR(mode)
        else "block"
        if stat.S_ISBLK(mode)
        else "fifo"
    )
    node = Node(kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    node.xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    if kind == "file":
        node.size = st.st_size
        if st.st_size <= HASH_LIMIT:
            node.sha256 = _digest(path.read_bytes())
    elif kind == "symlink":
        node.target = os.fsencode(os.readlink(path))
    elif kind in ("char", "block"):
        node.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return node


def debugfs_tree(disk: Path, *, skip: tuple[str, ...] = ("/lost+found",)) -> Tree:
    """Types, modes, owners and sizes from `debugfs ls -p`, contents and symlink targets from `rdump`.

    debugfs does not report xattrs, device numbers or nanosecond times in these listings; the kernel
    judge covers those. Hardlinks share Node objects by inode number.
    """
    listing: dict[str, tuple[int, int, int, int, str]] = {}
    level = ["/"]
    while level:
        script = "".join(f'ls -p "{d}"\n' for d in level)
        out = subprocess.run(
            ["debugfs", "-f", "-", str(disk)], input=script.encode(), capture_output=True, check=True
        ).stdout
        current = None
        nxt = []
        for raw_line in out.split(b"\n"):
            if raw_line.startswith(b"debugfs: ls -p "):
                current = raw_line[len(b"debugfs: ls -p ") :].decode("utf-8", "surrogateescape").strip('"')
                continue
            if not raw_line.startswith(b"/") or current is None:
                continue
            fields = raw_line.split(b"/")
            # debugfs prints ids as signed 32-bit numbers
            ino, mode = int(fields[1]), int(fields[2], 8)
            uid, gid = int(fields[3]) & 0xFFFFFFFF, int(fields[4]) & 0xFFFFFFFF
            name = b"/".join(fields[5:-2]).decode("utf-8", "surrogateescape")
            size = fields[-2].decode()
            if ino == 0:  # htree index blocks look like one empty entry to a linear reader
                continue
            if name == "." and current == "/":
                listing["/"] = (ino, mode, uid, gid, size)
            if name in (".", ".."):
                continue
            path = (current.rstrip("/") + "/" + name) if current != "/" else "/" + name
            if path in skip:
                continue
            listing[path] = (ino, mode, uid, gid, size)
            if stat.S_ISDIR(mode):
                nxt.append(path)
        level = nxt
    tree: Tree = {}
    by_inode: dict[int, Node] = {}
    with tempfile.TemporaryDirectory(prefix="obd-rdump-") as out_dir:
        subprocess.run(["debugfs", "-R", f"rdump / {out_dir}", str(disk)], capture_output=True, check=True)
        for path, (ino, mode, uid, gid, size) in sorted(listing.items()):
            if ino in by_inode:
                tree[path] = by_inode[ino]
                continue
            kinds = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char"}
            kinds.update({stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"})
            node = Node(kinds[stat.S_IFMT(mode)], stat.S_IMODE(mode), uid, gid)
            dumped = Path(out_dir + path)
            if node.kind == "file":
                node.size = int(size)
                if node.size <= HASH_LIMIT:
                    node.sha256 = _digest(dumped.read_bytes())
            elif node.kind == "symlink":
                node.target = os.fsencode(os.readlink(dumped))
            by_inode[ino] = node
            tree[path] = node
    return tree


# --------------------------------------------------------------------------------------------------
# Comparison


def _link_groups(tree: Tree) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for path, node in tree.items():
        if node.kind != "dir":
            groups.setdefault(id(node), set()).add(path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def assert_same_tree(actual: Tree, expected: Tree, *, fields: tuple[str, ...] | None = None) -> None:
    """Equal paths, equal nodes (optionally only some fields), equal hardlink groups."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"missing paths {missing[:20]}, unexpected paths {extra[:20]}"
    diffs = []
    for path in sorted(expected):
        a, e = actual[path], expected[path]
        if fields is not None:
            keep = {f: getattr(e, f) for f in fields}
            a = replace(Node(a.kind, a.mode), **{f: getattr(a, f) for f in fields})
            e = replace(Node(e.kind, e.mode), **keep)
        if e.kind == "dir":  # directory sizes are the filesystem's business
            a = replace(a, size=None, sha256=None)
        if a != e:
            diffs.append(f"{path}: got {a}, expected {e}")
    assert not diffs, "tree differs:\n" + "\n".join(diffs[:30])
    assert _link_groups(actual) == _link_groups(expected), "hardlink groups differ"
