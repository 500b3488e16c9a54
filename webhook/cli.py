"""`obd-webhook`: run the service.

  obd-webhook serve [--no-workers]   HTTP front end (gunicorn) + conversion workers, one command
  obd-webhook worker                 conversion workers only (scale out / separate deployment)
  obd-webhook snippets               print the registry configuration snippets again
  obd-webhook backfill [--dry-run]   convert the tags the registry already holds (queued behind live pushes)
  obd-webhook stale [--reconvert|--delete]   list (and fix) outputs whose source tag is gone or moved
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from webhook.backend import JobBackend
from webhook.config import Config, ConfigError, ensure_secret, load_config
from webhook.logs import configure_logging

log = logging.getLogger("webhook.cli")
PR_SET_PDEATHSIG = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obd-webhook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML configuration file (default: $OBD_WEBHOOK_CONFIG)")
    common.add_argument("--data-dir", help="job store and secret directory (default: per-user data dir)")
    serve = sub.add_parser("serve", parents=[common], help="front end and workers")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8080)")
    serve.add_argument("--workers", type=int, help="conversion worker threads")
    serve.add_argument("--no-workers", action="store_true", help="run only the HTTP front end")
    worker = sub.add_parser("worker", parents=[common], help="conversion workers only")
    worker.add_argument("--concurrency", type=int, help="worker threads (default: `workers` setting)")
    snippets = sub.add_parser("snippets", parents=[common], help="print registry configuration snippets")
    snippets.add_argument("--listen", help="HOST:PORT the registry should call")
    backfill = sub.add_parser("backfill", parents=[common], help="queue conversions of existing tags")
    stale = sub.add_parser("stale", parents=[common], help="report outputs whose source is gone or moved")
    for command in (backfill, stale):
        command.add_argument("--registry", help="registry host[:port] (default: the only one configured)")
        command.add_argument("--repository", action="append", metavar="GLOB",
                             help="repository name or glob; repeatable (default: all, from the catalog)")
        command.add_argument("--json", action="store_true", help="print JSON instead of text")
    backfill.add_argument("--tag", action="append", metavar="GLOB", help="tag glob; repeatable (default: all)")
    backfill.add_argument("--dry-run", action="store_true", help="print what would be queued; queue nothing")
    backfill.add_argument("--limit", type=int, help="queue at most N jobs")
    fix = stale.add_mutually_exclusive_group()
    fix.add_argument("--reconvert", action="store_true", help="queue conversions of the moved sources")
    fix.add_argument("--delete", action="store_true", help="queue deletions of outputs whose source is gone")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """CLI flags as environment overrides, so child processes see the same configuration."""
    env: dict[str, str] = {}
    if args.config:
        env["OBD_WEBHOOK_CONFIG"] = str(Path(args.config).resolve())
    if args.data_dir:
        env["OBD_WEBHOOK_DATA_DIR"] = str(Path(args.data_dir).resolve())
    if getattr(args, "listen", None):
        env["OBD_WEBHOOK_LISTEN"] = args.listen
    if getattr(args, "workers", None) is not None:
        env["OBD_WEBHOOK_WORKERS"] = str(args.workers)
    return env


def mirrors_deletes(config: Config) -> bool:
    return any(rule.delete_mirror for rule in config.rules)


def hook_path(kind: str, registry: str | None) -> str:
    """A hook's URL path, bound to `registry` (a `registries:` key) when given."""
    return f"/hooks/{kind}/{registry}" if registry else f"/hooks/{kind}"


def distribution_snippet(config: Config, secret: str, registry: str | None = None) -> str:
    """The `notifications` block for a Distribution registry's config.yml (its hook bound to `registry`).
    With delete mirroring on, the registry must send delete events (and allow deletes: storage.delete.enabled)."""
    ignored = "[pull, mount]" if mirrors_deletes(config) else "[pull, mount, delete]"
    # A comment, not a block: the registry's config.yml already has a `storage:` section to add it to.
    storage = ("# delete mirroring removes outputs through the API: add to your existing storage section\n"
               "#   storage:\n#     delete:\n#       enabled: true\n" if mirrors_deletes(config) else "")
    return storage + f"""\
notifications:
  events:
    includereferences: true
  endpoints:
    - name: obd-autoconvert
      url: http://{config.listen}{hook_path("distribution", registry)}
      headers:
        Authorization: [Bearer {secret}]
      timeout: 1s
      threshold: 5
      backoff: 1s
      ignoredmediatypes: [application/octet-stream]   # needed on 2.8.x for the action filter to apply
      ignore:
        actions: {ignored}
"""


