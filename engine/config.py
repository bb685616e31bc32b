"""Configuration: YAML into pydantic models, with detector overrides per profile and per stream.

Unknown keys are rejected with a suggestion. Detector options are checked against each detector's own
frozen config dataclass, so the schema grows by itself when a detector is added.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from engine.detectors import REGISTRY
from engine.detectors.base import DetectorConfig, Region
from engine.runner import StreamSpec
from engine.sources import SourceOptions

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegionModel(_Strict):
    """A rectangle in fractions of the picture: x, y of the top-left corner, w, h."""

    x: float = Field(ge=0, le=1)
    y: float = Field(ge=0, le=1)
    w: float = Field(gt=0, le=1)
    h: float = Field(gt=0, le=1)


def _override_model(name: str, cfg: type[DetectorConfig]) -> type[BaseModel]:
    hints = typing.get_type_hints(cfg)
    spec: dict[str, Any] = {}
    for f in fields(cfg):
        typ = hints[f.name]
        if f.name == "ignore":
            typ = list[RegionModel]
        default = f.default if f.default is not MISSING else None
        if isinstance(default, Enum):
            default = default.value
        spec[f.name] = (typ | None, Field(default=None, description=f"default: {default!r}"))
    return create_model(
        f"{name}_options",
        __config__=ConfigDict(extra="forbid"),
        __doc__=(cfg.__doc__ or "").strip(),
        **spec,
    )


DETECTOR_OVERRIDES: dict[str, type[BaseModel]] = {n: _override_model(n, d.Config) for n, d in REGISTRY.items()}
DetectorsModel = create_model(
    "Detectors",
    __config__=ConfigDict(extra="forbid"),
    **{n: (m | None, None) for n, m in DETECTOR_OVERRIDES.items()},
)


class ProfileModel(_Strict):
    """A named set of detector overrides; `only` restricts the profile to the listed detectors."""

    only: list[str] | None = None
    tier: Literal["all", "skip_nonref", "keyframes"] | None = Field(
        None, description="density tier for the profile's streams (see README: density tiers)")
    detectors: DetectorsModel = Field(default_factory=DetectorsModel)  # type: ignore[valid-type]

    @field_validator("only")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in REGISTRY:
                raise ValueError(_unknown("detector", name, REGISTRY))
        return v


class FaultModel(_Strict):
    """A fault scheduled on a synthetic:// stream."""

    kind: Literal["black", "freeze", "blocky", "blur", "glitch", "silence", "clipping", "loudness", "nosignal",
                  "dropout", "phase", "mute", "dc", "clicks"]
    start: float = Field(ge=0)
    duration: float = Field(gt=0)
    param: float | None = None


class ExpectModel(_Strict):
    """What the stream carries, for the scheduler's decode budget before the stream is opened."""

    codec: Literal["h264", "hevc", "av1", "vp9", "vp8", "mpeg2", "mpeg4", "vc1"] = "h264"
    width: int = Field(1920, ge=16, le=8192)
    height: int = Field(1080, ge=16, le=8192)
    fps: float = Field(30.0, gt=0, le=240)
    gop_seconds: float = Field(2.0, gt=0, le=60)


# Source options' sensible ranges: a zero backoff spins a reconnect loop at full speed, NaN timeouts never
# connect, a huge backoff overflows the clock.
_OPTION_RANGES: dict[str, tuple[float, float, str]] = {
    "open_timeout": (0.1, 3600.0, " s"), "read_timeout": (0.1, 3600.0, " s"),
    "backoff_initial": (0.01, 3600.0, " s"), "backoff_max": (0.01, 86400.0, " s"),
    "threads": (0, 256, ""), "decode_batch": (1, 64, ""),
}


