"""`obd-webhook`: run the service.

  obd-webhook serve [--no-workers]   HTTP front end (gunicorn) + conversion workers, one command
  obd-webhook worker                 conversion workers only (scale out / separate deployment)
  obd-webhook snippets               print the registry configuration snippets again
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


def hook_path(kind: str, registry: str | None) -> str:
    """A hook's URL path, bound to `registry` (a `registries:` key) when given."""
    return f"/hooks/{kind}/{registry}" if registry else f"/hooks/{kind}"


def distribution_snippet(config: Config, secret: str, registry: str | None = None) -> str:
    """The `notifications` block for a Distribution registry's config.yml (its hook bound to `registry`)."""
    return f"""\
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
        actions: [pull, mount, delete]
"""


def harbor_policy(config: Config, secret: str, registry: str | None = None) -> dict[str, object]:
    """The body of Harbor's `POST /api/v2.0/projects/<project>/webhook/policies`."""
    return {"name": "obd-autoconvert", "enabled": True, "event_types": ["PUSH_ARTIFACT"],
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
    return f"""\
Webhook secret ({origin}; `obd-webhook snippets` prints all this again):

    {secret}

{registries_text(config)}
Docker Distribution / GitLab registry, config.yml:

{distribution_snippet(config, secret, registry)}
Harbor (project > Webhooks > New webhook, or the API):

  Endpoint URL: http://{config.listen}{hook_path("harbor", registry)}      Auth header: Bearer {secret}
  Event type: Artifact pushed            Payload format: Default or CloudEvents

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "worker":
            return worker(args)
        return snippets(args)
    except ConfigError as exc:
        print(f"obd-webhook: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
