"""config.toml -> typed, validated settings.

Every section is a pydantic model with ``extra="forbid"`` so that a misspelt key is an
error naming the key instead of a silently ignored setting. Paths are resolved relative
to the config file, because a daemon started by systemd has no meaningful working
directory. ``TRIAGED_<SECTION>__<KEY>`` environment variables override file values
(the container and systemd units use them for secrets and ports).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A user mistake in the configuration: reported as one line, exit status 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """Certificate, key and (for mutual TLS) the CA that client certificates must chain to."""

    cert: Path
    key: Path
    ca: Path | None = None


class DicomSettings(_Section):
    ae_title: str = Field(default="TRIAGED", min_length=1, max_length=16)
    bind: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    tls: TLSSettings | None = None
    max_pdu: int = Field(default=131_072, ge=0)
    max_associations: int = Field(default=16, ge=1)
    network_timeout: float = Field(default=60.0, gt=0)
    #: Connections that have connected but not yet associated; more are closed at once.
    max_pending_connections: int = Field(default=16, ge=1)
    #: Seconds a connection gets to complete TLS and association; then it is closed.
    acse_timeout: float = Field(default=30.0, gt=0)
    #: Speed-ups that patch pynetdicom internals (reactor wake-up, 0.1 ms DUL poll).
    fast_path: bool = True

    @field_validator("ae_title")
    @classmethod
    def _ae_chars(cls, v: str) -> str:
        if "\\" in v or any(ord(c) < 32 for c in v) or not v.strip():
            raise ValueError("an AE title is 1-16 printable characters without backslash")
        return v.strip()

    @field_validator("allowed_calling_aets")
    @classmethod
    def _strip_aets(cls, v: list[str]) -> list[str]:
        return [a.strip() for a in v]


class StorageSettings(_Section):
    spool_dir: Path = Path("var/spool")
    results_dir: Path = Path("var/results")
    min_free_mb: int = Field(default=1024, ge=0)
    max_instance_mb: int = Field(
        default=1024, ge=0, description="largest instance taken, on the wire or inflated; 0 = any"
    )
    max_inflated_mb: int = Field(
        default=256,
        ge=0,
        description="largest size a Deflated dataset may inflate to (it is inflated again in "
        "memory when scored; deflate carries small objects, a ratio of 1000:1 is a bomb); 0 = any",
    )
    retention_days: int = Field(default=0, ge=0, description="0 keeps studies forever")


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/triaged.db"

    @field_validator("url")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if not (v.startswith("sqlite:") or v.startswith("postgresql")):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        return v


class AssemblySettings(_Section):
    quiet_seconds: float = Field(default=30.0, gt=0)
    max_wait_seconds: float = Field(default=600.0, gt=0)
    sweep_seconds: float = Field(default=2.0, gt=0)


class DestinationTLS(TLSSettings):
    """TLS to a destination: ``ca`` (else the system trust store) verifies the PACS.

    The PACS certificate must also name ``host`` (DNS or IP subject alternative name);
    ``verify_hostname = false`` accepts any certificate that chains to the trust anchors,
    for a PACS whose certificate does not carry the name it is reached by.
    """

    verify_hostname: bool = True


class Destination(_Section):
    name: str = Field(min_length=1)
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLS | None = None


class DeliverySettings(_Section):
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)


class WorkerSettings(_Section):
    in_process: int = Field(default=1, ge=0, description="workers that `serve` runs itself")
    lease_seconds: float = Field(default=300.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    # one thread per worker: on 2 cores two threads per process collapse under contention,
    # and the SCP and the web page keep the other core (docs/nets.md)
    torch_threads: int = Field(default=1, ge=0, description="0 = torch default")


class WebUser(_Section):
    name: str
    role: Literal["radiologist", "admin"]
    password_hash: str


class WebSettings(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    secret_key: str = ""
    users: list[WebUser] = Field(default_factory=list)
    session_hours: float = Field(default=12.0, gt=0)
    # Login throttling (docs/deploy.md "Security"): per client address, failures beyond
    # login_failures_allowed within login_window_minutes are answered 429 for
    # login_backoff_seconds, doubling per further failure up to login_backoff_max_seconds.
    # Per account only a short delay (never a refusal), so nobody can lock a user out.
    login_failures_allowed: int = Field(default=5, ge=1)
    login_window_minutes: float = Field(default=60.0, gt=0)
    login_backoff_seconds: float = Field(default=30.0, gt=0)
    login_backoff_max_seconds: float = Field(default=900.0, gt=0)
    login_account_delay_max_seconds: float = Field(default=2.0, ge=0)
    # Addresses (or CIDR networks) of reverse proxies whose X-Forwarded-For/-Proto are
    # believed; empty: those headers are ignored and the TCP peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Secure flag on cookies: "auto" = when the request came over HTTPS (triaged's own
    # TLS, or X-Forwarded-Proto from a trusted proxy); true/false force it.
    secure_cookies: Literal["auto"] | bool = "auto"
    open_health: bool = True
    open_metrics: bool = True
    tls: TLSSettings | None = None

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (a proxy's "
                    "address; '*' would let any client pick its address)"
                ) from None
        return [e.strip() for e in v]

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in _REPLACED_WEB_KEYS.items():
                if old in data:
                    raise ValueError(f"[web] {old} was replaced by {new} (see docs/deploy.md)")
        return data


_REPLACED_WEB_KEYS = {
    "max_failed_logins": "login_failures_allowed (per client address)",
    "lockout_minutes": "login_backoff_seconds / login_backoff_max_seconds (no lockout any more)",
}


class ModelSettings(_Section):
    store: Path = Path("models")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RetrainSettings(_Section):
    enabled: bool = False
    cron: str = "0 2 * * 0"
    args: list[str] = Field(default_factory=list)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Patient data (IDs, names, accession numbers, SQL parameters, database error details)
    # stays out of every log line unless this is on: a debugging aid, never in production.
    phi: bool = False


class Settings(_Section):
    """The whole daemon configuration; ``path`` is the file it came from, if any."""

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    destinations: list[Destination] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    pipelines: list[Path] = Field(default_factory=lambda: [Path("pipelines/covid-ct.toml")])
    path: Path | None = None


ENV_PREFIX = "TRIAGED_"


def _env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """Apply ``TRIAGED_SECTION__KEY=value``; values are parsed as TOML literals if they can be."""
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            parsed: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: {part} is not a section")
        node[parts[-1]] = parsed
    return raw


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the offending key, for config and pipeline files alike."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if first["type"] == "missing":
        return f"missing key '{where}'"
    if not where:
        return msg
    return f"invalid value for '{where}': {msg}"


def read_toml(path: Path, error: type[Exception], what: str = "file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file raises ``error`` with one line."""
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid TOML: {err}") from None


