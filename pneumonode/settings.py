"""The node configuration: one validated settings tree from TOML and PNEUMONODE_* variables."""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

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

from pneumonode.identifiers import ae_title_problem
from pneumonode.queue.retry import RetryPolicy
from pneumonode.results import ALL_KINDS, ResultKind

ENV_PREFIX = "PNEUMONODE_"
DEFAULT_PORT = 11112

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming key and rule."""


def _check_ae_title(value: str) -> str:
    problem = ae_title_problem(value)
    if problem is not None:
        raise ValueError(f"an AE title {problem}")
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
        default=128, ge=1, description="Larger C-STORE datasets are refused (out of resources)"
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
    processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Worker processes beside the listener, each with its own model; "
        "0: workers run as threads inside the serving process",
    )
    threads: int = Field(default=1, ge=1, le=64, description="Worker threads per process")
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU priority of the worker processes below the listener (Unix nice)",
    )
    inference_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Threads each worker process's model uses; 0: the cores / processes",
    )
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


class OutputSettings(_Section):
    """[output]: which result objects the node makes for each image."""

    seg: bool = Field(default=True, description="DICOM Segmentation (BINARY) of the finding")
    sc: bool = Field(default=True, description="Secondary capture overlay, for any viewer")
    sr: bool = Field(default=True, description="DICOM SR measurement report (TID 1500)")
    sc_compression: Literal["none", "jpeg-ls"] = Field(
        default="none",
        description="The SC's pixel data: none (Explicit VR Little Endian, 3 bytes a pixel) or "
        "jpeg-ls (JPEG-LS Lossless, about 4 x smaller, about 60 ms more CPU per 1024 px image); "
        "sent uncompressed to a destination that does not accept JPEG-LS",
    )

    def kinds(self) -> tuple[ResultKind, ...]:
        """The kinds made, in sending order."""
        return tuple(k for k in ALL_KINDS if getattr(self, k.value))

    @model_validator(mode="after")
    def _something(self) -> OutputSettings:
        if not self.kinds():
            raise ValueError("at least one of output.seg, output.sc, output.sr must be true")
        if self.sr and not self.seg:
            raise ValueError(
                "output.sr = true needs output.seg = true: the report's finding refers to the "
                "SEG's segment"
            )
        return self


class Destination(_Section):
    """[[destinations]]: a PACS, viewer or worklist that receives results."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: bool = Field(default=False, description="Send over TLS, verifying tls.ca_certificates")
    objects: tuple[ResultKind, ...] = Field(
        default=ALL_KINDS,
        min_length=1,
        description='Result objects it gets, of those [output] makes: "seg", "sc", "sr"',
    )
    only_positive: bool = Field(
        default=False, description="Send only results where pneumothorax was found"
    )

    @field_validator("objects")
    @classmethod
    def _distinct(cls, value: tuple[ResultKind, ...]) -> tuple[ResultKind, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"objects must not repeat a kind, got {[k.value for k in value]}")
        return value


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
    output: OutputSettings = OutputSettings()
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
        made = set(self.output.kinds())
        for destination in self.destinations:
            if not made & set(destination.objects):
                raise ValueError(
                    f"destination {destination.name} takes "
                    f"{', '.join(k.value for k in destination.objects)}, none of which [output] "
                    "makes: it would never receive anything"
                )
        over_tls = [d.name for d in self.destinations if d.tls]
        over_tls += [f"peer {p.ae_title}" for p in self.peers if p.tls]
        if over_tls and self.tls.ca_certificates is None:
            raise ValueError(
                f"tls.ca_certificates is needed to verify TLS destinations: {', '.join(over_tls)}"
            )
        return self

    def warnings(self) -> list[str]:
        """Choices that are valid but unsafe or surprising, one line each (logged at start)."""
        found = []
        node = self.node
        if not _is_loopback(node.host) and not node.allowed_calling_aets and not (
            node.check_peer_host
        ):
            found.append(
                f"node.host = {node.host!r} listens beyond this machine and "
                "node.allowed_calling_aets is empty: any AE title from any host may send "
                "images; list the senders in node.allowed_calling_aets (and bind them to their "
                "hosts with [[peers]] and node.check_peer_host), or listen on 127.0.0.1"
            )
        if not self.destinations and not self.delivery.return_to_sender:
            found.append(
                "no [[destinations]] and delivery.return_to_sender is off: results stay in "
                f"{node.data_dir / 'results'} and are sent nowhere"
            )
        return found

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


def _is_loopback(host: str) -> bool:
    """True for an address (or ``localhost``) that only this machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bundled_model_path() -> Path:
    """Folder of the demo model package shipped inside the ``pneumonode`` package."""
    return Path(str(resources.files("pneumonode") / "models" / "demo"))


def _section_model(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The settings model that holds the key at ``loc`` (list indexes skipped), or None."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (``Model`` or ``list[Model]``), or None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _scalar_types(annotation: Any) -> set[type]:
    """The plain scalar types (int, float, bool) an annotation allows."""
    allowed = {annotation, *get_args(annotation)}
    return {t for t in (bool, int, float) if t in allowed}


def _toml_type_errors(data: Mapping[str, Any], model: type[BaseModel], prefix: str) -> list[str]:
    """Numbers and booleans written as strings in the TOML file (``port = "104"``).

    Pydantic converts such strings silently (it must, for environment variables); in the file
    they are a mistake that ``config check`` reports.
    """
    errors: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        where = f"{prefix}{key}"
        inner = _model_in(field.annotation)
        if inner is not None and isinstance(value, Mapping):
            errors += _toml_type_errors(value, inner, where + ".")
        elif inner is not None and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, Mapping):
                    errors += _toml_type_errors(item, inner, f"{where}.{index}.")
        elif isinstance(value, str) and _scalar_types(field.annotation):
            kinds = " or ".join(sorted(t.__name__ for t in _scalar_types(field.annotation)))
            errors.append(f"{where}: must be a TOML {kinds}, not the string {value!r}")
    return errors


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and err["loc"]:
            model = _section_model(err["loc"])
            name = str(err["loc"][-1])
            close = get_close_matches(name, list(model.model_fields), n=1) if model else []
            shown = f"; did you mean {close[0]!r}?" if close else ""
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
    type_errors = _toml_type_errors(data, Settings, "")
    if type_errors:
        raise ConfigError(f"invalid configuration in {path}: " + "; ".join(type_errors))
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
