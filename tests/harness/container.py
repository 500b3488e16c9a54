"""The container image as an operator builds and runs it, with Debian's podman and no image registry.

Docker Hub cannot be reached from these machines, so the Dockerfile's base (`PYTHON_IMAGE`) is a Debian
bookworm made by `debootstrap` with Python (what `python:3.11-slim-bookworm` is) and imported with
`podman import`. The facts of this kernel and network decide the flags (README "Run it in a container"):

* cgroup v1 and v2 are mounted together, which crun refuses: `--isolation chroot` to build, `--runtime
  runc` to run;
* the default rlimits cannot be raised: `--ulimit nofile=20000:20000 --ulimit nproc=32768:32768`;
* pip reaches the package index through a TLS-intercepting proxy whose CA is in the host's bundle: the
  bundle is mounted read-only into the build (`--volume`), never copied into the image;
* `--format docker` keeps the HEALTHCHECK (the OCI image format has no field for it).

Every command is built by a function here so that the README's commands and the tests' are the same
(tests/test_container.py compares them).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.harness.cache import cache_dir, cached_path, key_of, locked

ROOT = Path(__file__).resolve().parents[2]
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the official python images set; an imported root filesystem has no environment at all.
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
# `serve` gives running conversions shutdown_grace_seconds (30 s) and kills what is left 10 s later;
# the runtime must wait longer than that before its SIGKILL (podman and docker wait 10 s by default).
STOP_TIMEOUT_SECONDS = 60
# What the image build reads (the Dockerfile's COPY lines); a change here means a new image tag.
BUILD_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "gunicorn.conf.py", "converter",
                "webhook")


def debootstrap_command(rootfs: str, mirror: str = DEBIAN_MIRROR) -> list[str]:
    return ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, rootfs, mirror]


def import_command(image: str, tarball: str = "-") -> list[str]:
    changes = [arg for env in BASE_ENV for arg in ("--change", f"ENV {env}")]
    return ["podman", "import", *changes, tarball, image]


def build_command(image: str, base_image: str, context: str = ".") -> list[str]:
    return ["podman", "build", "--isolation", "chroot", "--format", "docker",
            "--build-arg", f"PYTHON_IMAGE={base_image}",
            "--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
            "--tag", image, context]


CONFIG_IN_CONTAINER = "/etc/obd-autoconvert/config.yml"


def tar_command(rootfs: str, tarball: str) -> list[str]:
    return ["tar", "-C", rootfs, "--numeric-owner", "--one-file-system", "-cf", tarball, "."]


def run_command(image: str, name: str, *, volume: str, config: str | None = None,
                env: Mapping[str, str] | None = None, network_host: bool = False, publish: str | None = None,
                args: Sequence[str] = ()) -> list[str]:
    """`podman run` of the service: `volume` at /data, `config` (a host file) as its configuration file."""
    argv = ["podman", "run", "--detach", "--name", name, *RUN_FLAGS, "--stop-timeout", str(STOP_TIMEOUT_SECONDS)]
    if network_host:
        argv += ["--network", "host"]
    if publish:
        argv += ["--publish", publish]
    argv += ["--volume", f"{volume}:/data"]
    if config:
        argv += ["--volume", f"{config}:{CONFIG_IN_CONTAINER}:ro", "--env", f"OBD_WEBHOOK_CONFIG={CONFIG_IN_CONTAINER}"]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, image, *args]


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def base_image() -> str:
    """The Debian+Python base, imported into podman from a root filesystem tarball in the test cache
    (debootstrapped on the first run on a machine: about a minute)."""
    key = key_of(BASE_SUITE, DEBIAN_MIRROR, *BASE_PACKAGES, *BASE_ENV)
    image = f"localhost/obd-test-python:{BASE_SUITE}-{key}"
    if _image_exists(image):
        return image
    tarball = cached_path(f"base-{BASE_SUITE}-{key}.tar", _debootstrap_tarball)
    podman(*import_command(image, str(tarball))[1:], timeout=300)
    return image


def _debootstrap_tarball(partial: Path) -> None:
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir()))
    try:
        result = subprocess.run(debootstrap_command(str(rootfs)), capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            log = rootfs / "debootstrap" / "debootstrap.log"
            detail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"debootstrap failed ({result.returncode}):\n{result.stderr[-3000:]}\n{detail}")
        # Downloaded packages and package lists are not part of an image.
        for cached in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            cached.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        subprocess.run(tar_command(str(rootfs), str(partial)), check=True, timeout=300)
    finally:
        _remove_rootfs(rootfs)


def _remove_rootfs(rootfs: Path) -> None:
    """debootstrap mounts /proc and /sys (and may bind /dev) inside the target and leaves them mounted when
    it fails: unmount them first, so that removing the tree can never reach the host's files."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    inside = sorted((p for p in points if p.startswith(f"{rootfs}/")), key=len, reverse=True)
    for point in inside:
        subprocess.run(["umount", "--lazy", point], check=False)
    with open("/proc/self/mounts") as mounts:
        if any(line.split()[1].startswith(f"{rootfs}/") for line in mounts):
            raise AssertionError(f"{rootfs} still has mounts; not removing it")
    shutil.rmtree(rootfs, ignore_errors=True)


