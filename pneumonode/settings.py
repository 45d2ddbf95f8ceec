"""The node configuration: one validated settings tree from TOML and PNEUMONODE_* variables."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pneumonode.queue.retry import RetryPolicy

ENV_PREFIX = "PNEUMONODE_"
DEFAULT_PORT = 11112

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming key and rule."""


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError(f"an AE title has 1 to 16 characters, got {len(value)}: {value!r}")
    if not value.strip():
        raise ValueError("an AE title must not be only spaces")
    if "\\" in value or any(not (32 <= ord(c) < 127) for c in value):
        raise ValueError(f"an AE title is printable ASCII without backslash: {value!r}")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """[node]: how the node listens and where it keeps its data."""

    ae_title: AETitle = Field(default="PNEUMONODE", description="Our (called) AE title")
    host: str = Field(default="0.0.0.0", description="Address to listen on")  # noqa: S104
    port: Port = Field(default=DEFAULT_PORT, description="TCP port for DICOM")
    allowed_calling_aets: list[AETitle] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty = any",
    )
    data_dir: Path = Field(default=Path("pneumonode-data"), description="Spool, results, database")
    max_associations: int = Field(default=10, ge=1, le=1000)
    max_pdu_length: int = Field(default=65536, ge=0, le=2**32 - 1, description="0 = unlimited")
    check_peer_host: bool = Field(
        default=False,
        description="Calling AE must be a [[peers]] entry and connect from that peer's host",
    )
    max_instance_mb: int = Field(
        default=512, ge=1, description="Larger C-STORE datasets are refused (out of resources)"
    )
    min_free_disk_mb: int = Field(
        default=1024,
        ge=0,
        description="C-STORE is refused (out of resources) while data_dir has less free; 0 = off",
    )
    association_request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="ARTIM: a connection's whole association request must arrive within this",
    )
    pdu_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Every PDU must arrive whole within this after its first byte",
    )


class DatabaseSettings(_Section):
    """[database]: where the job table lives."""

    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/pneumonode.db",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite://", "postgresql")):
            raise ValueError(f"must be a sqlite:// or postgresql+psycopg:// URL, got {value!r}")
        return value


class ModelSettings(_Section):
    """[model]: the model package the node serves."""

    path: Path | None = Field(default=None, description="Model package folder; default: bundled")


class WorkerSettings(_Section):
    """[worker]: inference workers."""

    enabled: bool = Field(
        default=True, description="false: receive and queue only (maintenance, benchmarks)"
    )
    threads: int = Field(default=1, ge=1, le=64)
    batch_size: int = Field(default=4, ge=1, le=256, description="Most images inferred at once")
    batch_wait_ms: int = Field(default=20, ge=0, le=10_000, description="Wait to fill a batch")
    max_attempts: int = Field(default=3, ge=1, description="Processing attempts before failed")
    retry_base_delay_s: float = Field(default=10.0, gt=0)
    retry_max_delay_s: float = Field(default=600.0, gt=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    stale_after_s: float = Field(default=300.0, gt=0, description="Claim expiry without heartbeat")
    poll_s: float = Field(default=2.0, gt=0, description="Idle poll interval")
    max_pixels: int = Field(default=60_000_000, ge=1, description="Refuse larger images")
    inference_timeout_s: float = Field(
        default=300.0, gt=0, description="A batch's inference longer than this fails the batch"
    )

    def retry_policy(self) -> RetryPolicy:
        """The processing retry budget: failed attempts and expired claims both count."""
        return RetryPolicy(self.max_attempts, self.retry_base_delay_s, self.retry_max_delay_s)

    @model_validator(mode="after")
    def _stale_after_heartbeat(self) -> WorkerSettings:
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s}) must exceed 2 x heartbeat_s "
                f"({self.heartbeat_s})"
            )
        return self


class DeliverySettings(_Section):
    """[delivery]: sending results to destinations."""

    calling_ae_title: AETitle | None = Field(
        default=None, description="AE title we use when sending; default node.ae_title"
    )
    return_to_sender: bool = Field(
        default=False,
        description="Also send results to the calling AE, at its address in [[peers]]",
    )
    threads: int = Field(default=1, ge=1, le=64)
    max_attempts: int = Field(default=10, ge=1)
    retry_base_delay_s: float = Field(default=15.0, gt=0)
    retry_max_delay_s: float = Field(default=900.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)

    def retry_policy(self) -> RetryPolicy:
        """The delivery retry budget: failed sends and expired claims both count."""
        return RetryPolicy(self.max_attempts, self.retry_base_delay_s, self.retry_max_delay_s)


