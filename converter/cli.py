"""`obd-convert`: inspect and dump overlaybd layer blobs; image conversion is wired in by convert_main()."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from .formats.common import FormatError
from .formats.layer import sha256_file
from .formats.lsmt import LsmtHeaderTrailer, LsmtLayer
from .formats.stack import StackedReader, open_layer
from .formats.zfile import ZFileHeaderTrailer

SUBCOMMANDS = ("inspect", "dump")


def convert_main(argv: list[str]) -> int:
    """Image conversion entry point (flags of the reference convertor); not part of this build yet."""
    print("image conversion is not available in this build yet", file=sys.stderr)
    return 2


def _lsmt_ht(ht: LsmtHeaderTrailer) -> dict[str, Any]:
    d = dataclasses.asdict(ht)
    d["flags"] = f"{ht.flags:#x}"
    d["user_tag"] = ht.user_tag.decode("utf-8", "replace")
    d["magic0"], d["magic1"] = ht.magic0.hex(), ht.magic1.hex()
    return d


def _zfile_ht(ht: ZFileHeaderTrailer | None) -> dict[str, Any] | None:
    if ht is None:
        return None
    d = dataclasses.asdict(ht)
    d["flags"] = f"{ht.flags:#x}"
    d["digest"], d["index_crc"] = f"{ht.digest:#010x}", f"{ht.index_crc:#010x}"
    d["magic0"], d["magic1"] = ht.magic0.hex(), ht.magic1.hex()
    return d


def describe_layer(layer: LsmtLayer, *, verify_blocks: bool) -> dict[str, Any]:
    """Everything `inspect` reports about one opened (and therefore already validated) layer."""
    checks = ["tar wrapper", "LSMT header/trailer magics and flags", "LSMT index bounds",
              "LSMT index sorted and non-overlapping", "LSMT moffset ranges"]
    zfile_info = None
    if layer.zfile is not None:
        zf = layer.zfile
        checks += [f"ZFile {zf.info_source} digest/flags", "ZFile index_crc and jump table constraints"]
        if verify_blocks:
            zf.verify_all_blocks()
            checks.append(f"all {zf.blocks} ZFile block CRCs and decompression")
        zfile_info = {"info_source": zf.info_source, "blocks": zf.blocks,
                      "header": _zfile_ht(zf.header), "trailer": _zfile_ht(zf.trailer)}
    data = [i for i in range(len(layer)) if not layer.zeroed[i]]
    data_sectors = sum(layer.lengths[i] for i in data)
    index = {
        "entries": len(layer),
        "padding_entries": layer.padding_entries,
        "data_entries": len(data),
        "zeroed_entries": len(layer) - len(data),
        "data_bytes": data_sectors * 512,
        "zeroed_bytes": (sum(layer.lengths) - data_sectors) * 512,
        "max_entry_sectors": max(layer.lengths, default=0),
        "first_lba": layer.offsets[0] if len(layer) else None,
        "end_lba": layer.offsets[-1] + layer.lengths[-1] if len(layer) else None,
    }
    wrapper = dataclasses.asdict(layer.wrapper) if layer.wrapper is not None else None
    return {"tar": wrapper, "zfile": zfile_info, "lsmt": {"size": layer.size, "header": _lsmt_ht(layer.header),
            "trailer": _lsmt_ht(layer.trailer), "index": index}, "checks_passed": checks}


def _inspect(args: argparse.Namespace) -> int:
    results, status = [], 0
    for path in args.blobs:
        entry: dict[str, Any] = {"path": path}
        try:
            entry["size"] = os.path.getsize(path)
            with open(path, "rb") as f:
                entry["digest"] = sha256_file(f.fileno())
            with open_layer(path, verify_blocks=not args.no_verify) as layer:
                entry.update(describe_layer(layer, verify_blocks=not args.no_verify))
            entry["ok"] = True
        except (FormatError, OSError) as exc:
            entry.update(ok=False, error=str(exc))
            status = 1
        results.append(entry)
    json.dump(results, sys.stdout, indent=2)
    print()
    return status


def _dump(args: argparse.Namespace) -> int:
    try:
        with StackedReader(args.blobs, verify_blocks=not args.no_verify) as stack:
            stack.materialize(args.output)
            print(json.dumps({"output": args.output, "virtual_size": stack.virtual_size,
                              "layers": len(stack.layers)}))
    except (FormatError, OSError) as exc:
        print(f"obd-convert dump: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obd-convert", description="overlaybd layer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="decode and validate layer blobs, print JSON")
    p.add_argument("blobs", nargs="+", metavar="BLOB")
    p.add_argument("--no-verify", action="store_true", help="skip the per-block ZFile CRC pass")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("dump", help="materialise a stack of layer blobs (bottom to top) as a sparse raw disk")
    p.add_argument("--output", "-o", required=True, help="raw disk file to write")
    p.add_argument("blobs", nargs="+", metavar="BLOB")
    p.add_argument("--no-verify", action="store_true", help="do not check ZFile block CRCs while reading")
    p.set_defaults(func=_dump)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in (*SUBCOMMANDS, "-h", "--help"):
        return convert_main(args)
    ns = build_parser().parse_args(args)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