def harbor_policy(config: Config, secret: str, registry: str | None = None) -> dict[str, object]:
    """The body of Harbor's `POST /api/v2.0/projects/<project>/webhook/policies`."""
    events = ["PUSH_ARTIFACT", "DELETE_ARTIFACT"] if mirrors_deletes(config) else ["PUSH_ARTIFACT"]
    return {"name": "obd-autoconvert", "enabled": True, "event_types": events,
            "targets": [{"type": "http", "address": f"http://{config.listen}{hook_path('harbor', registry)}",
                         "auth_header": f"Bearer {secret}", "payload_format": "Default"}]}


def registries_text(config: Config) -> str:
    """Which registries events may name; with none configured, the one line that adds yours."""
    if config.registries:
        return ("Registries this service converts for (hooks below are bound to the first; use\n"
                f"/hooks/<kind>/<registry> for the others): {', '.join(config.registries)}\n")
    return f"""\
Registries: none configured, so only registries on this machine (localhost, 127.0.0.1, [::1], any
port) are converted; events naming any other host are ignored (host_not_allowed). To add yours,
set this (or `registries:` in the config file) and restart:

    OBD_WEBHOOK_REGISTRIES='{{registry.example.com:5000: {{}}}}'

then point its notifications at http://{config.listen}/hooks/distribution/registry.example.com:5000
"""


def snippets_text(config: Config, secret: str, origin: str) -> str:
    registry = next(iter(config.registries), None)
    policy = json.dumps(harbor_policy(config, secret, registry))
    events = "Artifact pushed, Artifact deleted" if mirrors_deletes(config) else "Artifact pushed"
    return f"""\
Webhook secret ({origin}; `obd-webhook snippets` prints all this again):

    {secret}

{registries_text(config)}
Docker Distribution / GitLab registry, config.yml:

{distribution_snippet(config, secret, registry)}
Harbor (project > Webhooks > New webhook, or the API):

  Endpoint URL: http://{config.listen}{hook_path("harbor", registry)}      Auth header: Bearer {secret}
  Event type: {events}            Payload format: Default or CloudEvents

  curl -u admin -H 'Content-Type: application/json' -X POST \\
    https://<harbor>/api/v2.0/projects/<project>/webhook/policies -d '{policy}'
"""


def _set_pdeathsig() -> None:
    """Children get SIGTERM if `serve` dies (even by kill -9), so nothing is left orphaned."""
    # Not Linux/glibc: children then outlive a killed parent, as with any supervisor.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, preexec_fn=_set_pdeathsig)


