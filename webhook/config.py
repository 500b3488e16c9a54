"""Service configuration: one frozen dataclass, loaded from YAML, then overridden by environment variables.

Every setting has an embedded default so `obd-webhook serve` works with no file at all. Environment
variables are `OBD_WEBHOOK_<KEY>` for top-level keys and `OBD_WEBHOOK_<SECTION>__<KEY>` for nested ones
(e.g. `OBD_WEBHOOK_RETRY__MAX_ATTEMPTS=3`); values are parsed as YAML scalars. `OBD_WEBHOOK_SECRETS` is a
comma-separated list. `OBD_WEBHOOK_CONFIG` names the YAML file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets as secrets_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import yaml

from converter.options import ConvertOptions
from webhook.names import host_problem

ENV_PREFIX = "OBD_WEBHOOK_"
SECRET_FILE_NAME = "webhook-secret"
DEFAULT_SUFFIX = "_obd"
# Job option naming the tag of a second, TurboOCI output (the conversion turns it into a target Location).
TURBO_TAG_OPTION = "turbo_tag"
DEFAULT_TURBO_SUFFIX = "_turbo"
# gevent: one OS thread per HTTP process, requests as greenlets (about a third less CPU per event than
# gthread, whose request threads spend it handing the GIL to each other); gthread: plain threads.
HTTP_WORKER_CLASSES = ("gevent", "gthread")
# ConvertOptions fields that belong to one run or to the service, not to a rule.
NOT_RULE_OPTIONS = frozenset({"registry", "progress", "cancel", "upload", "reserve", "turbo_oci", "turbo_target",
                              TURBO_TAG_OPTION})


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 5
    max_total_seconds: float = 6 * 3600.0
    initial_backoff_seconds: float = 10.0
    max_backoff_seconds: float = 600.0
    jitter_seconds: float = 5.0


@dataclass(frozen=True)
class RegistrySettings:
    """One registry the service may contact (the key of `registries:` is its host[:port]), and how."""

    endpoint: str | None = None  # e.g. "http://127.0.0.1:5000"; default https://<host>
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False  # plain HTTP / unverified TLS; never the default
    aliases: tuple[str, ...] = ()  # other host[:port] names events may use for this registry

    def client_options(self) -> dict[str, Any]:
        """The settings as the converter's `RegistryOptions` mapping (aliases are the service's)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "aliases"}


@dataclass(frozen=True)
class Rule:
    """Which pushes to convert and how. `registries` are host[:port] patterns (`*`/`?` never match `/`);
    repository and tag globs use fnmatch."""

    name: str = "default"
    registries: tuple[str, ...] = ("*",)
    repositories: tuple[str, ...] = ("*",)
    exclude_repositories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ("*",)
    tag_regex: str | None = None
    exclude_tags: tuple[str, ...] = ()
    suffix: str = DEFAULT_SUFFIX
    options: Mapping[str, Any] = field(default_factory=dict)
    overlaybd: bool = True  # publish the native overlaybd output as <tag><suffix>
    turbo_oci: bool = False  # publish a TurboOCI output as <tag><turbo_suffix>
    turbo_suffix: str = DEFAULT_TURBO_SUFFIX
    delete_mirror: bool = False  # deleting <tag> deletes the outputs this service created for it

    @property
    def output_suffixes(self) -> tuple[str, ...]:
        """The tag suffixes this rule publishes (native first). Loop checks, delete mirroring and the
        stale report all go through this one list."""
        return ((self.suffix,) if self.overlaybd else ()) + ((self.turbo_suffix,) if self.turbo_oci else ())

    def job_target(self, tag: str) -> tuple[str, dict[str, Any]]:
        """(target tag, conversion options) of a job for this rule's outputs: the native tag, with the turbo
        image's tag under TURBO_TAG_OPTION when both are on; or the turbo tag alone. The job's registry and
        repository travel with the job, so only the tag is recorded here (see webhook.conversion)."""
        options = dict(self.options)
        if not self.overlaybd:
            return tag + self.turbo_suffix, {**options, "turbo_oci": True}
        if self.turbo_oci:
            options[TURBO_TAG_OPTION] = tag + self.turbo_suffix
        return tag + self.suffix, options