class StreamModel(_Strict):
    id: str
    url: str
    profile: str = "default"
    pace: Literal["auto", "fast", "realtime"] = "auto"
    detectors: DetectorsModel = Field(default_factory=DetectorsModel)  # type: ignore[valid-type]
    faults: list[FaultModel] = Field(default_factory=list)
    tier: Literal["all", "skip_nonref", "keyframes"] | None = Field(
        None, description="density tier: which frames are decoded (default: the profile's, else all)")
    expect: ExpectModel | None = Field(None, description="codec, size and rate, for GPU scheduling (default 1080p30 H.264)")
    options: dict[str, float | int | bool | str] = Field(default_factory=dict, description="source options")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.fullmatch(v):  # match() with $ lets a trailing newline through
            raise ValueError("stream id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("url must not be empty")
        from engine.sources import SourceError, open_source

        try:  # what a source would refuse (scheme, synthetic parameters) is refused here; no I/O happens
            open_source(v.strip(), SourceOptions(threaded=False))
        except SourceError as exc:
            raise ValueError(str(exc)) from None
        return v.strip()

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in fields(SourceOptions)} - {"pace", "tier", "device", "keep_luma"}
        hints = typing.get_type_hints(SourceOptions)
        out: dict[str, Any] = {}
        for key, value in v.items():
            if key not in known:
                raise ValueError(_unknown("source option", key, known))
            # The dataclass does not check types: a wrong one would only fail later, in the stream's thread.
            want = hints[key]
            if want is bool and not isinstance(value, bool):
                raise ValueError(f"source option {key} must be true or false")
            if want in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"source option {key} must be a number")
            if want is int and not float(value).is_integer():
                raise ValueError(f"source option {key} must be a whole number")
            if want in (int, float) and value < 0:
                raise ValueError(f"source option {key} must not be negative")
            if want is str and not isinstance(value, str):
                raise ValueError(f"source option {key} must be text")
            if key == "decoder":
                from engine.decode import BACKEND_NAMES

                if value not in BACKEND_NAMES:
                    raise ValueError(f"source option decoder must be one of {', '.join(BACKEND_NAMES)}")
            if key in _OPTION_RANGES:
                lo, hi, unit = _OPTION_RANGES[key]
                if not (math.isfinite(value) and lo <= value <= hi):  # NaN passes every comparison
                    raise ValueError(f"source option {key} must be within {lo:g}..{hi:g}{unit}, not {value}")
            out[key] = want(value) if want in (int, float) else value
        if out.get("backoff_max", SourceOptions.backoff_max) < out.get("backoff_initial", SourceOptions.backoff_initial):
            raise ValueError("source option backoff_max must not be below backoff_initial")
        if out.get("video") is False and out.get("audio") is False:
            raise ValueError("source options video and audio cannot both be false: nothing would be monitored")
        return out


