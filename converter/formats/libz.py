"""System zlib through ctypes: the inflate calls Python's `zlib` module does not offer.

Python's zlib cannot stop inflate at deflate block boundaries (`Z_BLOCK`), prime the bit buffer
(`inflatePrime`) or set a raw stream's dictionary mid-file, which overlaybd's gzip index needs to be
built and read (turbooci reference §3.4–3.5). ctypes releases the GIL during each foreign call.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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


class ZStream(ctypes.Structure):
    """zlib.h's z_stream (uInt = unsigned int, uLong = unsigned long, pointers as void *)."""

    _fields_ = [("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
                ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
                ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
                ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
                ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong)]


def _load_libz() -> ctypes.CDLL:
    name = ctypes.util.find_library("z") or "libz.so.1"
    lib = ctypes.CDLL(name)
    zp = ctypes.POINTER(ZStream)
    for fn, args in (("inflateInit2_", [zp, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
                     ("inflate", [zp, ctypes.c_int]), ("inflateEnd", [zp]),
                     ("inflatePrime", [zp, ctypes.c_int, ctypes.c_int]),
                     ("inflateSetDictionary", [zp, ctypes.c_void_p, ctypes.c_uint])):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    lib.zlibVersion.restype = ctypes.c_char_p
    return lib


_libz: ctypes.CDLL | None = None


def libz() -> ctypes.CDLL:
    """The system libz, loaded on first use (importing this module has no side effects)."""
    global _libz
    if _libz is None:
        _libz = _load_libz()
    return _libz


class Inflater:
    """One z_stream: init, inflate into caller buffers, end. Input is kept alive by this object."""

    def __init__(self, wbits: int, what: str) -> None:
        self._lib = libz()
        self.what = what
        self.strm = ZStream()
        self._ref = ctypes.byref(self.strm)
        self._input: BytesLike = b""
        rc = self._lib.inflateInit2_(self._ref, wbits, self._lib.zlibVersion(), ctypes.sizeof(ZStream))
        if rc != Z_OK:
            raise FormatError(f"{what}: zlib inflateInit2 failed ({rc})")
        self._open = True

    def feed(self, data: bytes) -> None:
        self._input = data  # bytes: c_char_p gives its buffer address without a copy
        self.strm.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p)
        self.strm.avail_in = len(data)

    def inflate(self, out_addr: int, room: int, flush: int) -> int:
        self.strm.next_out = out_addr
        self.strm.avail_out = room
        rc: int = self._lib.inflate(self._ref, flush)
        if rc not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            msg = self.strm.msg.decode("ascii", "replace") if self.strm.msg else f"zlib error {rc}"
            raise FormatError(f"{self.what}: corrupt deflate data at compressed byte "
                              f"~{self.strm.total_in}: {msg}")
        return rc

    def prime(self, bits: int, value: int) -> None:
        if self._lib.inflatePrime(self._ref, bits, value) != Z_OK:
            raise FormatError(f"{self.what}: zlib inflatePrime failed")

    def set_dictionary(self, window: bytes) -> None:
        if self._lib.inflateSetDictionary(self._ref, ctypes.c_char_p(window), len(window)) != Z_OK:
            raise FormatError(f"{self.what}: zlib inflateSetDictionary failed")

    def close(self) -> None:
        if self._open:
            self._open = False
            self._lib.inflateEnd(self._ref)

    def __del__(self) -> None:
        self.close()
