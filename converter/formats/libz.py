"""zlib's inflate through ctypes: the calls Python's `zlib` module does not offer.

Python's zlib cannot stop inflate at deflate block boundaries (`Z_BLOCK`), prime the bit buffer
(`inflatePrime`) or set a raw stream's dictionary mid-file, which overlaybd's gzip index needs to be
built and read (turbooci reference §3.4–3.5). ctypes releases the GIL during each foreign call.

Two interchangeable backends:

- "zlib-ng": the inflate of zlib-ng, from the `zlib-ng` package (python-zlib-ng, by the maintainers of
  the `isal` package we use for native conversions). Its extension module links zlib-ng statically and
  exports zlib-ng's native API (`zng_inflate`, …); about 1.5–2x faster than the system zlib here.
- "zlib": the system libz, the library overlaybd's own `create_gz_index` uses.

Block boundaries, their bit offsets and the output are properties of the deflate stream, and zlib-ng's
inflate reports them exactly as zlib's does (`data_type` bits, fewer than 8 bits left in the bit buffer
at a boundary): both backends give byte-identical indexes (tests/test_gzindex.py checks both). The
preferred backend is zlib-ng; the system libz is the fallback when the package or its symbols are missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import Any

from .common import BytesLike, FormatError

Z_NO_FLUSH = 0
Z_BLOCK = 5
Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5
WBITS_GZIP_OR_ZLIB = 47  # 15 + 32: auto-detect, what create_gz_index passes
WBITS_RAW = -15
DATA_TYPE_BOUNDARY = 128  # inflate stopped at a block boundary (or right after the gzip header)
DATA_TYPE_LAST = 64  # ... inside the final block
DATA_TYPE_BITS = 7
BACKENDS = ("zlib-ng", "zlib")


class ZStream(ctypes.Structure):
    """zlib.h's z_stream (uInt = unsigned int, uLong = unsigned long, pointers as void *)."""

    _fields_ = [("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
                ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
                ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
                ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
                ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong)]


class ZngStream(ctypes.Structure):
    """zlib-ng.h's zng_stream (uint32_t counts, size_t totals, uint32_t adler)."""

    _fields_ = [("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint32), ("total_in", ctypes.c_size_t),
                ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint32), ("total_out", ctypes.c_size_t),
                ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
                ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
                ("adler", ctypes.c_uint32), ("reserved", ctypes.c_ulong)]


@dataclass(frozen=True)
class Backend:
    name: str
    version: str
    stream: type[ctypes.Structure]
    init2: Any  # (strm, window_bits) -> int
    inflate: Any  # (strm, flush) -> int
    end: Any
    prime: Any  # (strm, bits, value)
    set_dictionary: Any  # (strm, dictionary, length)


def _load_zlib_ng() -> Backend:
    from zlib_ng import zlib_ng  # the extension module: zlib-ng linked in, its API exported

    lib = ctypes.CDLL(zlib_ng.__file__)
    sp = ctypes.POINTER(ZngStream)
    i32 = ctypes.c_int32
    table = {"zng_inflateInit2": [sp, i32], "zng_inflate": [sp, i32], "zng_inflateEnd": [sp],
             "zng_inflatePrime": [sp, i32, i32], "zng_inflateSetDictionary": [sp, ctypes.c_void_p, ctypes.c_uint32]}
    for fn, args in table.items():
        getattr(lib, fn).argtypes = args  # AttributeError when a build stops exporting them: fall back
        getattr(lib, fn).restype = i32
    lib.zlibng_version.restype = ctypes.c_char_p
    return Backend("zlib-ng", lib.zlibng_version().decode(), ZngStream, lib.zng_inflateInit2, lib.zng_inflate,
                   lib.zng_inflateEnd, lib.zng_inflatePrime, lib.zng_inflateSetDictionary)


def _load_zlib() -> Backend:
    lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    sp = ctypes.POINTER(ZStream)
    table = {"inflateInit2_": [sp, ctypes.c_int, ctypes.c_char_p, ctypes.c_int], "inflate": [sp, ctypes.c_int],
             "inflateEnd": [sp], "inflatePrime": [sp, ctypes.c_int, ctypes.c_int],
             "inflateSetDictionary": [sp, ctypes.c_void_p, ctypes.c_uint]}
    for fn, args in table.items():
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    lib.zlibVersion.restype = ctypes.c_char_p
    version = lib.zlibVersion()

    def init2(strm: Any, wbits: int) -> int:
        return int(lib.inflateInit2_(strm, wbits, version, ctypes.sizeof(ZStream)))

    return Backend("zlib", version.decode(), ZStream, init2, lib.inflate, lib.inflateEnd, lib.inflatePrime,
                   lib.inflateSetDictionary)


_loaded: dict[str, Backend | Exception] = {}


def backend(name: str | None = None) -> Backend:
    """The backend `name`, or the preferred one available; loaded on first use (no import-time work)."""
    if name is not None and name not in BACKENDS:
        raise FormatError(f"inflate backend {name!r} is not available: choose one of {BACKENDS}")
    for candidate in (name,) if name else BACKENDS:
        if candidate not in _loaded:
            try:
                _loaded[candidate] = _load_zlib_ng() if candidate == "zlib-ng" else _load_zlib()
            except (ImportError, OSError, AttributeError) as exc:
                _loaded[candidate] = exc
        found = _loaded[candidate]
        if isinstance(found, Backend):
            return found
        if name:
            raise FormatError(f"inflate backend {name!r} is not available: {found}")
    raise FormatError(f"no inflate backend available (tried {', '.join(BACKENDS)})")


class Inflater:
    """One inflate stream: init, inflate into caller memory, end. Input is kept alive by this object."""

    def __init__(self, wbits: int, what: str, *, backend_name: str | None = None) -> None:
        self.api = backend(backend_name)
        self.what = what
        self.strm = self.api.stream()
        self._ref = ctypes.byref(self.strm)
        self._input: BytesLike = b""
        self._open = False
        rc = self.api.init2(self._ref, wbits)
        if rc != Z_OK:
            raise FormatError(f"{what}: {self.api.name} inflateInit2 failed ({rc})")
        self._open = True

    def feed(self, data: bytes) -> None:
        self._input = data  # bytes: c_char_p gives its buffer address without a copy
        self.strm.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p)
        self.strm.avail_in = len(data)

    def inflate(self, out_addr: int, room: int, flush: int) -> int:
        self.strm.next_out = out_addr
        self.strm.avail_out = room
        rc: int = self.api.inflate(self._ref, flush)
        if rc not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            msg = self.strm.msg.decode("ascii", "replace") if self.strm.msg else f"error {rc}"
            raise FormatError(f"{self.what}: corrupt deflate data at compressed byte "
                              f"~{self.strm.total_in}: {msg}")
        return rc

    def prime(self, bits: int, value: int) -> None:
        if self.api.prime(self._ref, bits, value) != Z_OK:
            raise FormatError(f"{self.what}: inflatePrime failed")

    def set_dictionary(self, window: bytes) -> None:
        if self.api.set_dictionary(self._ref, ctypes.c_char_p(window), len(window)) != Z_OK:
            raise FormatError(f"{self.what}: inflateSetDictionary failed")

    def close(self) -> None:
        if self._open:
            self._open = False
            self.api.end(self._ref)

    def __del__(self) -> None:
        self.close()
