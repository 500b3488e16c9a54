"""Shared pytest fixtures: real registries (three auth variants), a notification receiver,
an OCI image builder and a skopeo pusher. Everything binds to 127.0.0.1 on free ports.

Fixtures (all function-scoped; a registry starts in ~50 ms):
  registry               plain HTTP, anonymous
  registry_tls_basic     HTTPS (throwaway CA: ``.ca_file``, ``.cert_dir``) + htpasswd (alice/wonderland)
  registry_token         plain HTTP + bearer tokens from an in-process token server (alice/wonderland)
  registry_factory       ``registry_factory(auth=..., tls=..., notifications=[Endpoint(...)], ...)``
  event_receiver         a started ``Receiver``; point ``Endpoint(url=event_receiver.url)`` at it
  oci_image_builder      ``oci_image_builder(images, name=..., kind="oci"|"docker", attestation=...)``
  push_image             ``push_image(built, registry, "repo:tag", format=None, all_platforms=True)``
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.harness import oci
from tests.harness.receiver import Receiver
from tests.harness.registry import Registry, start_registry

# Property-based tests explore new examples on developer machines; CI replays a fixed derivation so a
# red CI run always reproduces (failures found locally are kept in .hypothesis/ and replayed first).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    started: list[Registry] = []
    counter = itertools.count()

    def factory(**options) -> Registry:
        reg = start_registry(tmp_path / f"registry-{next(counter)}", **options)
        started.append(reg)
        return reg

    yield factory
    for reg in started:
        reg.stop()


@pytest.fixture
def registry(registry_factory) -> Registry:
    return registry_factory()


@pytest.fixture
def registry_tls_basic(registry_factory) -> Registry:
    return registry_factory(auth="htpasswd", tls=True)


@pytest.fixture
def registry_token(registry_factory) -> Registry:
    return registry_factory(auth="token")


@pytest.fixture
def event_receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def oci_image_builder(tmp_path: Path) -> Callable[..., oci.BuiltImage]:
    def build(images, *, name: str = "latest", **options) -> oci.BuiltImage:
        return oci.build_layout(tmp_path / "layouts", images, name=name, **options)

    return build


@pytest.fixture
def push_image() -> Callable[..., str]:
    return oci.push_image


@pytest.fixture(params=["embedded", "redis"])
def queue_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Service environment for each queue backend (redis: a real redis-server for the test)."""
    if request.param == "embedded":
        yield {}
        return
    from tests.test_webhook_redis import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield {"OBD_WEBHOOK_QUEUE": "redis", "OBD_WEBHOOK_REDIS_URL": server.url}
    server.stop()