def build_inputs_key(root: Path = ROOT) -> str:
    """A digest of every file the image is built from."""
    digest = hashlib.sha256()
    for name in BUILD_INPUTS:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_image(root: Path = ROOT) -> tuple[str, str]:
    """Build the Dockerfile as the README says; returns (image, build log). The tag names the content, so
    an unchanged tree reuses podman's layer cache; what earlier test builds left is removed."""
    image = f"localhost/obd-autoconvert-test:{build_inputs_key(root)}"
    base = base_image()
    with locked("podman-test-images"):
        result = subprocess.run(build_command(image, base), cwd=root, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise AssertionError(f"podman build failed ({result.returncode}):\n{result.stdout[-5000:]}\n"
                                 f"{result.stderr[-3000:]}")
        _remove_earlier_builds(image, re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})$", result.stdout, re.M))
    return image, result.stdout + result.stderr


def _remove_earlier_builds(image: str, layer_ids: list[str]) -> None:
    """Each build leaves a chain of untagged layer images (the build stage's too); a new content key makes
    the previous chain garbage. The IDs our builds made are recorded in the cache, so only those are ever
    removed, newest first (a parent goes once its children are gone); one still in use is kept for later."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/obd-autoconvert-test").stdout
    for older in listed.split():
        if older != image:
            podman("rmi", older, check=False)
    record = cache_dir() / "podman-test-images.json"
    current = list(dict.fromkeys(i[:11] for i in layer_ids))  # podman build prints 11 hex digits, or all 64
    earlier = json.loads(record.read_text()) if record.exists() else []
    kept = []
    for layer in reversed([i for i in earlier if i not in current]):
        if podman("image", "exists", layer, check=False).returncode == 0 and \
                podman("rmi", layer, check=False).returncode != 0:
            kept.append(layer)
    record.write_text(json.dumps([*reversed(kept), *current]))


STANDINS = Path(__file__).resolve().parent / "standins"


def standin_images() -> dict[str, str]:
    """Local stand-ins for the compose example's `registry:2` and `redis:7` (Docker Hub is unreachable),
    built from Debian's packages on the base image: {"registry": image, "redis": image}."""
    base = base_image()
    images = {}
    for name in ("registry", "redis"):
        containerfile = STANDINS / f"{name}.Containerfile"
        image = f"localhost/obd-test-standin-{name}:{key_of(base, containerfile.read_text())}"
        if not _image_exists(image):
            result = subprocess.run(["podman", "build", "--isolation", "chroot", "--build-arg", f"BASE_IMAGE={base}",
                                     "--tag", image, "--file", str(containerfile), str(STANDINS)],
                                    capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise AssertionError(f"building the {name} stand-in failed:\n{result.stdout[-3000:]}\n"
                                     f"{result.stderr[-2000:]}")
        images[name] = image
    return images
