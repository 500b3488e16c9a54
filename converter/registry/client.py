"""A client for one registry host speaking the OCI distribution API.

One `RegistryClient` owns a `requests.Session`, the TLS settings, the credentials and the
bearer tokens (cached per set of scopes). Callers name repositories, tags and digests; they
never build URLs. Transient failures (connection errors, timeouts, 5xx, 429) are retried with
exponential backoff and jitter by tenacity, honouring Retry-After, within a bounded total time;
a 401 gets one credential/token refresh; every other 4xx fails at once with the registry's
error JSON attached.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

import certifi
import requests
import urllib3
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_exponential, wait_random

from converter.registry.auth import Challenge, Credentials, load_docker_credentials, parse_challenge
from converter.registry.errors import (
    AuthError,
    DeleteUnsupportedError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    RegistryPermanentError,
    RegistryTransientError,
    TLSError,
    UnsupportedManifestError,
    describe,
    parse_error_body,
)
from converter.registry.reference import DIGEST_RE, DOCKER_HUB_ALIASES, DOCKER_HUB_API, REPOSITORY_RE, TAG_RE

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
# Registry 2.8 answers 404 for OCI content and rewrites v2s2 to schema 1 unless the Accept header
# names the type, and silently resolves a manifest list to amd64: so always send all four.
ACCEPT = ", ".join(MANIFEST_TYPES)
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
MAX_MANIFEST_SIZE = 4 * 1024 * 1024  # the limit Distribution and containerd apply
CHUNK_SIZE = 16 * 1024 * 1024  # upload PATCH size: bounds memory to about two chunks
READ_SIZE = 1024 * 1024
TOKEN_MARGIN = 10.0  # refresh a bearer token this many seconds before it expires
DEFAULT_CERTS_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))
USER_AGENT = "obd-autoconvert"
PAGE_SIZE = 100  # catalog, tag and Harbor listings: entries asked for per page
HARBOR_API = "/api/v2.0"


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    media_type: str
    digest: str

    def json(self) -> dict:
        return json.loads(self.raw)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures: up to ``attempts`` tries within ``total`` seconds, waits ``initial``..``max_wait``."""

    attempts: int = 6
    total: float = 120.0
    initial: float = 0.5
    max_wait: float = 20.0


class _Retryable(Exception):
    """Raised inside a tenacity attempt for a failure worth another try."""

    def __init__(self, message: str, *, response: requests.Response | None = None, body: bytes = b"",
                 retry_after: float | None = None):
        super().__init__(message)
        self.response, self.body, self.retry_after = response, body, retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _check_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise RegistryPermanentError(f"invalid digest {digest!r} (expected sha256:<64 hex>)")
    return digest


def _check_repo(repo: str) -> str:
    if not REPOSITORY_RE.fullmatch(repo):
        raise RegistryPermanentError(f"invalid repository name {repo!r}")
    return repo