def serve(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    config = load_config(env={**os.environ, **overrides})
    configure_logging(config.log_format, config.log_level)
    config, new_secret = ensure_secret(config)
    from webhook.store import JobStore  # create the schema once, before the children race to

    if config.queue == "embedded":
        JobStore(config.db_path, synchronous=config.sqlite_synchronous).close()
    if new_secret is not None:
        print(snippets_text(config, new_secret, f"generated now, stored in {config.secret_file}"), flush=True)
    env = {**os.environ, **overrides}
    gunicorn = [sys.executable, "-m", "gunicorn", "--config", "python:webhook.gunicorn_settings"]
    children = {"http": _spawn(gunicorn, env)}
    with_workers = not args.no_workers and config.workers > 0
    if with_workers:
        # Embedded: one process with `workers` threads. Redis: RQ workers convert one job each.
        for i in range(config.workers if config.queue == "redis" else 1):
            children[f"worker-{i}"] = _spawn([sys.executable, "-m", "webhook.cli", "worker"], env)
    log.info("obd-webhook serving", extra={"listen": config.listen, "data_dir": str(config.data_dir),
                                           "workers": config.workers if with_workers else 0})
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exit_code = 0
    while not stopping.wait(0.2):
        crashed = {name: p.returncode for name, p in children.items() if p.poll() is not None}
        if crashed:
            log.error("a service process exited; stopping", extra={"exited": crashed})
            exit_code = 1
            break
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + config.shutdown_grace_seconds + 10
    for proc in children.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.info("obd-webhook stopped")
    return exit_code


def worker(args: argparse.Namespace) -> int:
    config = load_config(env={**os.environ, **_overrides(args)})
    configure_logging(config.log_format, config.log_level)
    if config.queue == "redis":
        from webhook.redis_queue import run_worker

        if args.concurrency not in (None, 1):
            raise ConfigError("--concurrency: an RQ worker converts one job at a time; start more workers")
        run_worker(config)  # returns after SIGTERM (RQ's warm shutdown: the running job finishes)
        return 0
    from webhook.conversion import load_convert_callable
    from webhook.retry import RetryPolicy
    from webhook.store import JobStore
    from webhook.worker import WorkerPool, WorkerSettings

    concurrency = args.concurrency if args.concurrency is not None else config.workers
    pool = WorkerPool(JobStore(config.db_path, synchronous=config.sqlite_synchronous),
                      load_convert_callable(config.convert_callable), RetryPolicy(config.retry),
                      WorkerSettings.from_config(config), max(1, concurrency), config.registries)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pool.start()
    stop.wait()
    log.info("shutting down workers", extra={"grace_seconds": config.shutdown_grace_seconds})
    released = pool.stop()
    log.info("workers stopped", extra={"requeued": released})
    # Threads still converting after the grace period are abandoned; their jobs were handed back.
    os._exit(0)


def snippets(args: argparse.Namespace) -> int:
    config = load_config(env={**os.environ, **_overrides(args)})
    origin = "first configured secret" if config.secrets else f"stored in {config.secret_file}"
    config, new_secret = ensure_secret(config)
    if new_secret is not None:
        origin = f"generated now, stored in {config.secret_file}"
    print(snippets_text(config, config.secrets[0], origin))
    return 0


def _store(config: Config) -> JobBackend:
    if config.queue == "redis":
        from webhook.redis_queue import backend_for

        return backend_for(config)
    from webhook.store import JobStore

    return JobStore(config.db_path, synchronous=config.sqlite_synchronous)


def backfill(args: argparse.Namespace) -> int:
    """Runs the walk in this process against the service's job store; the service's workers convert."""
    from webhook.backfill import BackfillRequest, progress_view, run_backfill
    from webhook.lifecycle_api import BadRequest, default_registry

    config = load_config(env={**os.environ, **_overrides(args)})
    configure_logging(config.log_format, config.log_level)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit: expected a positive number")
    try:
        registry = default_registry(config, args.registry)
    except BadRequest as exc:
        raise ConfigError(f"--registry: {exc}") from None
    request = BackfillRequest(registry=registry, repositories=tuple(args.repository or ["*"]),
                              tags=tuple(args.tag or ["*"]), dry_run=args.dry_run, limit=args.limit)
    store = _store(config)
    progress = run_backfill(config, store, request)
    view = progress_view(store, {**progress.record(), "would_queue": progress.would_queue})
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        if args.dry_run:
            print(f"dry run: would queue {progress.queued} conversion(s):")
            for reference in progress.would_queue:
                print(f"  {reference}")
        else:
            print(f"backfill {progress.id}: queued {progress.queued} conversion(s)")
        print(f"listed {progress.tags} tag(s) in {progress.repositories} repositories; skipped: "
              + (", ".join(f"{k} {v}" for k, v in sorted(progress.skipped.items())) or "none"))
        if progress.error:
            print(f"failed: {progress.error}", file=sys.stderr)
    return 0 if progress.state == "finished" else 1


def stale(args: argparse.Namespace) -> int:
    from webhook.lifecycle import find_stale, fix_intakes, stale_counters
    from webhook.lifecycle_api import BadRequest, default_registry

    config = load_config(env={**os.environ, **_overrides(args)})
    configure_logging(config.log_format, config.log_level)
    try:
        registry = default_registry(config, args.registry)
    except BadRequest as exc:
        raise ConfigError(f"--registry: {exc}") from None
    found = find_stale(config, registry, tuple(args.repository or ["*"]))
    store = _store(config)
    store.add_counters(stale_counters(found))
    fix = "reconvert" if args.reconvert else "delete" if args.delete else None
    queued: list[str] = []
    skipped: list[dict] = []
    if fix is not None:
        intakes, skipped = fix_intakes(config, found, fix)
        outcomes = store.record(intakes) if intakes else []
        queued = [o.job_id for o in outcomes if o.job_id is not None]
    if args.json:
        print(json.dumps({"stale": [s.to_dict() for s in found], "queued": queued, "skipped": skipped}, indent=2))
        return 0
    for entry in found:
        now = entry.current_digest or "gone"
        print(f"{entry.registry}/{entry.repository}:{entry.tag}  {entry.reason}  "
              f"(made from {entry.recorded_digest[:19]}, {entry.source_tag} now {now[:19]})")
    print(f"{len(found)} stale output(s)")
    if fix is not None:
        print(f"queued {len(queued)} {fix} job(s)")
        for item in skipped:
            print(f"  not fixed: {item['reference']}: {item['why']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "worker":
            return worker(args)
        if args.command == "backfill":
            return backfill(args)
        if args.command == "stale":
            return stale(args)
        return snippets(args)
    except ConfigError as exc:
        print(f"obd-webhook: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