def _resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_sqlite(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == "sqlite:///:memory:":
        return url
    rest = url[len(prefix) :]
    if rest.startswith("/"):
        return url
    return prefix + str(_resolve(Path(rest), base))


def _with_paths(settings: Settings, base: Path) -> Settings:
    """Return settings whose relative paths are anchored at ``base`` (the config's folder)."""

    def tls(t: TLSSettings | None) -> TLSSettings | None:
        if t is None:
            return None
        return t.model_copy(
            update={
                "cert": _resolve(t.cert, base),
                "key": _resolve(t.key, base),
                "ca": _resolve(t.ca, base) if t.ca else None,
            }
        )

    return settings.model_copy(
        update={
            "dicom": settings.dicom.model_copy(update={"tls": tls(settings.dicom.tls)}),
            "web": settings.web.model_copy(update={"tls": tls(settings.web.tls)}),
            "storage": settings.storage.model_copy(
                update={
                    "spool_dir": _resolve(settings.storage.spool_dir, base),
                    "results_dir": _resolve(settings.storage.results_dir, base),
                }
            ),
            "database": settings.database.model_copy(
                update={"url": _resolve_sqlite(settings.database.url, base)}
            ),
            "models": settings.models.model_copy(
                update={"store": _resolve(settings.models.store, base)}
            ),
            "destinations": [
                d.model_copy(update={"tls": tls(d.tls)}) for d in settings.destinations
            ],
            "pipelines": [_resolve(p, base) for p in settings.pipelines],
        }
    )


def from_dict(raw: dict[str, Any], base: Path, environ: dict[str, str] | None = None) -> Settings:
    """Validate a parsed config; ``base`` anchors relative paths."""
    raw = _env_overrides(dict(raw), dict(os.environ) if environ is None else environ)
    raw.pop("path", None)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None
    return _with_paths(settings, base)


def load(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Settings:
    """Read and validate ``path``; None gives the defaults anchored at the working directory."""
    if path is None:
        return from_dict({}, Path.cwd(), environ)
    p = Path(path)
    raw = read_toml(p, ConfigError, "config file")
    try:
        settings = from_dict(raw, p.resolve().parent, environ)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None
    return settings.model_copy(update={"path": p.resolve()})