def _check_ref(ref: str) -> str:
    if not (TAG_RE.fullmatch(ref) or DIGEST_RE.fullmatch(ref)):
        raise RegistryPermanentError(f"invalid tag or digest {ref!r}")
    return ref


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _pull(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull",)


def _push(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,push",)


def _media_type(response: requests.Response, raw: bytes) -> str:
    header = response.headers.get("Content-Type", "").split(";")[0].strip()
    if header in MANIFEST_TYPES or header in SCHEMA1_TYPES:
        return header
    try:
        return str(json.loads(raw).get("mediaType") or header)
    except (ValueError, AttributeError):
        return header


def _certs_dir_files(directory: Path) -> tuple[list[Path], tuple[str, str] | None]:
    """docker certs.d layout: ``*.crt`` are CAs, ``X.cert`` + ``X.key`` a client certificate."""
    cas = sorted(directory.glob("*.crt"))
    client = None
    for cert in sorted(directory.glob("*.cert")):
        key = cert.with_suffix(".key")
        if not key.exists():
            raise TLSError(f"client certificate {cert} has no matching key file {key.name}")
        client = (str(cert), str(key))
    return cas, client


class RateLimiter:
    """At most ``per_second`` request starts per second, shared by every thread using the client."""

    def __init__(self, per_second: float) -> None:
        if per_second <= 0:
            raise ValueError("rate limit must be positive (requests per second)")
        self.interval = 1.0 / per_second
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class RegistryClient:
    """Talks to one registry ``host`` (``host[:port]``; ``docker.io`` means Docker Hub's API host).

    Credentials: ``credentials`` (a `Credentials` or "user:password"), else the docker
    ``config.json`` at ``docker_config`` (default: ``$DOCKER_CONFIG`` or ``~/.docker``), else anonymous.
    TLS is verified by default against the system bundle plus ``ca_file`` and the ``*.crt`` files
    of the certs.d directory (``cert_dir/<host>/`` or ``cert_dir/``; default
    ``/etc/docker/certs.d/<host>``); ``client_cert`` (cert, key) or a ``*.cert``/``*.key`` pair there
    authenticates the client. ``insecure`` skips verification; ``plain_http`` speaks HTTP.
    ``rate_limit`` (requests per second, None = unlimited) spaces out every request this client sends,
    retries included; a 429 answer is retried after its Retry-After in any case.
    """

    def __init__(self, host: str, *, credentials: Credentials | str | None = None,
                 docker_config: str | os.PathLike | None = None, plain_http: bool = False,
                 insecure: bool = False, ca_file: str | os.PathLike | None = None,
                 cert_dir: str | os.PathLike | None = None, client_cert: tuple[str, str] | None = None,
                 retry: RetryPolicy | None = None, timeout: tuple[float, float] = (10.0, 60.0),
                 chunk_size: int = CHUNK_SIZE, rate_limit: float | None = None):
        self.host = DOCKER_HUB_API if host in DOCKER_HUB_ALIASES else host  # "docker.io" serves no API
        self.scheme = "http" if plain_http else "https"
        self.base = f"{self.scheme}://{self.host}"
        if isinstance(credentials, str):
            credentials = Credentials.parse(credentials)
        self.credentials = credentials if credentials is not None else load_docker_credentials(self.host, docker_config)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self._bundle: str | None = None
        self._configure_tls(insecure, ca_file, cert_dir, client_cert)
        self._challenge: Challenge | None = None
        self._tokens: dict[frozenset[str], tuple[str, float]] = {}

    # ----------------------------------------------------------------- setup and transport

    def _configure_tls(self, insecure: bool, ca_file, cert_dir, client_cert) -> None:
        if self.scheme == "http":
            return
        cas: list[Path] = [Path(ca_file)] if ca_file else []
        dirs = ([Path(cert_dir) / self.host, Path(cert_dir)] if cert_dir
                else [d / self.host for d in DEFAULT_CERTS_DIRS])
        for directory in dirs:
            if directory.is_dir():
                found, pair = _certs_dir_files(directory)
                cas += found
                client_cert = client_cert or pair
                break
        if insecure:
            self.session.verify = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif cas:
            # requests replaces its trust store with `verify=path`; keep the usual roots as well.
            system = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or ""
            roots = Path(system) if os.path.isfile(system) else Path(certifi.where())
            fd, self._bundle = tempfile.mkstemp(prefix="obd-ca-", suffix=".pem")
            with os.fdopen(fd, "wb") as bundle:
                for path in [roots, *cas]:
                    bundle.write(path.read_bytes().rstrip(b"\n") + b"\n")
            self.session.verify = self._bundle
        if client_cert:
            self.session.cert = tuple(str(p) for p in client_cert)

    def close(self) -> None:
        self.session.close()
        if self._bundle:
            Path(self._bundle).unlink(missing_ok=True)
            self._bundle = None

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _url(self, path: str) -> str:
        return urljoin(self.base, path)

    def _wait(self, state) -> float:
        exc = state.outcome.exception()
        backoff = (wait_exponential(multiplier=self.retry.initial, max=self.retry.max_wait)
                   + wait_random(0, self.retry.initial))(state)
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry.max_wait)
        return backoff

    def _send(self, method: str, url: str, *, retry: bool = True, **kw) -> requests.Response:
        """One HTTP exchange, retried on transient failures; returns any non-retryable response."""
        def attempt() -> requests.Response:
            if self.limiter is not None:
                self.limiter.wait()
            try:
                # verify is passed per request: a session-level value loses to REQUESTS_CA_BUNDLE.
                response = self.session.request(method, url, timeout=self.timeout, verify=self.session.verify,
                                                **kw)
            except requests.exceptions.SSLError as err:
                raise TLSError(f"{method} {urlsplit(url).path}: TLS failure with {self.host}: {err}") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as err:
                raise _Retryable(f"{method} {urlsplit(url).path}: {type(err).__name__}: {err}") from None
            if response.status_code >= 500 or response.status_code == 429:
                body = response.content[:8192]
                response.close()
                raise _Retryable(f"{method} {urlsplit(url).path}: HTTP {response.status_code}", response=response,
                                 body=body, retry_after=_retry_after(response.headers.get("Retry-After")))
            return response

        attempts = self.retry.attempts if retry else 1
        retrying = Retrying(stop=stop_after_attempt(attempts) | stop_after_delay(self.retry.total),
                            wait=self._wait, retry=retry_if_exception_type(_Retryable), reraise=False,
                            before_sleep=lambda s: log.warning("retrying %s", s.outcome.exception()))
        try:
            return retrying(attempt)
        except RetryError as err:
            last = err.last_attempt.exception()
            status = last.response.status_code if last.response is not None else None
            errors = parse_error_body(last.body)
            message = describe(method, urlsplit(url).path, status, errors, last.body) if status else str(last)
            raise RegistryTransientError(f"{message} (gave up after {err.last_attempt.attempt_number} attempts)",
                                         status=status, errors=errors, method=method,
                                         path=urlsplit(url).path) from None

    # ----------------------------------------------------------------------------- auth

    def _fetch_token(self, challenge: Challenge, scopes: frozenset[str]) -> tuple[str, float]:
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{self.host}: bearer challenge without a usable realm: {realm!r}")
        if realm.startswith("http://") and self.credentials and self.scheme == "https":
            raise AuthError(f"{self.host}: refusing to send credentials to the plain-HTTP token realm {realm}")
        service = {"service": challenge.service} if challenge.service else {}
        creds = self.credentials
        if creds and creds.identity_token:  # OAuth2 refresh-token grant, as docker login stores it
            form = {**service, "scope": " ".join(sorted(scopes)), "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token, "client_id": USER_AGENT}
            response = self._send("POST", realm, data=form)
        else:
            headers = {"Authorization": creds.basic_header()} if creds and creds.username else {}
            params = [*service.items(), *(("scope", s) for s in sorted(scopes))]
            response = self._send("GET", realm, params=params, headers=headers)
        if response.status_code != 200:
            raise AuthError(f"token server {urlsplit(realm).netloc} refused "
                            f"{'credentials' if creds else 'anonymous access'} for {' '.join(sorted(scopes))}: "
                            f"HTTP {response.status_code}", status=response.status_code)
        try:
            answer = response.json()
            token = answer.get("token") or answer["access_token"]
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"token server {urlsplit(realm).netloc} answered without a token") from None
        return token, time.monotonic() + lifetime

    def _authorization(self, scopes: tuple[str, ...], *, refresh: bool = False) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if not self.credentials or not self.credentials.username:
                raise AuthError(f"{self.host} requires credentials (Basic auth) and none were given")
            return self.credentials.basic_header()
        key = frozenset(scopes)
        cached = self._tokens.get(key)
        if refresh or cached is None or cached[1] - TOKEN_MARGIN < time.monotonic():
            cached = self._fetch_token(challenge, key)
            self._tokens[key] = cached
        return f"Bearer {cached[0]}"

    def _learn(self, response: requests.Response, scopes: tuple[str, ...]) -> tuple[str, ...] | None:
        """Take the 401's challenge; returns the scopes to request (ours plus the challenge's)."""
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return None
        self._challenge = challenge
        return tuple(sorted(set(scopes) | set(challenge.scopes)))

    # ------------------------------------------------------------------------ requests

    def _request(self, method: str, path: str, *, scopes: tuple[str, ...], ok: tuple[int, ...] = (200,),
                 allow: tuple[int, ...] = (), retry: bool = True, **kw) -> requests.Response:
        """Send with auth; a 401 gets one refresh; statuses outside ``ok + allow`` raise."""
        url = self._url(path)
        headers = dict(kw.pop("headers", None) or {})
        refreshed = False
        while True:
            auth = self._authorization(scopes, refresh=refreshed)
            if auth:
                headers["Authorization"] = auth
            response = self._send(method, url, headers=headers, retry=retry, **kw)
            if response.status_code == 401 and not refreshed:
                learned = self._learn(response, scopes)
                if learned is not None:
                    response.close()
                    self._tokens.pop(frozenset(scopes), None)  # expired or too narrow: never reuse it
                    scopes, refreshed = learned, True
                    continue
            break
        if response.status_code in ok or response.status_code in allow:
            return response
        raise self._error(method, url, response)

    def _error(self, method: str, url: str, response: requests.Response) -> RegistryError:
        body = response.content[:8192] if method != "HEAD" else b""
        response.close()
        errors = parse_error_body(body)
        path = urlsplit(url).path
        message = describe(method, path, response.status_code, errors, body)
        cls = {401: AuthError, 403: AuthError, 404: NotFoundError}.get(response.status_code, RegistryPermanentError)
        return cls(message, status=response.status_code, errors=errors, method=method, path=path)

    # ------------------------------------------------------------------------ API: misc

    def ping(self) -> None:
        """``GET /v2/`` with auth: raises if the registry is unreachable or refuses the credentials."""
        self._request("GET", "/v2/", scopes=()).close()

    def _pages(self, path: str, scopes: tuple[str, ...], key: str) -> Iterator[str]:
        """The ``key`` lists of a paginated listing, following ``Link: <...>; rel="next"``."""
        next_path: str | None = path
        while next_path:
            response = self._request("GET", next_path, scopes=scopes)
            try:
                entries = response.json().get(key) or []
            except (ValueError, AttributeError):
                raise RegistryPermanentError(f"GET {urlsplit(next_path).path}: answer is not a JSON object "
                                             f"with a {key!r} list") from None
            yield from (str(entry) for entry in entries)
            links = requests.utils.parse_header_links(response.headers.get("Link", ""))
            next_path = next((link["url"] for link in links if link.get("rel") == "next"), None)

    def list_tags(self, repo: str, page_size: int | None = None) -> list[str]:
        """Every tag of ``repo`` (``/v2/<name>/tags/list``, paginated with ``n=``/``Link``)."""
        path = f"/v2/{_check_repo(repo)}/tags/list"
        if page_size:
            path = _with_query(path, n=str(page_size))
        return list(self._pages(path, _pull(repo), "tags"))

    def list_repositories(self, page_size: int = PAGE_SIZE) -> Iterator[str]:
        """Every repository in the catalog (``/v2/_catalog``, paginated with ``n=``/``Link``).

        Raises AuthError/NotFoundError when the registry hides its catalog (Harbor, most clouds).
        """
        path = _with_query("/v2/_catalog", n=str(page_size))
        return self._pages(path, ("registry:catalog:*",), "repositories")

    def _harbor_get(self, path: str, params: dict[str, str]) -> requests.Response:
        # Harbor's REST API takes Basic credentials directly (no token dance): send them up front.
        headers = {"Accept": "application/json"}
        if self.credentials and self.credentials.username:
            headers["Authorization"] = self.credentials.basic_header()
        response = self._send("GET", _with_query(self._url(path), **params), headers=headers)
        if response.status_code != 200:
            raise self._error("GET", self._url(path), response)
        return response

    def _harbor_pages(self, path: str, page_size: int) -> Iterator[dict]:
        page = 1
        while True:
            response = self._harbor_get(path, {"page": str(page), "page_size": str(page_size)})
            try:
                items = response.json()
            except ValueError:
                items = None
            if not isinstance(items, list):
                raise RegistryPermanentError(f"GET {path}: not a Harbor API answer (expected a JSON list)")
            yield from (item for item in items if isinstance(item, dict))
            if len(items) < page_size:
                return
            page += 1

    def list_harbor_repositories(self, page_size: int = PAGE_SIZE) -> Iterator[str]:
        """Every repository through Harbor's REST API (projects, then their repositories), for Harbor
        installations whose ``/v2/_catalog`` is disabled. Names are ``project/repo...``."""
        for project in self._harbor_pages(f"{HARBOR_API}/projects", page_size):
            name = str(project.get("name") or "")
            if not name:
                continue
            for repo in self._harbor_pages(f"{HARBOR_API}/projects/{quote(name, safe='')}/repositories", page_size):
                full = str(repo.get("name") or "")
                if full:
                    yield full

    # ------------------------------------------------------------------- API: manifests

    def _read_manifest(self, response: requests.Response, repo: str, ref: str) -> Manifest:
        raw = response.content  # read inside the retried exchange, so a broken body is retried
        if len(raw) > MAX_MANIFEST_SIZE:
            raise RegistryPermanentError(f"{repo}:{ref}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
        media_type = _media_type(response, raw)
        if media_type in SCHEMA1_TYPES:
            raise UnsupportedManifestError(
                f"{repo}:{ref} is a Docker schema 1 manifest ({media_type}), which is deprecated and not "
                f"supported; push the image again with a current client to get a schema 2 or OCI manifest")
        if media_type not in MANIFEST_TYPES:
            raise UnsupportedManifestError(f"{repo}:{ref}: unsupported manifest media type {media_type!r}")
        algorithm = ref.split(":", 1)[0] if DIGEST_RE.fullmatch(ref) else "sha256"
        digest = _digest_of(raw, algorithm)
        claimed = response.headers.get("Docker-Content-Digest")
        if DIGEST_RE.fullmatch(ref) and digest != ref:
            raise DigestMismatchError(f"{repo}@{ref}: the registry sent a manifest whose digest is {digest}")
        if claimed and claimed.startswith(f"{algorithm}:") and claimed != digest:
            raise DigestMismatchError(f"{repo}:{ref}: manifest digest {digest} differs from the registry's {claimed}")
        return Manifest(raw, media_type, digest)

    def get_manifest(self, repo: str, ref: str) -> Manifest:
        """The manifest or index at tag or digest ``ref``, digest-verified. Raises NotFoundError."""
        response = self._request("GET", f"/v2/{_check_repo(repo)}/manifests/{_check_ref(ref)}",
                                 scopes=_pull(repo), headers={"Accept": ACCEPT})
        return self._read_manifest(response, repo, ref)

    def head_manifest(self, repo: str, ref: str) -> Descriptor | None:
        """Media type, digest and size of ``ref``, or None if it does not exist."""
        response = self._request("HEAD", f"/v2/{_check_repo(repo)}/manifests/{_check_ref(ref)}",
                                 scopes=_pull(repo), headers={"Accept": ACCEPT}, allow=(404,))
        response.close()
        if response.status_code == 404:
            return None
        digest = response.headers.get("Docker-Content-Digest")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if not digest or media_type not in MANIFEST_TYPES:
            manifest = self.get_manifest(repo, ref)  # registries may omit the header on HEAD
            return Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        return Descriptor(media_type, digest, int(response.headers.get("Content-Length", 0)))

    def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        """Store ``raw`` under tag or digest ``ref``; returns its digest (checked against the registry's)."""
        if media_type not in MANIFEST_TYPES:
            raise UnsupportedManifestError(f"refusing to push a manifest of media type {media_type!r}")
        digest = _digest_of(raw)
        if DIGEST_RE.fullmatch(ref) and ref != digest:
            raise DigestMismatchError(f"{repo}@{ref}: manifest bytes have digest {digest}")
        response = self._request("PUT", f"/v2/{_check_repo(repo)}/manifests/{_check_ref(ref)}", scopes=_push(repo),
                                 headers={"Content-Type": media_type}, data=raw, ok=(201, 200, 202))
        response.close()
        claimed = response.headers.get("Docker-Content-Digest")
        if claimed and claimed != digest:
            raise DigestMismatchError(f"{repo}:{ref}: registry stored digest {claimed}, we sent {digest}")
        return digest

    def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete the manifest ``digest`` (and with it every tag pointing at it).

        Raises DeleteUnsupportedError when the registry does not allow deletes (405 / UNSUPPORTED).
        """
        path = f"/v2/{_check_repo(repo)}/manifests/{_check_digest(digest)}"
        try:
            self._request("DELETE", path, scopes=(f"repository:{repo}:delete",), ok=(202, 200)).close()
        except RegistryPermanentError as err:
            if err.status == 405 or any(e.code == "UNSUPPORTED" for e in err.errors):
                raise DeleteUnsupportedError(
                    f"{self.host} does not allow deleting manifests ({err}); on Distribution set "
                    f"storage.delete.enabled: true in config.yml", status=err.status, errors=err.errors,
                    method="DELETE", path=path) from None
            raise

    def referrers(self, repo: str, digest: str, artifact_type: str | None = None) -> list[dict]:
        """Descriptors of manifests whose ``subject`` is ``digest``: the referrers API if the
        registry has it, else the ``<alg>-<hex>`` tag schema of OCI distribution 1.1."""
        _check_digest(digest)
        params = {"artifactType": artifact_type} if artifact_type else None
        response = self._request("GET", f"/v2/{_check_repo(repo)}/referrers/{digest}", scopes=_pull(repo),
                                 headers={"Accept": OCI_INDEX}, params=params, allow=(404, 400, 405))
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if response.status_code == 200 and content_type == OCI_INDEX:
            descriptors = response.json().get("manifests", [])
            filtered = "artifactType" in response.headers.get("OCI-Filters-Applied", "")
        else:
            response.close()
            try:
                index = self.get_manifest(repo, digest.replace(":", "-", 1))
            except NotFoundError:
                return []
            descriptors = index.json().get("manifests", []) if index.media_type == OCI_INDEX else []
            filtered = False
        if artifact_type and not filtered:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        return descriptors

    # ----------------------------------------------------------------------- API: blobs

    def blob_exists(self, repo: str, digest: str) -> int | None:
        """The blob's size if ``repo`` has it, else None."""
        response = self._request("HEAD", f"/v2/{_check_repo(repo)}/blobs/{_check_digest(digest)}",
                                 scopes=_pull(repo), allow=(404,))
        response.close()
        return int(response.headers.get("Content-Length", 0)) if response.status_code == 200 else None

    def open_blob(self, repo: str, digest: str, size: int | None = None) -> BlobReader:
        """A stream of the blob; raises DigestMismatchError at its end if digest or size is wrong.

        A connection lost mid-body is resumed with a Range request from the current offset.
        """
        return BlobReader(self, _check_repo(repo), _check_digest(digest), size)

    def _open_blob_response(self, repo: str, digest: str, offset: int) -> requests.Response:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        return self._request("GET", f"/v2/{repo}/blobs/{digest}", scopes=_pull(repo), headers=headers,
                             stream=True, ok=(200, 206))

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False (and no leaked upload session) if the registry declined."""
        scopes = (*_push(_check_repo(repo)), *_pull(_check_repo(from_repo)))
        path = _with_query(f"/v2/{repo}/blobs/uploads/", mount=_check_digest(digest), **{"from": from_repo})
        response = self._request("POST", path, scopes=scopes, ok=(201, 202))
        response.close()
        if response.status_code == 201:
            return True
        self._cancel_upload(response.headers.get("Location"), repo)
        return False

    def copy_blob(self, repo: str, digest: str, from_repo: str, size: int | None = None) -> str:
        """Put blob ``digest`` of ``from_repo`` into ``repo``: mount, else stream it across."""
        if self.blob_exists(repo, digest) is not None or self.mount_blob(repo, digest, from_repo):
            return digest
        with self.open_blob(from_repo, digest, size) as stream:
            return self.upload_blob(repo, stream, digest=digest, size=size)

    def upload_blob(self, repo: str, source: bytes | BinaryIO | Iterable[bytes], digest: str | None = None,
                    size: int | None = None, *, trust_digest: bool = False) -> str:
        """Upload ``source`` (bytes, a binary file object or an iterable of bytes); returns its digest.

        With a known ``digest`` that the repository already has, nothing is sent. Small data goes
        in one PUT; a stream goes in PATCH chunks while its sha256 is computed, and the digest is
        sent with the closing PUT. A given ``digest``/``size`` is verified before that PUT, so a
        wrong blob is never committed. A broken chunk is resumed from the offset the registry
        reports; a lost upload session restarts from the beginning if ``source`` can seek.

        ``trust_digest=True`` (with a ``digest``) skips hashing the stream here: for a blob whose
        digest the caller has just computed itself. The registry still checks it at the closing PUT.
        """
        if trust_digest and digest is None:
            raise ValueError("trust_digest needs the digest")
        _check_repo(repo)
        if digest is not None:
            _check_digest(digest)
            if self.blob_exists(repo, digest) is not None:
                return digest
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self._upload_monolithic(repo, bytes(source), digest, size)
        seekable = getattr(source, "seekable", None)
        start = source.tell() if seekable and seekable() else None
        for restart in range(3):
            try:
                return self._upload_chunked(repo, self._chunks(source), digest, size, trust_digest=trust_digest)
            except _UploadLost as lost:
                if start is None or restart == 2:
                    raise RegistryTransientError(f"upload to {repo} lost its session and the source cannot be "
                                                 f"rewound: {lost}") from None
                log.warning("upload to %s lost its session (%s); restarting", repo, lost)
                source.seek(start)
        raise AssertionError("unreachable")

    def _chunks(self, source: BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
        """Chunks of at least ``chunk_size`` bytes (the last may be shorter), with as few copies as
        possible: a PATCH may have any length, so pieces are joined, never split."""
        if hasattr(source, "read"):
            pieces: Iterable[bytes] = iter(lambda: source.read(self.chunk_size), b"")
        else:
            pieces = source
        parts: list[bytes] = []
        length = 0
        for piece in pieces:
            if piece:
                parts.append(piece)
                length += len(piece)
            if length >= self.chunk_size:
                chunk = b"".join(parts)  # a single full read is passed on without a copy
                parts, length = [], 0  # drop the pieces before the chunk is sent
                yield chunk
                del chunk  # the caller is done with it: free it before building the next one
        if parts:
            yield b"".join(parts)

    def _verify_upload(self, repo: str, computed: str, length: int, digest: str | None, size: int | None) -> None:
        if digest is not None and digest != computed:
            raise DigestMismatchError(f"upload to {repo}: data has digest {computed}, expected {digest}")
        if size is not None and size != length:
            raise DigestMismatchError(f"upload to {repo}: data has {length} bytes, expected {size}")

    def _start_upload(self, repo: str) -> str:
        response = self._request("POST", f"/v2/{repo}/blobs/uploads/", scopes=_push(repo), ok=(202,))
        response.close()
        return self._location(response, repo)

    def _location(self, response: requests.Response, repo: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryPermanentError(f"upload to {repo}: the registry sent no Location header")
        return urljoin(self.base, location)

    def _cancel_upload(self, location: str | None, repo: str) -> None:
        if not location:
            return
        try:
            self._request("DELETE", urljoin(self.base, location), scopes=_push(repo), ok=(204, 200, 202),
                          allow=(404,), retry=False).close()
        except RegistryError as err:  # the registry purges stale uploads itself; do not mask the cause
            log.warning("could not cancel upload session in %s: %s", repo, err)

    def _upload_monolithic(self, repo: str, data: bytes, digest: str | None, size: int | None) -> str:
        computed = _digest_of(data)
        self._verify_upload(repo, computed, len(data), digest, size)
        location = self._start_upload(repo)
        self._commit(repo, location, computed, data)
        return computed

    def _commit(self, repo: str, location: str, digest: str, data: bytes = b"") -> None:
        try:
            response = self._request("PUT", _with_query(location, digest=digest), scopes=_push(repo),
                                     headers={"Content-Type": "application/octet-stream"}, data=data, ok=(201, 204))
        except NotFoundError:
            # The commit may have landed before a retried request; the blob then exists.
            if self.blob_exists(repo, digest) is None:
                raise
            return
        response.close()
        claimed = response.headers.get("Docker-Content-Digest")
        if claimed and claimed != digest:
            raise DigestMismatchError(f"upload to {repo}: registry stored {claimed}, we sent {digest}")

    def _upload_chunked(self, repo: str, chunks: Iterator[bytes], digest: str | None, size: int | None, *,
                        trust_digest: bool = False) -> str:
        hasher = None if trust_digest else hashlib.sha256()
        pending = [next(chunks, b"")]
        if len(pending[0]) < self.chunk_size:  # the whole source fitted in one chunk: one PUT is cheaper
            return self._upload_monolithic(repo, pending[0], digest, size)
        location = self._start_upload(repo)
        offset = 0
        try:
            for chunk in self._drain(pending, chunks):
                location = self._patch(repo, location, chunk, offset)
                if hasher is not None:
                    hasher.update(chunk)
                offset += len(chunk)
                del chunk  # let the generator free this chunk before it builds the next
            computed = f"sha256:{hasher.hexdigest()}" if hasher is not None else str(digest)
            self._verify_upload(repo, computed, offset, digest, size)
        except (RegistryError, _UploadLost):  # never leave an upload session open behind us
            self._cancel_upload(location, repo)
            raise
        self._commit(repo, location, computed)
        return computed

    @staticmethod
    def _drain(pending: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
        while pending:
            yield pending.pop(0)
        yield from rest

    def _patch(self, repo: str, location: str, chunk: bytes, offset: int) -> str:
        """Send ``chunk`` at ``offset``; on failure ask the registry how much arrived and send the rest."""
        sent = 0
        failures = 0
        while True:
            body = chunk[sent:]
            start = offset + sent
            headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{start + len(body) - 1}"}
            try:
                response = self._request("PATCH", location, scopes=_push(repo), headers=headers, data=body,
                                         ok=(202,), allow=(416,), retry=False)
                response.close()
                if response.status_code == 202:
                    return self._location(response, repo)
                cause = "416 range not satisfiable"
            except RegistryTransientError as err:
                cause = str(err)
            except NotFoundError as err:
                raise _UploadLost(str(err)) from None
            failures += 1
            if failures >= self.retry.attempts:
                raise RegistryTransientError(f"upload to {repo}: chunk at {offset} kept failing: {cause}")
            time.sleep(min(self.retry.initial * 2 ** (failures - 1), self.retry.max_wait))
            location, received = self._upload_status(repo, location)
            if not offset <= received <= offset + len(chunk):
                raise _UploadLost(f"registry holds {received} bytes, expected {offset}..{offset + len(chunk)}")
            sent = received - offset
            if sent == len(chunk):
                return location

    def _upload_status(self, repo: str, location: str) -> tuple[str, int]:
        try:
            response = self._request("GET", location, scopes=_push(repo), ok=(204, 200))
        except NotFoundError as err:
            raise _UploadLost(str(err)) from None
        response.close()
        end = response.headers.get("Range", "0-0").rpartition("-")[2]
        # Distribution reports "0-0" for an empty upload and "0-(n-1)" after n bytes.
        received = int(end) + 1 if response.headers.get("Range", "0-0") != "0-0" else 0
        return self._location(response, repo), received


class _UploadLost(Exception):
    """The registry no longer knows the upload session (or holds bytes we cannot account for)."""


class BlobReader(io.RawIOBase):
    """A verified, resumable stream of one blob. Use as a file object or iterate for chunks."""

    def __init__(self, client: RegistryClient, repo: str, digest: str, size: int | None):
        super().__init__()
        self._client, self.repo, self.digest, self.size = client, repo, digest, size
        self._hasher = hashlib.new(digest.split(":", 1)[0])
        self.offset = 0
        self._done = False
        self._response = client._open_blob_response(repo, digest, 0)
        length = self._response.headers.get("Content-Length")
        if size is None and length is not None and "Content-Encoding" not in self._response.headers:
            self.size = int(length)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._done:
            return 0
        failures = 0
        while True:
            try:
                n = self._response.raw.readinto(buffer)
                break
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as err:
                failures += 1
                if failures >= self._client.retry.attempts:
                    raise RegistryTransientError(f"download of {self.repo}@{self.digest} broke at "
                                                 f"{self.offset} bytes: {err}") from None
                log.warning("download of %s@%s broke at %d bytes (%s); resuming", self.repo, self.digest,
                            self.offset, err)
                time.sleep(min(self._client.retry.initial * 2 ** (failures - 1), self._client.retry.max_wait))
                self._resume()
        if n == 0:
            self._finish()
            return 0
        self._hasher.update(memoryview(buffer)[:n])
        self.offset += n
        if self.size is not None and self.offset > self.size:
            self._done = True
            raise DigestMismatchError(f"{self.repo}@{self.digest}: more than the expected {self.size} bytes")
        return n

    def _resume(self) -> None:
        self._response.close()
        response = self._client._open_blob_response(self.repo, self.digest, self.offset)
        if response.status_code == 200:  # the server ignored Range: skip what we already have
            skip = self.offset
            while skip:
                got = response.raw.read(min(skip, READ_SIZE))
                if not got:
                    raise RegistryTransientError(f"download of {self.repo}@{self.digest}: resumed body too short")
                skip -= len(got)
        elif not response.headers.get("Content-Range", "").startswith(f"bytes {self.offset}-"):
            response.close()
            raise RegistryPermanentError(f"{self.repo}@{self.digest}: registry answered a Range request "
                                         f"for offset {self.offset} with {response.headers.get('Content-Range')!r}")
        self._response = response

    def _finish(self) -> None:
        self._done = True
        self._response.close()
        actual = f"{self._hasher.name}:{self._hasher.hexdigest()}"
        if self.size is not None and self.offset != self.size:
            raise DigestMismatchError(f"{self.repo}@{self.digest}: got {self.offset} bytes, expected {self.size}")
        if actual != self.digest:
            raise DigestMismatchError(f"{self.repo}@{self.digest}: content has digest {actual}")

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(READ_SIZE):
            yield chunk

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()