@dataclass(frozen=True)
class BackfillSettings:
    """How backfills and stale reports walk a registry."""

    requests_per_second: float = 10.0  # registry calls per second per run; 0 = unlimited
    page_size: int = 100  # catalog and tag list entries asked for per page (`n=`)
    batch_size: int = 100  # jobs recorded per store transaction


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:8080"
    data_dir: Path = field(default_factory=lambda: platformdirs.user_data_path("obd-webhook"))
    secrets: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 1024 * 1024
    workers: int = 1
    http_workers: int = 2
    http_worker_class: str = "gevent"
    http_threads: int = 8  # gthread worker class only
    http_connections: int = 1000  # gevent worker class only: concurrent connections per process
    queue: str = "embedded"
    redis_url: str | None = None
    lease_seconds: float = 60.0
    poll_interval_seconds: float = 1.0
    shutdown_grace_seconds: float = 30.0
    event_retention_days: float = 7.0
    job_retention_days: float = 30.0  # finished jobs (and their attempt logs) are deleted after this; 0 = never
    sqlite_synchronous: str = "NORMAL"
    retry: RetrySettings = field(default_factory=RetrySettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    rules: tuple[Rule, ...] = (Rule(),)
    registries: Mapping[str, RegistrySettings] = field(default_factory=dict)
    converter_actors: tuple[str, ...] = ()
    converter_user_agents: tuple[str, ...] = ("obd-autoconvert",)
    convert_callable: str = "webhook.conversion:default_convert"
    metrics_require_auth: bool = True
    log_format: str = "auto"
    log_level: str = "INFO"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def secret_file(self) -> Path:
        return self.data_dir / SECRET_FILE_NAME

    @property
    def output_suffixes(self) -> tuple[str, ...]:
        # Every suffix a rule publishes, plus each native suffix even where overlaybd is off (outputs made
        # before it was turned off keep that name): a tag ending in one is never a source.
        return tuple(sorted({s for rule in self.rules for s in (rule.suffix, *rule.output_suffixes)}))


def _tuple_of_str(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a string or a list of strings, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Instantiate a settings dataclass from a mapping, rejecting unknown keys and wrong scalar types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        default = getattr(cls(), key) if cls is not Config else getattr(_DEFAULT_CONFIG, key)
        kwargs[key] = _coerce(cls, key, value, default, name)
    return cls(**kwargs)


def _coerce(cls: type, key: str, value: Any, default: Any, name: str) -> Any:
    if cls is Config and key == "retry":
        return _build(RetrySettings, value, name)
    if cls is Config and key == "backfill":
        return _build(BackfillSettings, value, name)
    if cls is Config and key == "rules":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{name}: expected a non-empty list of rules")
        return tuple(_build_rule(item, f"{name}[{i}]") for i, item in enumerate(value))
    if cls is Config and key == "registries":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping of host -> settings")
        return {str(host): _build(RegistrySettings, s or {}, f"{name}.{host}") for host, s in value.items()}
    if cls is Config and key == "data_dir":
        return Path(str(value)).expanduser()
    if isinstance(default, tuple):
        return _tuple_of_str(value, name)
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative number, got {value!r}")
        return float(value)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _build_rule(data: Any, where: str) -> Rule:
    rule = _build(Rule, data, where)
    if rule.tag_regex is not None:
        try:
            re.compile(rule.tag_regex)
        except re.error as exc:
            raise ConfigError(f"{where}.tag_regex: invalid regular expression: {exc}") from exc
    for key in ("suffix", "turbo_suffix"):
        value = getattr(rule, key)
        if not value or "/" in value or ":" in value:
            raise ConfigError(f"{where}.{key}: must be a non-empty tag fragment, got {value!r}")
    if rule.turbo_oci and rule.turbo_suffix == rule.suffix:
        raise ConfigError(f"{where}.turbo_suffix: must differ from suffix {rule.suffix!r}")
    if not rule.output_suffixes:
        raise ConfigError(f"{where}: overlaybd and turbo_oci are both off; the rule would publish nothing")
    misplaced = sorted(set(rule.options) & NOT_RULE_OPTIONS)
    if misplaced:
        raise ConfigError(f"{where}.options: {', '.join(misplaced)} cannot be set per rule")
    try:
        # The engine's own option type checks names and values, so a bad rule fails at startup
        # instead of killing every job it matches.
        ConvertOptions.coerce(dict(rule.options))
    except ValueError as exc:
        raise ConfigError(f"{where}.options: {exc}") from exc
    return rule


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Turn OBD_WEBHOOK_* variables into a nested mapping shaped like the YAML file."""
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path == ["secrets"]:
            value: Any = [s.strip() for s in raw.split(",") if s.strip()]
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{name}: cannot parse value: {exc}") from exc
            if path[-1] in {"listen", "data_dir", "redis_url", "password", "username", "endpoint", "queue"}:
                value = raw  # never reinterpret these as numbers/booleans
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another override")
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "rules":
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (`path`, else `$OBD_WEBHOOK_CONFIG`, else none) and apply env overrides."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = dict(loaded or {})
    data = _merge(data, _env_overrides(env))
    config = _build(Config, data, "")
    return validate(config)


def validate(config: Config) -> Config:
    if ":" not in config.listen:
        raise ConfigError(f"listen: expected HOST:PORT, got {config.listen!r}")
    try:
        port = config.port
    except ValueError as exc:
        raise ConfigError(f"listen: port is not a number in {config.listen!r}") from exc
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen: port out of range in {config.listen!r}")
    if config.queue not in {"embedded", "redis"}:
        raise ConfigError(f"queue: expected 'embedded' or 'redis', got {config.queue!r}")
    if config.queue == "redis" and not (config.redis_url or "").startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis_url: queue 'redis' needs redis_url, e.g. redis://127.0.0.1:6379/0")
    if config.http_worker_class not in HTTP_WORKER_CLASSES:
        raise ConfigError(f"http_worker_class: expected one of {', '.join(HTTP_WORKER_CLASSES)}, "
                          f"got {config.http_worker_class!r}")
    if config.sqlite_synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
        raise ConfigError("sqlite_synchronous: expected NORMAL, FULL or EXTRA")
    if config.log_format not in {"auto", "json", "text"}:
        raise ConfigError("log_format: expected auto, json or text")
    if config.backfill.page_size < 1 or config.backfill.batch_size < 1:
        raise ConfigError("backfill.page_size and backfill.batch_size: must be at least 1")
    if config.retry.max_attempts < 1:
        raise ConfigError("retry.max_attempts: must be at least 1")
    if config.lease_seconds < 2:
        raise ConfigError("lease_seconds: must be at least 2")
    if config.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes: must be at least 1024")
    for host, settings in config.registries.items():
        for name in (host, *settings.aliases):
            if (problem := host_problem(name)) is not None:
                raise ConfigError(f"registries.{host}: {problem}")
    for index, rule in enumerate(config.rules):
        for pattern in rule.registries:
            if "/" in pattern or not pattern:
                raise ConfigError(f"rules[{index}].registries: {pattern!r} is not a host[:port] pattern")
    for secret in config.secrets:
        if len(secret) < 16 or not secret.isascii() or any(c.isspace() for c in secret):
            raise ConfigError("secrets: every secret must be >= 16 printable ASCII characters without spaces")
    return config


def ensure_secret(config: Config) -> tuple[Config, str | None]:
    """Give the config a secret: the configured ones, else the data dir's file, else a new random one.

    Returns the config and the newly generated secret (None if nothing was generated), so the caller
    can print it exactly once.
    """
    if config.secrets:
        return config, None
    config.data_dir.mkdir(parents=True, exist_ok=True)
    path = config.secret_file
    if path.exists():
        stored = path.read_text(encoding="ascii").strip()
        if not stored:
            raise ConfigError(f"{path}: secret file is empty; delete it to generate a new secret")
        return dataclasses.replace(config, secrets=(stored,)), None
    new = secrets_module.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(new + "\n")
    return dataclasses.replace(config, secrets=(new,)), new


_DEFAULT_CONFIG = Config()