class TlsSettings(_Section):
    """[tls]: DICOM TLS for the listener and the certificates used when sending over TLS."""

    enabled: bool = Field(default=False, description="The listener speaks TLS only")
    certificate: Path | None = Field(
        default=None, description="Our certificate chain (PEM); also our client certificate"
    )
    private_key: Path | None = Field(default=None, description="Our private key (PEM)")
    ca_certificates: Path | None = Field(
        default=None, description="CA certificates (PEM) that peers' certificates must chain to"
    )
    require_client_certificate: bool = Field(
        default=False, description="Refuse TLS clients without a certificate from ca_certificates"
    )
    check_hostname: bool = Field(
        default=True, description="When sending, the server certificate must name the host"
    )

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: set both or neither")
        if self.enabled and self.certificate is None:
            raise ValueError("enabled = true needs certificate and private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate = true needs ca_certificates")
        return self


class Destination(_Section):
    """[[destinations]]: a PACS or viewer that receives every result."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: bool = Field(default=False, description="Send over TLS, verifying tls.ca_certificates")


class Peer(_Section):
    """[[peers]]: a known sender and the address where it accepts C-STORE."""

    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: bool = Field(default=False, description="Return results over TLS")


class MetricsSettings(_Section):
    """[metrics]: the HTTP endpoint with Prometheus ``/metrics`` and ``/healthz``."""

    enabled: bool = Field(default=True, description="Serve /metrics and /healthz over HTTP")
    host: str = Field(default="127.0.0.1", min_length=1, description="Address to listen on")
    port: Port = Field(default=9108, description="TCP port for HTTP")


class RetentionSettings(_Section):
    """[retention]: how long finished jobs, their spool files and results are kept."""

    days: int = Field(
        default=30, ge=0, le=36_500, description="Days after a job ends; 0 = keep forever"
    )
    interval_s: float = Field(default=3600.0, gt=0, description="How often the purge runs")


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSettings = NodeSettings()
    database: DatabaseSettings = DatabaseSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    delivery: DeliverySettings = DeliverySettings()
    metrics: MetricsSettings = MetricsSettings()
    retention: RetentionSettings = RetentionSettings()
    tls: TlsSettings = TlsSettings()
    destinations: list[Destination] = Field(default_factory=list)
    peers: list[Peer] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment variables override the TOML file, which overrides defaults."""
        return env_settings, init_settings

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(dupes)}")
        aets = [p.ae_title for p in self.peers]
        dupes = sorted({a for a in aets if aets.count(a) > 1})
        if dupes:
            raise ValueError(f"peer AE titles must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _security(self) -> Settings:
        if self.node.check_peer_host and not self.peers:
            raise ValueError("node.check_peer_host = true needs at least one [[peers]] entry")
        over_tls = [d.name for d in self.destinations if d.tls]
        over_tls += [f"peer {p.ae_title}" for p in self.peers if p.tls]
        if over_tls and self.tls.ca_certificates is None:
            raise ValueError(
                f"tls.ca_certificates is needed to verify TLS destinations: {', '.join(over_tls)}"
            )
        return self

    @property
    def database_url(self) -> str:
        """The job database URL, defaulting to SQLite in the data folder."""
        if self.database.url is not None:
            return self.database.url
        return f"sqlite:///{(self.node.data_dir / 'pneumonode.db').resolve()}"

    @property
    def model_path(self) -> Path:
        """The model package to serve, defaulting to the bundled demo package."""
        if self.model.path is not None:
            return self.model.path
        return bundled_model_path()

    @property
    def sender_ae_title(self) -> str:
        """The calling AE title used for outgoing associations."""
        return self.delivery.calling_ae_title or self.node.ae_title

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title, if any."""
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None


def bundled_model_path() -> Path:
    """Folder of the demo model package shipped inside the ``pneumonode`` package."""
    return Path(str(resources.files("pneumonode") / "models" / "demo"))


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}{shown}")
    return f"invalid configuration in {source}: " + "; ".join(parts)


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from a TOML file (optional) and the environment.

    Raises
    ------
    ConfigError
        One line naming the file, the key and the rule broken.
    """
    data: dict[str, Any] = {}
    source = "environment" if path is None else f"{path} + environment"
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except PermissionError as exc:
            raise ConfigError(f"configuration file not readable: {path}") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"configuration path is a folder, not a file: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
