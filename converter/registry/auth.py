"""Credentials (explicit or from docker config.json) and the WWW-Authenticate challenge grammar."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from converter.registry.errors import AuthError

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
HELPER_TIMEOUT = 30


@dataclass(frozen=True)
class Credentials:
    """Username + password, or an OAuth2 identity (refresh) token from ``docker login``."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """``user:password`` as given to ``-u``."""
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise AuthError("credentials must be given as USER:PASSWORD")
        return cls(user, password)


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> list[str]:
        return self.params["scope"].split(" ") if self.params.get("scope") else []


_PARAM_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="…",service="…",scope="…"`` (or ``Basic realm="…"``)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params = {}
    for match in _PARAM_RE.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
    return Challenge(scheme.lower(), params)


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (as the docker CLI looks)."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _config_keys(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        keys.insert(0, DOCKER_HUB_CONFIG_KEY)
    return keys


def _run_helper(helper: str, host: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    try:
        run = subprocess.run([program, "get"], input=host.encode(), capture_output=True, timeout=HELPER_TIMEOUT)
    except FileNotFoundError:
        raise AuthError(f"credential helper {program!r} from docker config is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {program!r} did not answer within {HELPER_TIMEOUT}s") from None
    if run.returncode != 0:
        # "credentials not found in native keychain" is the helper protocol's "no entry" answer.
        if b"not found" in run.stdout.lower() or b"not found" in run.stderr.lower():
            return None
        raise AuthError(f"credential helper {program!r} failed with exit status {run.returncode}")
    try:
        answer = json.loads(run.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {program!r} answered something that is not its JSON") from None
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


def _from_auth_entry(entry: dict, host: str, path: Path) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(username=entry.get("username", ""), identity_token=entry["identitytoken"])
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"{path}: the 'auth' entry for {host} is not base64 of USER:PASSWORD") from None
        if not sep:
            raise AuthError(f"{path}: the 'auth' entry for {host} is not base64 of USER:PASSWORD")
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    return None


def load_docker_credentials(host: str, path: str | os.PathLike | None = None) -> Credentials | None:
    """Credentials for ``host`` from a docker config.json: ``credHelpers``, then ``auths``, then ``credsStore``.

    Returns None when the file does not exist or has nothing for the host.
    """
    path = Path(path) if path else docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise AuthError(f"cannot read docker config {path}: {err}") from None
    keys = _config_keys(host)
    helpers = config.get("credHelpers") or {}
    for key in keys:
        if key in helpers:
            return _run_helper(helpers[key], host)
    auths = config.get("auths") or {}
    for key in keys:
        if key in auths:
            found = _from_auth_entry(auths[key] or {}, host, path)
            if found:
                return found
    if config.get("credsStore"):
        return _run_helper(config["credsStore"], host)
    return None