class EngineModel(_Strict):
    device: str = Field("cpu", description="cpu, cuda or cuda:N: where frames are decoded (NVDEC) and scored")
    decoder: Literal["auto", "pyav", "nvdec"] = Field(
        "auto", description="video decoder: auto (NVDEC on a GPU device, else PyAV), pyav, nvdec")
    devices: list[str] | None = Field(
        None, description="several devices (cuda:0, cuda:1, ...): streams are spread over them; overrides device")
    workers: int = Field(1, ge=1, le=64, description=(
        "engine processes per device: more processes feed more NVDEC sessions and spread the per-stream "
        "Python work over more cores (4 per H200 measured best)"))
    batch_frames: int = Field(32, ge=1, le=256, description="most frames of one stream scored per tick")
    tick_ms: float = Field(20, gt=0, le=1000, description="longest wait between ticks when idle")
    queue_frames: int = Field(64, ge=2, le=4096, description="frames buffered per stream before dropping (live) or waiting (files)")
    torch_threads: int = Field(1, ge=0, le=256, description="CPU threads for the scoring step (0: torch's default)")
    cpu_cores: float | Literal["auto"] | None = Field(None, description=(
        "admission control on the CPU: the cores streams read in real time may take (auto: this machine's); a "
        "stream that does not fit is admitted in a cheaper tier or refused with the reason. With GPU devices: "
        "spare cores that decode streams the GPUs cannot take (hybrid). Unset: no limit (overload thins pictures)"))
    headroom: float = Field(0.15, ge=0.0, le=0.9, description=(
        "fraction of each GPU's decoders and memory, and of cpu_cores, the scheduler keeps free"))
    shed_clicks: bool = Field(True, description=(
        "pause the click analysis of live streams while the engine is behind them (3 ticks of 1.5 s or more, or "
        "fewer adding up to 4.5 s) until it has caught up for a minute; logged and counted (clicks_paused)"))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError("device must be 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("cpu_cores")
    @classmethod
    def _cpu_cores(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not (math.isfinite(v) and 0 < v <= 4096):
            raise ValueError("cpu_cores must be 'auto' or a number of cores above 0 (at most 4096)")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("devices must list at least one device, or be left out")
        for d in v:
            cls._device(d)
        if len(set(v)) != len(v):
            raise ValueError("devices must not repeat a device (use workers for more processes per device)")
        return v


class WebhookModel(_Strict):
    """An Alertmanager-compatible webhook receiver: every event goes out through a persistent outbox,
    retried with exponential backoff until the receiver takes it."""

    url: str = Field(description="http(s) URL the alerts are POSTed to (Alertmanager webhook JSON, version 4)")
    name: str | None = Field(None, description="name in logs and metrics (default: webhook-N)")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers, e.g. Authorization")
    timeout: float = Field(5.0, gt=0, le=300, description="seconds per POST")
    backoff_max: float = Field(60.0, gt=0, le=3600, description="longest wait between retries, seconds")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        from urllib.parse import urlparse

        u = urlparse(v.strip())
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError("webhook url must be an http:// or https:// URL with a host")
        return v.strip()


class OutputModel(_Strict):
    jsonl: str | None = Field("-", description="'-' for stdout, a file path, or null")
    thumbnails: str | None = Field(None, description="folder for alert thumbnails, or null")
    review: str | None = Field(None, description="review store folder: corruption alerts keep their picture here for "
                                                 "`framewatch label` and retraining, or null")
    measurements: str | None = Field(None, description="write each stream's loudness, true peak, A/V offset and "
                                                       "counters as JSON lines here ('-' = stdout), or null")
    measure_interval: float = Field(1.0, gt=0, le=3600, description="seconds of media time between measurements")
    webhooks: list[WebhookModel] = Field(default_factory=list, description="Alertmanager-compatible receivers")
    outbox: str = Field("framewatch-out/outbox.sqlite", description=(
        "SQLite file of the webhook outbox for `run` (`serve` keeps it in its state database)"))
    summary: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "warning"


class ServiceModel(_Strict):
    """`framewatch serve`: the API, the mosaic page and /metrics, in the engine's process."""

    host: str = Field("127.0.0.1", description="address to bind; anything but loopback requires a token")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port)")
    token: str | None = Field(None, min_length=16, description=(
        "bearer token the API requires (or the FRAMEWATCH_TOKEN environment variable); at least 16 characters"))
    state_dir: str = Field("framewatch-out/service", description=(
        "streams, alert history, acks, the webhook outbox (state.sqlite) and alert thumbnails"))
    external_url: str = Field("", description="URL the service is reached at, for links in webhook alerts")
    drain_timeout: float = Field(10.0, ge=0, le=600, description=(
        "seconds a SIGTERM waits for the webhook outbox to empty before exiting"))
    retention_days: float = Field(90.0, gt=0, description=(
        "resolved alerts (and their thumbnails) older than this are deleted from the history"))


class FramewatchConfig(_Strict):
    """A framewatch configuration file."""

    engine: EngineModel = Field(default_factory=EngineModel)
    output: OutputModel = Field(default_factory=OutputModel)
    detectors: DetectorsModel = Field(default_factory=DetectorsModel)  # type: ignore[valid-type]
    profiles: dict[str, ProfileModel] = Field(default_factory=dict)
    streams: list[StreamModel] = Field(default_factory=list)
    service: ServiceModel = Field(default_factory=ServiceModel)
    duration: float | None = Field(None, gt=0, description="stop after this many seconds (run)")

    @model_validator(mode="after")
    def _consistent(self) -> FramewatchConfig:
        seen: set[str] = set()
        for s in self.streams:
            if s.id in seen:
                raise ValueError(f"stream id {s.id!r} appears twice")
            seen.add(s.id)
            if s.profile != "default" and s.profile not in self.profiles:
                raise ValueError(f"stream {s.id!r}: " + _unknown("profile", s.profile, self.profiles))
        return self


def _unknown(what: str, name: str, known: typing.Iterable[str]) -> str:
    known = sorted(known)
    if not known:
        return f"unknown {what} {name!r}; none is configured"
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return f"unknown {what} {name!r}{hint}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at a location of the config, for suggestions."""
    current: Any = model
    skip_key = False
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if skip_key:  # the key of a dict (a profile name)
            skip_key = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        f = current.model_fields.get(str(part))
        if f is None:
            return []
        skip_key = typing.get_origin(f.annotation) is dict
        current = _unwrap(f.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(t: Any) -> Any:
    """The model inside Optional[...], list[...] or dict[str, ...]."""
    for _ in range(4):
        args = typing.get_args(t)
        if not args:
            return t
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
        t = args[-1]
    return t


def format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err.get("type") == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            allowed = _allowed_keys(FramewatchConfig, loc)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
            lines.append(f"{source}: {where}: unknown key{hint}")
        else:
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, text: str | None = None) -> FramewatchConfig:
    """Read and validate a config file (or YAML text). Raises ConfigError with one line per problem."""
    source = str(path) if path is not None else "<config>"
    if text is None:
        if path is None:
            raise ConfigError("no config given")
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{source}: is a directory, not a config file")
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (engine, output, detectors, profiles, streams)")
    try:
        cfg = FramewatchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from exc
    # Resolve everything once so bad detector values are reported now, not when a stream starts; a value
    # wrong at the top level is said once, not again for every profile and stream that inherits it.
    lines: list[str] = []
    jobs = [(cfg_name, prof, over) for cfg_name, prof, over in
            [(f"{source}", "default", None), *((f"{source}: profiles.{n}", n, None) for n in cfg.profiles),
             *((f"{source}: streams.{s.id}", s.profile, s.detectors) for s in cfg.streams)]]
    said: set[str] = set()
    for where, prof, over in jobs:
        try:
            resolve_detectors(cfg, prof, over, where=where)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                what = line.removeprefix(where)
                if what not in said:
                    said.add(what)
                    lines.append(line)
    if lines:
        raise ConfigError("\n".join(lines))
    return cfg


def _values(model: BaseModel | None) -> dict[str, Any]:
    if model is None:
        return {}
    return {k: v for k, v in model.model_dump(exclude_none=True).items()}


def resolve_detectors(
    cfg: FramewatchConfig, profile: str = "default", stream_overrides: BaseModel | None = None, where: str = ""
) -> dict[str, DetectorConfig]:
    """Detector configs for a stream: defaults <- config-wide <- profile <- stream."""
    prof = cfg.profiles.get(profile)
    layers = [cfg.detectors, prof.detectors if prof else None, stream_overrides]
    only = set(prof.only) if prof and prof.only else None
    out: dict[str, DetectorConfig] = {}
    problems: list[str] = []  # one line per detector with a bad value, all of them at once
    for name, det in REGISTRY.items():
        merged: dict[str, Any] = {}
        for layer in layers:
            if layer is not None:
                merged.update(_values(getattr(layer, name, None)))
        if "ignore" in merged:
            merged["ignore"] = tuple(Region(**r) for r in merged["ignore"])
        if only is not None and name not in only:
            merged["enabled"] = False
        try:
            out[name] = det.Config(**merged)
        except (TypeError, ValueError) as exc:
            problems.append(f"{where or 'config'}: detectors.{name}: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def stream_specs(cfg: FramewatchConfig) -> list[StreamSpec]:
    return [stream_spec(cfg, s) for s in cfg.streams]


def stream_spec(cfg: FramewatchConfig, s: StreamModel) -> StreamSpec:
    """The engine's view of one configured stream. Raises ConfigError (an unknown profile, detector values
    that do not hold, a detector the stream's tier cannot feed)."""
    if s.profile != "default" and s.profile not in cfg.profiles:
        raise ConfigError(f"streams.{s.id}.profile: " + _unknown("profile", s.profile, cfg.profiles))
    opts = SourceOptions(pace=s.pace, **{"decoder": cfg.engine.decoder, **s.options})  # type: ignore[arg-type]
    profile = cfg.profiles.get(s.profile)
    opts.tier = s.tier or (profile.tier if profile is not None and profile.tier else "all")
    detectors = resolve_detectors(cfg, s.profile, s.detectors, where=f"streams.{s.id}")
    if opts.tier != "all":
        every = [n for n, c in detectors.items() if c.enabled and REGISTRY[n].NEEDS_EVERY_FRAME]
        if every:
            raise ConfigError(
                f"streams.{s.id}: tier {opts.tier} decodes only some frames, but detector(s) {', '.join(every)} "
                "need every frame; disable them for this stream (detectors: {name: {enabled: false}}) or use tier all"
            )
    return StreamSpec(
        id=s.id,
        url=s.url,
        detectors=detectors,
        source=opts,
        faults=[f.model_dump() for f in s.faults] or None,
        profile=s.profile,
        expect=s.expect.model_dump() if s.expect is not None else None,
    )


def json_schema() -> dict[str, Any]:
    return FramewatchConfig.model_json_schema()
