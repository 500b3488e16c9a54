"""`obd-convert`: convert images (convert_main, the default command), inspect and dump overlaybd layer blobs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from .formats.common import FormatError
from .formats.gzindex import GZ_INDEX_MAGIC, GzipIndex
from .formats.layer import sha256_file
from .formats.lsmt import LsmtHeaderTrailer, LsmtLayer
from .formats.stack import StackedReader, open_any, open_layer
from .formats.turbo import TurboLayerSpec, describe_turbo_blob, open_turbo_meta
from .formats.zfile import ZFileHeaderTrailer

SUBCOMMANDS = ("inspect", "dump")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _cert_pair(text: str) -> tuple[str, str]:
    cert, sep, key = text.partition(":")
    if not sep or not cert or not key:
        raise argparse.ArgumentTypeError(f"expected CERT:KEY, got {text!r}")
    return cert, key


def build_convert_parser() -> argparse.ArgumentParser:
    """Flags of the reference userspace convertor, plus ours (see docs/pipeline.md)."""
    p = argparse.ArgumentParser(
        prog="obd-convert",
        description="Convert an OCI/Docker image into overlaybd format and push it back. "
                    "Other commands: `obd-convert inspect BLOB...`, `obd-convert dump -o DISK BLOB...`.")
    src = p.add_argument_group("source and target")
    src.add_argument("-r", "--repository", help="source repository, e.g. registry.example.com:5000/library/app")
    src.add_argument("-i", "--input-tag", help="source tag")
    src.add_argument("-g", "--input-digest", help="source digest (instead of a tag)")
    src.add_argument("-o", "--output-tag", "--overlaybd", dest="output_tag",
                     help="tag to push the overlaybd image as (default: <input-tag>_obd)")
    src.add_argument("--turboOCI", "--fastoci", dest="turbo_oci", metavar="TAG",
                     help="build a TurboOCIv1 image (meta layers over the original blobs) tagged TAG; alone: only "
                          "that image; with -o/--overlaybd: both images from one pass over the layers")
    src.add_argument("--output-repository", help="push into this repository instead of --repository "
                     "(same registry, or a full reference host/repo)")
    src.add_argument("--input", metavar="REF", help="source as a reference or oci:PATH[:TAG] (instead of -r/-i/-g)")
    src.add_argument("--output", metavar="REF", help="target as a reference or oci:PATH[:TAG]")
    reg = p.add_argument_group("registry access")
    reg.add_argument("-u", "--username", metavar="USER[:PASSWORD]", help="registry credentials")
    reg.add_argument("--plain", action="store_true", help="plain HTTP to the registry")
    reg.add_argument("--insecure", action="store_true", help="do not verify the registry's TLS certificate")
    reg.add_argument("--cert-dir", help="directory with CA certificates (*.crt) and client certificates")
    reg.add_argument("--root-ca", help="additional CA certificate file")
    reg.add_argument("--client-cert", type=_cert_pair, metavar="CERT:KEY", help="TLS client certificate and key")
    conv = p.add_argument_group("conversion")
    conv.add_argument("--oci", action="store_true", help="OCI media types for the output (default Docker)")
    conv.add_argument("--referrer", action="store_true",
                      help="push as a referrer of the source (artifactType + subject); implies --oci")
    conv.add_argument("--mkfs", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                      help="build the filesystem from scratch (default true); --mkfs=false stacks on --base-layer")
    conv.add_argument("--base-layer", metavar="PATH", help="base layer for --mkfs=false "
                      "(default /opt/overlaybd/baselayers/ext4_64)")
    conv.add_argument("--vsize", type=int, default=64, metavar="GiB", help="virtual disk size in GiB (default 64)")
    conv.add_argument("--fstype", default="ext4", help="filesystem type (only ext4)")
    conv.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile compression (default lz4)")
    conv.add_argument("--block-size", type=int, default=4096, help="ZFile block size (default 4096)")
    conv.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                      help="convert only these platforms of an index (repeatable)")
    conv.add_argument("--concurrency-limit", type=int, default=4, help="platforms converted at once (default 4)")
    conv.add_argument("--force", action="store_true", help="convert even if the target is up to date")
    work = p.add_argument_group("files and output")
    work.add_argument("-d", "--dir", help="directory for temporary blobs (default: system temp dir)")
    work.add_argument("--cache-dir", help="reuse cache directory (default: user cache dir)")
    work.add_argument("--cache-url", help="share the reuse cache through Redis (redis://host:6379/0)")
    work.add_argument("--no-cache", action="store_true", help="neither use nor record the reuse cache")
    work.add_argument("--reserve", action="store_true", help="keep the temporary blobs")
    work.add_argument("--no-upload", action="store_true", help="convert into --dir only, push nothing")
    work.add_argument("--dump-manifest", action="store_true", help="print the converted manifest (or index)")
    work.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    work.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _source_target(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str]:
    if ns.input:
        source = ns.input
    else:
        if not ns.repository:
            parser.error("give the source with -r/--repository and -i/--input-tag (or -g), or with --input")
        if bool(ns.input_tag) == bool(ns.input_digest):
            parser.error("give exactly one of -i/--input-tag and -g/--input-digest")
        source = f"{ns.repository}:{ns.input_tag}" if ns.input_tag else f"{ns.repository}@{ns.input_digest}"
    if ns.output:
        if ns.output_tag and not _has_tag(ns.output):  # -o names the tag inside a tagless --output
            return source, _retag(ns.output, ns.output_tag)
        return source, ns.output
    tag = ns.output_tag or (f"{ns.input_tag}_obd" if ns.input_tag else None)
    if not tag and not ns.no_upload:
        parser.error("give the output tag with -o/--output-tag (or --output)")
    repository = ns.repository
    if ns.output_repository:
        repository = ns.output_repository
        if ns.repository and _has_host(ns.repository) and not _has_host(repository):
            repository = ns.repository.split("/", 1)[0] + "/" + repository  # a bare name: the same registry
    if not repository:
        if not ns.no_upload:
            parser.error("give the target with --output or --output-repository")
        return source, "oci:unused"  # --no-upload writes into --dir only
    return source, f"{repository}:{tag or 'latest_obd'}"


def _turbo_targets(ns: argparse.Namespace, target: str) -> tuple[str, str | None, bool]:
    """(target, additional turbo target, whether `target` is the turbo image) for --turboOCI TAG: the turbo
    image goes where the native one would, tagged TAG; the native one is built only with -o/--overlaybd
    (tagged so, also inside an --output location without a tag)."""
    if not ns.turbo_oci:
        return target, None, False
    turbo = _retag(target, ns.turbo_oci)
    if ns.output_tag:
        return target, turbo, False
    return turbo, None, True


def _has_tag(target: str) -> bool:
    from .transport import parse_location

    loc = parse_location(target)
    return bool(loc.tag or loc.digest)


def _retag(target: str, tag: str) -> str:
    from .transport import parse_location

    loc = parse_location(target)
    if loc.is_layout:
        return f"oci:{loc.layout}:{tag}"
    assert loc.reference is not None
    return f"{loc.reference.registry}/{loc.reference.repository}:{tag}"


def _has_host(repository: str) -> bool:
    first = repository.split("/", 1)[0]
    return "." in first or ":" in first or first == "localhost"


def convert_main(argv: list[str]) -> int:
    """`obd-convert [flags]`: convert one image. Exit 0 on success, 1 permanent failure, 75 transient failure,
    130 when interrupted (SIGINT/SIGTERM), 2 for usage errors."""
    import logging
    import signal
    import threading

    from .errors import ConversionError, TransientError, shorten
    from .options import ConvertOptions, RegistryOptions
    from .pipeline import ConversionAborted, convert

    parser = build_convert_parser()
    try:  # usage errors exit 2 through argparse; main() returns codes instead of exiting
        ns = parser.parse_args(argv)
        source, target = _source_target(ns, parser)
        target, turbo_target, turbo_only = _turbo_targets(ns, target)
    except SystemExit as exc:
        return int(exc.code or 0)
    level = logging.DEBUG if ns.verbose else logging.INFO
    reporter = None
    if sys.stderr.isatty() and not ns.json:  # progress bars, with log records printed above them
        from rich.logging import RichHandler

        from .progress import RichProgress

        reporter = RichProgress()
        logging.basicConfig(level=level, format="%(message)s", handlers=[
            RichHandler(console=reporter.progress.console, show_path=False)])
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    username = password = None
    if ns.username:
        username, _, password = ns.username.partition(":")
        if not password and sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"password for {username}: ")
    cancel = threading.Event()
    interrupted: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if interrupted:  # a second signal: stop waiting for the clean abort
            raise KeyboardInterrupt
        interrupted.append(signum)
        cancel.set()
        print(f"obd-convert: {signal.Signals(signum).name} received, aborting (nothing will be tagged)",
              file=sys.stderr)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        registry = RegistryOptions(username=username, password=password, insecure=ns.insecure, plain_http=ns.plain,
                                   cert_dir=ns.cert_dir, ca_file=ns.root_ca, client_cert=ns.client_cert)
        options = ConvertOptions(
            oci=ns.oci, referrer=ns.referrer, mkfs=ns.mkfs, base_layer=ns.base_layer, vsize=ns.vsize,
            fstype=ns.fstype, algorithm=ns.algorithm, block_size=ns.block_size, platforms=tuple(ns.platform),
            concurrency_limit=ns.concurrency_limit, work_dir=ns.dir, cache_dir=ns.cache_dir, cache_url=ns.cache_url,
            use_cache=not ns.no_cache, force=ns.force, upload=not ns.no_upload, reserve=ns.reserve,
            registry=registry, cancel=cancel, turbo_oci=turbo_only, turbo_target=turbo_target)
        if reporter is not None:
            options.progress = reporter
            reporter.__enter__()
        result = convert(source, target, options)
    except (ConversionError, KeyboardInterrupt) as exc:
        if reporter is not None:
            reporter.__exit__(None, None, None)
        aborted = bool(interrupted) or isinstance(exc, (KeyboardInterrupt, ConversionAborted))
        reason = "interrupted, nothing tagged" if aborted else str(exc).splitlines()[0] if str(exc) else repr(exc)
        reason = shorten(reason)  # one bounded line, whatever the error carried
        code = 130 if aborted else 75 if isinstance(exc, TransientError) else 1
        if ns.json:
            print(json.dumps({"ok": False, "error": reason, "transient": isinstance(exc, TransientError),
                              "source": source, "target": target}))
        print(f"obd-convert: error: {reason}", file=sys.stderr)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if reporter is not None:
        reporter.__exit__(None, None, None)
    if ns.json:
        out = {"ok": True, **result.to_json()}
        if ns.dump_manifest:
            out["manifest"] = json.loads(result.raw)
        print(json.dumps(out, indent=2))
    elif ns.dump_manifest:
        print(json.dumps(json.loads(result.raw), indent=2))
    if not ns.json:
        for one in (result, result.turbo):
            if one is not None:
                print(_summary(one), file=sys.stderr)
    return 0


def _summary(result: Any) -> str:
    """One line about one published image (a ConvertResult)."""
    kind = "TurboOCI image " if result.kind == "turbo" else ""
    if result.up_to_date:
        return f"{kind}{result.target} is up to date ({result.target_digest})"
    if result.pushed:
        extra = f", {result.originals_copied} original layers copied or mounted" if result.originals_copied else ""
        return (f"pushed {kind}{result.target} {result.target_digest}: {result.layers_converted} layers converted, "
                f"{result.layers_reused} reused, {result.blobs_uploaded} blobs uploaded{extra} in "
                f"{result.seconds:.2f} s")
    return f"converted {kind}into {result.output_dir} (not uploaded): {result.target_digest}"


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
    if layer.warp:
        checks[0] = "turbo archive members and order (or a bare meta layer)"
        tag1 = [i for i in range(len(layer)) if layer.tags[i] == 1]
        index["tag0_entries"] = len(layer) - len(tag1)
        index["tag1_entries"] = len(tag1)
        index["tag1_bytes"] = sum(layer.lengths[i] for i in tag1) * 512
        index["tar_end"] = max(((layer.moffsets[i] + layer.lengths[i]) * 512 for i in tag1), default=0)
        checks.append("meta layer: tags 0/1 only, at least one tag-0 entry")
        if layer.remote is not None:
            index["tar_size"] = layer.remote.size
            checks.append("every tag-1 range inside the original tar")
    wrapper = dataclasses.asdict(layer.wrapper) if layer.wrapper is not None else None
    return {"tar": wrapper, "zfile": zfile_info, "lsmt": {"size": layer.size, "header": _lsmt_ht(layer.header),
            "trailer": _lsmt_ht(layer.trailer), "index": index}, "checks_passed": checks}


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def layer_arg(text: str) -> str | TurboLayerSpec:
    """A stack member on the command line: a native blob `PATH`, or a turbo layer `META=ORIGINAL[@DIGEST]`
    (META a turboOCIv1.tar.gz or ext4.fs.meta, ORIGINAL the original layer blob, DIGEST its expected
    sha256:…; an ORIGINAL inside an OCI layout, `blobs/sha256/<hex>`, is checked against its name)."""
    if os.path.exists(text) or "=" not in text:
        return text
    for i, ch in enumerate(text):
        if ch != "=":
            continue
        meta, target = text[:i], text[i + 1:]
        digest = None
        if "@sha256:" in target:
            target, _, hexdigest = target.rpartition("@sha256:")
            digest = "sha256:" + hexdigest
        if os.path.exists(meta) and os.path.exists(target):
            parent = os.path.basename(os.path.dirname(os.path.abspath(target)))
            name = os.path.basename(target)
            if digest is None and parent == "sha256" and len(name) == 64:
                digest = "sha256:" + name
            return TurboLayerSpec(meta=meta, target=target, target_digest=digest)
    raise FormatError(f"{text}: no such layer blob, and not META=ORIGINAL with both files present")


def _inspect(args: argparse.Namespace) -> int:
    results, status = [], 0
    for arg in args.blobs:
        entry: dict[str, Any] = {"path": arg}
        try:
            item = layer_arg(arg)
            path = item.meta if isinstance(item, TurboLayerSpec) else item
            entry["size"] = os.path.getsize(path)
            with open(path, "rb") as f:
                entry["digest"] = sha256_file(f.fileno())
            if not isinstance(item, TurboLayerSpec) and _starts_with(path, GZ_INDEX_MAGIC):  # a gzip.meta alone
                with open(path, "rb") as f:
                    entry["gzip_index"] = GzipIndex(f.read(), name=path).describe()
                entry["ok"] = True
                results.append(entry)
                continue
            turbo = describe_turbo_blob(path)  # None for a native blob or a bare ext4.fs.meta
            if isinstance(item, TurboLayerSpec):
                turbo = turbo or {}
                turbo["original"] = {"path": item.target, "size": os.path.getsize(item.target),
                                     "expected_digest": item.target_digest}
            if turbo is not None:
                entry["turbo"] = turbo
            if isinstance(item, TurboLayerSpec):
                opened = open_any(item, verify_blocks=not args.no_verify)
            elif turbo is not None:
                opened = open_turbo_meta(path, verify_blocks=not args.no_verify)
            else:
                try:
                    opened = open_layer(path, verify_blocks=not args.no_verify)
                except FormatError as native_error:
                    try:  # a bare ext4.fs.meta fails as a native layer (tag-1 moffsets), as in overlaybd
                        opened = open_turbo_meta(path, verify_blocks=not args.no_verify)
                    except FormatError:
                        raise native_error from None
                    entry["turbo"] = {"bare_meta": True}
            with opened as layer:
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
        with StackedReader([layer_arg(a) for a in args.blobs], verify_blocks=not args.no_verify) as stack:
            stack.materialize(args.output)
            print(json.dumps({"output": args.output, "virtual_size": stack.virtual_size,
                              "layers": len(stack.layers)}))
    except (FormatError, OSError) as exc:
        print(f"obd-convert dump: {exc}", file=sys.stderr)
        return 1
    return 0


TURBO_ARG_HELP = ("A turbo layer is given as META=ORIGINAL[@sha256:HEX]: META the turboOCIv1.tar.gz (or a bare "
                  "ext4.fs.meta), ORIGINAL the original layer blob it reads file data from, HEX its expected "
                  "digest (the descriptor's turbo-oci/target-digest; implied for ORIGINAL inside an OCI layout, "
                  "blobs/sha256/HEX). inspect also takes a turboOCIv1.tar.gz, an ext4.fs.meta or a gzip.meta "
                  "alone.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obd-convert", description="overlaybd layer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="decode and validate layer blobs, print JSON",
                       epilog=TURBO_ARG_HELP)
    p.add_argument("blobs", nargs="+", metavar="BLOB")
    p.add_argument("--no-verify", action="store_true", help="skip the per-block ZFile CRC pass")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("dump", help="materialise a stack of layer blobs (bottom to top) as a sparse raw disk",
                       epilog=TURBO_ARG_HELP)
    p.add_argument("--output", "-o", required=True, help="raw disk file to write")
    p.add_argument("blobs", nargs="+", metavar="BLOB")
    p.add_argument("--no-verify", action="store_true", help="do not check ZFile block CRCs while reading")
    p.set_defaults(func=_dump)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS:
        return convert_main(args)
    ns = build_parser().parse_args(args)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
