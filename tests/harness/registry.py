"""Start Debian's real `docker-registry` (Distribution 2.8.2) on 127.0.0.1 for a test.

Never uses the packaged /etc/docker/registry/config.yml (it listens on all interfaces): every
instance gets its own config, storage directory and free ports, and is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import yaml

from tests.harness.tls import KeyPair, make_cert
from tests.harness.tokenserver import ISSUER, SERVICE, TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "alice", "wonderland"
START_TIMEOUT = 5.0  # the issue requires the fixture to be up in under 5 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Endpoint:
    """One `notifications.endpoints` entry. Defaults retry fast so a test never waits long."""

    url: str
    name: str = "hook"
    headers: dict[str, list[str]] = field(default_factory=dict)
    ignored_mediatypes: list[str] = field(default_factory=list)
    ignore_actions: list[str] = field(default_factory=list)
    timeout: str = "1s"
    threshold: int = 3
    backoff: str = "200ms"

    def config(self) -> dict:
        entry: dict = {"name": self.name, "url": self.url, "headers": self.headers,
                       "timeout": self.timeout, "threshold": self.threshold, "backoff": self.backoff}
        if self.ignored_mediatypes:
            entry["ignoredmediatypes"] = self.ignored_mediatypes
        if self.ignore_actions:
            entry["ignore"] = {"actions": self.ignore_actions}
        return entry


@dataclass
class Registry:
    """A running registry. ``host`` is what goes into image references (``127.0.0.1:PORT``)."""

    host: str
    scheme: str
    auth: str  # "none" | "htpasswd" | "token"
    workdir: Path
    process: subprocess.Popen
    debug_port: int
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # the self-signed server certificate (TLS variants)
    cert_dir: Path | None = None  # certs.d-style directory holding ca.crt (skopeo --cert-dir)
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def notification_metrics(self) -> dict:
        """``/debug/vars`` endpoint metrics (Pending, Successes, Failures, ...) of the first endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.debug_port}/debug/vars", timeout=5) as resp:
            endpoints = json.load(resp)["registry"]["notifications"]["endpoints"]
        return endpoints[0]["Metrics"] if endpoints else {}

    def log(self) -> str:
        return (self.workdir / "registry.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server:
            self.token_server.stop()


def _wait_ready(reg: Registry) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    context = reg.ssl_context()
    while True:
        if reg.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {reg.process.returncode}:\n{reg.log()[-3000:]}")
        try:
            urllib.request.urlopen(f"{reg.url}/v2/", timeout=1, context=context).close()
            return
        except urllib.error.HTTPError as err:
            if err.code == 401:  # auth variants answer 401 once they are serving
                return
        except ssl.SSLError:  # a registry requiring client certificates is serving once it refuses us
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            reg.stop()
            raise RuntimeError(f"docker-registry not ready within {START_TIMEOUT}s:\n{reg.log()[-3000:]}")
        time.sleep(0.015)


def start_registry(workdir: Path, *, auth: str = "none", tls: bool = False,
                   notifications: list[Endpoint] = (), token_lifetime: float = 300.0,
                   client_ca: KeyPair | None = None, extra_config: dict | None = None) -> Registry:
    """Start a registry with filesystem storage under ``workdir``; wait until ``GET /v2/`` answers.

    ``auth``: "none" (anonymous), "htpasswd" (Basic, user alice/wonderland) or "token" (Bearer
    tokens from an in-process token server for the same user). ``tls`` serves HTTPS with a
    throwaway self-signed certificate; ``client_ca`` additionally requires client certificates.
    """
    if not shutil.which(REGISTRY_BIN):
        raise RuntimeError(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    port, debug_port = free_port(), free_port()
    config: dict = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "test-only-secret",
                 "debug": {"addr": f"127.0.0.1:{debug_port}"},
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    ca_file = cert_dir = token_server = None
    if tls:
        server = make_cert(workdir / "tls", "server")
        ca_file = server.cert_file
        cert_dir = workdir / "certs.d"
        cert_dir.mkdir()
        shutil.copy(ca_file, cert_dir / "ca.crt")
        config["http"]["tls"] = {"certificate": str(server.cert_file), "key": str(server.key_file)}
        if client_ca:
            config["http"]["tls"]["clientcas"] = [str(client_ca.cert_file)]
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        config["auth"] = {"htpasswd": {"realm": "test-realm", "path": str(htpasswd)}}
    elif auth == "token":
        signer = make_cert(workdir / "token", "signer", cn="token-signer")
        token_server = TokenServer(signer, {USER: PASSWORD}, lifetime=token_lifetime).start()
        config["auth"] = {"token": {"realm": token_server.realm, "service": SERVICE, "issuer": ISSUER,
                                    "rootcertbundle": str(signer.cert_file)}}
    elif auth != "none":
        raise ValueError(f"unknown auth variant {auth!r} (none, htpasswd, token)")
    if notifications:
        config["notifications"] = {"events": {"includereferences": True},
                                   "endpoints": [e.config() for e in notifications]}
    if extra_config:
        config.update(extra_config)
    config_file = workdir / "config.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen([REGISTRY_BIN, "serve", str(config_file)], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    reg = Registry(f"127.0.0.1:{port}", "https" if tls else "http", auth, workdir, process, debug_port,
                   username=USER if auth != "none" else None, password=PASSWORD if auth != "none" else None,
                   ca_file=ca_file, cert_dir=cert_dir, token_server=token_server)
    try:
        _wait_ready(reg)
    except BaseException:
        reg.stop()
        raise
    return reg
