"""A tiny Docker token server (the `auth.token` flow of Distribution) for tests.

Clients GET ``/token?service=…&scope=repository:<name>:<actions>`` with HTTP Basic credentials
and receive an ES256 JWT signed by a throwaway key whose certificate is the registry's
``rootcertbundle``. Facts it relies on (measured against registry 2.8.2): ``aud`` must be a
string, ``exp`` is required, ``kid`` is the libtrust ID of the signing key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization

from tests.harness.httpserver import QuietHandler, serve_in_background, stop_server
from tests.harness.tls import KeyPair

SERVICE = "test-registry"
ISSUER = "test-token-issuer"


def libtrust_kid(keypair: KeyPair) -> str:
    """base32(sha256(DER SubjectPublicKeyInfo)[:30]) in 12 colon-separated groups of 4."""
    der = keypair.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


def parse_scope(scope: str) -> dict | None:
    """``repository:<name>:<a,b>`` -> an ``access`` claim item; None for a malformed scope."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass
class TokenServer:
    """Grants every requested action to a known user (``users``: name -> password)."""

    keypair: KeyPair
    users: dict[str, str]
    lifetime: float = 300.0  # seconds until the JWT's exp (the registry adds 60 s of leeway)
    advertised_lifetime: float | None = None  # expires_in told to clients, if it should differ
    denied_repos: set[str] = field(default_factory=set)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # identity token -> user
    issued: list[dict] = field(default_factory=list)
    port: int = 0
    _httpd: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def mint(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "iat": now,
            "nbf": now - 1,
            "exp": now + int(self.lifetime),
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        headers = {"kid": libtrust_kid(self.keypair)}
        return jwt.encode(claims, self.keypair.key, algorithm="ES256", headers=headers)

    def check(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        expected = self.users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return None
        return user

    def start(self) -> TokenServer:
        server = self

        class Handler(QuietHandler):
            def _refuse(self) -> None:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="token"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _grant(self, user: str, scopes: list[str], grant: str) -> None:
                access = [a for a in map(parse_scope, scopes) if a]
                access = [a for a in access if a["name"] not in server.denied_repos]
                server.issued.append({"user": user, "access": access, "time": time.time(), "grant": grant})
                token = server.mint(user, access)
                answer = {
                    "access_token": token,
                    "expires_in": int(server.advertised_lifetime or server.lifetime),
                    "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                if grant == "basic":
                    answer["token"] = token  # the Docker token endpoint's name; OAuth2 answers only access_token
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                """Docker token flow: Basic credentials, scopes in the query."""
                url = urlsplit(self.path)
                if url.path != "/token":
                    self.send_error(404)
                    return
                user = server.check(self.headers.get("Authorization"))
                if user is None:
                    self._refuse()
                    return
                self._grant(user, parse_qs(url.query).get("scope", []), "basic")

            def do_POST(self) -> None:
                """OAuth2 refresh-token grant, as clients use the identity token of `docker login`."""
                if urlsplit(self.path).path != "/token":
                    self.send_error(404)
                    return
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                presented = form.get("refresh_token", [""])[0].encode()
                user = next(
                    (u for token, u in server.refresh_tokens.items() if hmac.compare_digest(token.encode(), presented)),
                    None,
                )
                if form.get("grant_type") != ["refresh_token"] or user is None:
                    self._refuse()
                    return
                self._grant(user, " ".join(form.get("scope", [])).split(), "refresh_token")

        self._httpd = serve_in_background(self.port, Handler)
        self.port = self._httpd.server_address[1]
        return self

    def stop(self) -> None:
        stop_server(self._httpd)
