"""References, WWW-Authenticate challenges and docker config.json credentials (no network)."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from converter.registry import (
    AuthError,
    Credentials,
    InvalidReferenceError,
    RegistryClient,
    load_docker_credentials,
    parse_reference,
)
from converter.registry.auth import parse_challenge

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "api_host"), [
    ("busybox", "docker.io", "library/busybox", None, None, "registry-1.docker.io"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "registry-1.docker.io"),
    ("docker.io/user/app:v1", "docker.io", "user/app", "v1", None, "registry-1.docker.io"),
    ("index.docker.io/nginx", "docker.io", "library/nginx", None, None, "registry-1.docker.io"),
    ("127.0.0.1:5000/team/app:v2", "127.0.0.1:5000", "team/app", "v2", None, "127.0.0.1:5000"),
    ("localhost/app", "localhost", "app", None, None, "localhost"),
    (f"reg.example.com/a/b/c@{DIGEST}", "reg.example.com", "a/b/c", None, DIGEST, "reg.example.com"),
    (f"reg.example.com:443/a:t@{DIGEST}", "reg.example.com:443", "a", "t", DIGEST, "reg.example.com:443"),
    ("user/app", "docker.io", "user/app", None, None, "registry-1.docker.io"),
])
def test_parse_reference(text, registry, repository, tag, digest, api_host) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.api_host) == (
        registry, repository, tag, digest, api_host)
    assert ref.ref == (digest or tag or "latest")
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("Reg.example.com/UPPER:v1", "invalid repository 'UPPER'"),
    ("host:5000/app:bad tag", "invalid tag 'bad tag'"),
    ("host:5000/app@sha256:123", "invalid digest 'sha256:123'"),
    ("host:5000/app:" + "t" * 129, "invalid tag"),
    ("host:5000/app:v\u00e9", "invalid tag"),  # the grammar's \w is ASCII
    ("host_x.com:5000/app", "invalid registry host 'host_x.com:5000'"),
])
def test_parse_reference_errors_name_the_part(text, message) -> None:
    with pytest.raises(InvalidReferenceError, match=message):
        parse_reference(text)


def test_docker_hub_host_is_normalised(tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"username": "hub", "password": "pw"}}}))
    with RegistryClient("docker.io", docker_config=config) as client:
        assert client.base == "https://registry-1.docker.io"
        assert client.credentials == Credentials("hub", "pw")


def test_with_tag() -> None:
    assert str(parse_reference("h:1/a:v1").with_tag("v1_obd")) == "h:1/a:v1_obd"


def test_parse_challenge() -> None:
    challenge = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                                'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token" and challenge.service == "reg"
    assert challenge.scopes == ["repository:a/b:pull,push", "repository:c:pull"]
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge("Negotiate abc") is None


def test_credentials_are_not_in_repr() -> None:
    creds = Credentials("alice", "s3cret", "tok3n")
    assert "s3cret" not in repr(creds) and "tok3n" not in repr(creds)
    assert Credentials.parse("bob:pa:ss") == Credentials("bob", "pa:ss")
    with pytest.raises(AuthError, match="USER:PASSWORD"):
        Credentials.parse("nopassword")


def _helper(tmp_path, name: str, body: str) -> None:
    script = tmp_path / "bin" / f"docker-credential-{name}"
    script.parent.mkdir(exist_ok=True)
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_docker_config_auths_helpers_and_store(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    # The helper echoes back the server it was asked about, proving the protocol's stdin.
    _helper(tmp_path, "test", 'read host; printf \'{"ServerURL":"%s","Username":"helper-%s","Secret":"pw"}\' '
                              '"$host" "$host"\n')
    _helper(tmp_path, "store", 'read host; echo "credentials not found in native keychain"; exit 1\n')
    _helper(tmp_path, "token", 'read host; echo \'{"Username":"<token>","Secret":"refresh-me"}\'\n')
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "auths": {"auths.example:5000": {"auth": base64.b64encode(b"alice:wonder:land").decode()},
                  "https://plain.example": {"username": "u", "password": "p"},
                  "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                  "bad.example": {"auth": "!!!"}},
        "credHelpers": {"helped.example": "test", "tok.example": "token"},
        "credsStore": "store",
    }))
    assert load_docker_credentials("auths.example:5000", config) == Credentials("alice", "wonder:land")
    assert load_docker_credentials("plain.example", config) == Credentials("u", "p")
    assert load_docker_credentials("registry-1.docker.io", config) == Credentials("hub", "pw")
    assert load_docker_credentials("helped.example", config) == Credentials("helper-helped.example", "pw")
    assert load_docker_credentials("tok.example", config) == Credentials(identity_token="refresh-me")
    assert load_docker_credentials("elsewhere.example", config) is None  # credsStore: not found
    assert load_docker_credentials("x", tmp_path / "missing.json") is None
    with pytest.raises(AuthError, match=r"'auth' entry for bad\.example"):
        load_docker_credentials("bad.example", config)
    config.write_text(json.dumps({"credHelpers": {"gone.example": "absent"}}))
    with pytest.raises(AuthError, match="docker-credential-absent"):
        load_docker_credentials("gone.example", config)
