"""Command line: `framewatch run`, `framewatch check`, `framewatch config validate|schema`, `framewatch detectors`."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine import __version__, model_cli
from engine.alerts import JsonlSink, MemorySink, MultiSink, ThumbnailWriter
from engine.alerts.measurements import MeasurementLog
from engine.alerts.sinks import CallbackSink
from engine.config import (
    ConfigError,
    FramewatchConfig,
    json_schema,
    load_config,
    resolve_detectors,
    stream_specs,
)
from engine.decode import BACKEND_NAMES, TIERS
from engine.detectors import REGISTRY
from engine.events import Event
from engine.review import ReviewStore
from engine.runner import Engine, StreamRuntime, StreamSpec
from engine.sources import SourceOptions, is_live_url
from engine.workers import ProcessWorkers, StreamReport, report_of

app = typer.Typer(add_completion=False, no_args_is_help=True, help="framewatch: real-time quality monitoring of audio/video streams.")
config_app = typer.Typer(no_args_is_help=True, help="Validate configs and export the config schema.")
app.add_typer(config_app, name="config")

err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 130)
DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STYLE = {"critical": "bold red", "major": "red", "warning": "yellow", "info": "cyan"}


def _fail(message: str, code: int = 2) -> typer.Exit:
    for line in message.splitlines() or [""]:  # one line per problem, each said as an error
        err.print(f"framewatch: error: {line}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="framewatch: %(levelname)s: %(message)s", stream=sys.stderr)


def _pretty(event: Event) -> str:
    t = f"{event.start:8.3f}s"
    if event.status.value == "resolved":
        return f"[dim]{t}[/] [green]resolved[/] [bold]{event.stream}[/] {event.type}  end {event.end:.3f}s  duration {event.duration:.3f}s"
    style = STYLE.get(event.severity.value, "white")
    return f"{t} [{style}]FIRING {event.severity.value}[/] [bold]{event.stream}[/] {event.type}  {event.message}"


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="config YAML (default: the built-in demo)")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds (> 0)")] = None,
    jsonl: Annotated[str | None, typer.Option(help="write events as JSON lines here ('-' = stdout)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no human-readable alert lines")] = False,
) -> None:
    """Monitor the streams of a config until they end, the duration passes, or Ctrl-C."""
    path = config or DEMO
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        # 0 and NaN would have meant "no limit", overriding the config's own, and a negative one nothing at all.
        raise _fail(f"--duration must be a number of seconds above 0, not {duration}")
    try:
        cfg = load_config(path)
        specs = stream_specs(cfg)
    except ConfigError as exc:
        raise _fail(str(exc).splitlines()[0] if len(str(exc).splitlines()) == 1 else str(exc)) from None
    _setup_logging(cfg.output.log_level)
    if not specs:
        raise _fail(f"{path}: no streams configured")
    sinks = MultiSink()
    target = jsonl if jsonl is not None else cfg.output.jsonl
    if target:
        try:
            sinks.add(JsonlSink(target))
        except OSError as exc:
            raise _fail(f"cannot write events to {target}: {exc}") from None
    memory = MemorySink()
    sinks.add(memory)
    for i, w in enumerate(cfg.output.webhooks):
        from engine.alerts.webhook import WebhookSink

        try:
            sinks.add(WebhookSink(w.url, cfg.output.outbox, name=w.name or f"webhook-{i + 1}", headers=dict(w.headers),
                                  timeout=w.timeout, backoff_max=w.backoff_max))
        except Exception as exc:
            raise _fail(f"cannot open the webhook outbox {cfg.output.outbox}: {exc}") from None
    if not quiet:
        sinks.add(CallbackSink(lambda e: err.print(_pretty(e))))
    measure: MeasurementLog | None = None
    if cfg.output.measurements:
        try:
            measure = MeasurementLog(cfg.output.measurements)
        except OSError as exc:
            raise _fail(f"cannot write measurements to {cfg.output.measurements}: {exc}") from None
    devices = cfg.engine.devices or [cfg.engine.device]
    if len(devices) > 1 or cfg.engine.workers > 1:
        try:
            _run_workers(cfg, specs, sinks, memory, devices, path, duration, quiet, measure)
        finally:
            if measure is not None:
                measure.close()
        return
    from engine.pool import missing_cuda

    # A GPU this machine lacks leaves the engine on the CPU (said by the engine): the CPU budget applies then.
    specs, refused = _admit_cpu(cfg, specs, ["cpu"] if missing_cuda([cfg.engine.device])[0] else [cfg.engine.device], 1)
    thumbs = ThumbnailWriter(cfg.output.thumbnails) if cfg.output.thumbnails else None
    engine = Engine(
        sinks,
        device=cfg.engine.device,
        batch_frames=cfg.engine.batch_frames,
        tick=cfg.engine.tick_ms / 1000,
        queue_frames=cfg.engine.queue_frames,
        thumbnails=thumbs,
        review=ReviewStore(cfg.output.review) if cfg.output.review else None,
        torch_threads=cfg.engine.torch_threads,
        shed_clicks=cfg.engine.shed_clicks,
        on_measure=measure,
        measure_every=cfg.output.measure_interval,
    )
    if not quiet:
        err.print(f"framewatch {__version__}: {len(specs)} stream(s) from {path}, device {cfg.engine.device}")
    for spec in specs:
        engine.add_stream(spec)
    limit = duration if duration is not None else cfg.duration
    deadline = time.monotonic() + limit if limit else None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    try:
        engine.run(until_done=True, deadline=deadline)
    except KeyboardInterrupt:
        engine.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sinks.close()
        if measure is not None:
            measure.close()
    if cfg.output.summary and not quiet:
        _summary([report_of(rt, str(engine.device)) for rt in engine.streams.values()]
                 + [StreamReport(sid, state="refused", errors=[why]) for sid, why in refused.items()], memory.events)
    _outputs_failed(sinks, measure)
    if any(rt.state == "error" for rt in engine.streams.values()):
        raise typer.Exit(2)


def _admit_cpu(cfg: Any, specs: list[StreamSpec], devices: list[str], processes: int
               ) -> tuple[list[StreamSpec], dict[str, str]]:
    """With `engine.cpu_cores` and the CPU as the only device, the streams that fit (at the tier they fit in)
    and the refused ones with the reason; otherwise every stream. Each worker process has a scoring thread of
    its own, and the plan counts them all."""
    if cfg.engine.cpu_cores is None or devices != ["cpu"]:
        return specs, {}
    from engine.pool import cpu_model, plan_cpu

    cpu = cpu_model(cfg.engine.cpu_cores, processes=processes)
    assert cpu is not None
    admitted, refused = plan_cpu(specs, cpu, cfg.engine.headroom)
    if not admitted:
        raise _fail(f"no stream fits in {cpu.cores:g} CPU cores (engine.cpu_cores): "
                    + "; ".join(f"{k}: {v}" for k, v in refused.items()))
    return admitted, refused


def _outputs_failed(sinks: MultiSink, measure: MeasurementLog | None) -> None:
    """An alert or measurement an output could not take (a full disk) was logged when it happened; the run
    does not end as a success either."""
    lost = [f"{sinks.failures} event write(s) failed"] if sinks.failures else []
    if measure is not None and measure.failures:
        lost.append(f"{measure.failures} measurement line(s) not written")
    if lost:
        raise _fail("; ".join(lost) + " (see the errors above)")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Argument(help="config YAML (default: no streams; add them through the API)")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default 127.0.0.1; others need a token)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8080)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="streams, alerts, outbox and thumbnails (default: config's service.state_dir)")] = None,
    token: Annotated[str | None, typer.Option(help="bearer token the API requires; prefer FRAMEWATCH_TOKEN in the environment")] = None,
) -> None:
    """Run as a service: stream API, alert history and acks, /metrics, webhook delivery and the mosaic page at /."""
    from engine.config import FramewatchConfig
    from engine.service import Service
    from engine.service.app import is_loopback
    from engine.service.app import serve as run_server

    try:
        cfg = load_config(config) if config is not None else FramewatchConfig()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    _setup_logging(cfg.output.log_level)
    host = host or cfg.service.host
    port = cfg.service.port if port is None else port
    token = token or cfg.service.token or os.environ.get("FRAMEWATCH_TOKEN") or None
    if token is not None and len(token) < 16:
        raise _fail("the bearer token must have at least 16 characters")
    if not is_loopback(host) and not token:
        raise _fail(f"binding to {host} makes the API reachable from other machines: set a bearer token "
                    "(FRAMEWATCH_TOKEN, service.token in the config, or --token)")
    if not 0 <= port <= 65535:
        raise _fail(f"port {port} is not a TCP port")
    try:
        service = Service(cfg, state_dir=state_dir, token=token)
    except Exception as exc:
        raise _fail(f"cannot open the service state in {state_dir or cfg.service.state_dir}: {exc}") from None
    err.print(f"framewatch {__version__}: serving on http://{host}:{port}/ (API /api, metrics /metrics), "
              f"state in {service.state_dir}, device {service.engine.label()}"
              + (", bearer token required" if token else ""), markup=False, highlight=False)
    run_server(service, host, port, log_level=cfg.output.log_level)


def _run_workers(cfg: Any, specs: list[StreamSpec], sinks: MultiSink, memory: MemorySink, devices: list[str],
                 path: Path, duration: float | None, quiet: bool, measure: Any = None) -> None:
    """`run` with several engine processes (engine.workers per device, engine.devices)."""
    from engine.pool import missing_cuda

    missing, count = missing_cuda(devices)
    if missing:
        # Monitoring on the CPU beats no monitoring; the operator is told which devices are missing.
        err.print(f"framewatch: warning: {', '.join(missing)} not available ({count} CUDA device(s)); "
                  "those workers run on the CPU", markup=False, highlight=False, soft_wrap=True)
        devices = list(dict.fromkeys("cpu" if d in missing else d for d in devices))
    engine_kwargs = {"batch_frames": cfg.engine.batch_frames, "tick": cfg.engine.tick_ms / 1000,
                     "queue_frames": cfg.engine.queue_frames, "torch_threads": cfg.engine.torch_threads,
                     "shed_clicks": cfg.engine.shed_clicks,
                     "review": ReviewStore(cfg.output.review) if cfg.output.review else None}
    specs, refused = _admit_cpu(cfg, specs, devices, cfg.engine.workers)
    pool = ProcessWorkers(sinks, devices, cfg.engine.workers, engine_kwargs, cfg.output.thumbnails,
                          on_measure=measure, measure_every=cfg.output.measure_interval, log_level=cfg.output.log_level)
    pool.add_streams(specs, headroom=cfg.engine.headroom)
    for sid, why in refused.items():
        pool.reports[sid] = StreamReport(sid, state="refused", errors=[why])
    if not quiet:
        err.print(f"framewatch {__version__}: {len(specs)} stream(s) from {path}, {cfg.engine.workers} worker "
                  f"process(es) on each of {', '.join(devices)}")
    limit = duration if duration is not None else cfg.duration
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: pool.stop())
    try:
        pool.run(deadline=time.monotonic() + limit if limit else None)
    except KeyboardInterrupt:
        pool.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sinks.close()
        if measure is not None:
            measure.close()
    reports = list(pool.reports.values())
    if cfg.output.summary and not quiet:
        _summary(reports, memory.events, show_device=True)
    _outputs_failed(sinks, measure)
    if any(r.state == "error" for r in reports):
        raise typer.Exit(2)


def _summary(reports: list[StreamReport], events: list[Event], show_device: bool = False) -> None:
    table = Table(title="streams", show_lines=False)
    cols = ("stream", "device", "state", "frames", "media s", "dropped", "decode errors", "integrated LUFS", "alerts")
    for col in cols:
        if col != "device" or show_device:
            table.add_column(col)
    for r in reports:
        alerts = ", ".join(f"{k} {v}" for k, v in sorted(r.events.items())) or "none"
        row = [r.id, r.device, r.state, str(r.frames), f"{r.media_end:.1f}", str(r.frames_dropped),
               str(r.decode_errors), _fmt(r.integrated_lufs, 1), alerts]
        table.add_row(*(row if show_device else row[:1] + row[2:]))
    err.print(table)
    resolved = [e for e in events if e.status.value == "resolved"]
    if resolved:
        t2 = Table(title="alerts")
        for col in ("stream", "type", "severity", "start s", "end s", "duration s", "value"):
            t2.add_column(col)
        for e in sorted(resolved, key=lambda e: (e.stream, e.start)):
            t2.add_row(e.stream, e.type, e.severity.value, f"{e.start:.3f}", _fmt(e.end, 3), _fmt(e.duration, 3), _fmt(e.value, 3))
        err.print(t2)


def _file_report(path: str, rt: StreamRuntime, events: list[Event]) -> dict[str, Any]:
    info = rt.info
    meter = rt.audio.meter
    resolved = [e for e in events if e.status.value == "resolved"]
    summary: dict[str, int] = {}
    for e in resolved:
        summary[e.type] = summary.get(e.type, 0) + 1
    video = None
    if info is not None and info.video_codec:
        video = {
            "codec": info.video_codec, "width": info.width, "height": info.height, "fps": info.fps,
            "frames": rt.stats.frames_scored, "decoder": info.decoder, "tier": rt.tier,
            "decoder_note": info.decoder_note or None, "packets_skipped": rt.counters.packets_skipped,
            "decode_errors": rt.counters.decode_errors, "corrupt_frames": rt.counters.corrupt_frames,
            "timestamp_outliers": rt.counters.timestamp_outliers,
        }
    audio = None
    if info is not None and info.audio_codec:
        audio = {
            "codec": info.audio_codec, "channels": info.audio_channels, "sample_rate": info.audio_rate,
            "seconds": round(rt.stats.audio_seconds, 3),
            "integrated_lufs": _num(meter.integrated), "loudness_range_lu": _num(meter.loudness_range),
            "max_momentary_lufs": _num(meter.max_momentary), "max_short_term_lufs": _num(meter.max_short_term),
            "true_peak_max_dbtp": _num(20 * math.log10(rt.audio.max_true_peak)) if rt.audio.max_true_peak > 0 else None,
            "gaps": rt.counters.audio_gaps, "overlaps": rt.counters.audio_overlaps,
            "timestamp_resets": rt.counters.timestamp_resets,
        }
        audio["compliance"] = _compliance(rt, audio)
    duration = info.duration if info is not None and info.duration else rt.stats.media_end
    sync = next((d for d in rt.detectors if d.NAME == "av_sync"), None)
    errors = list(rt.errors)
    media = max(rt.stats.media_end, rt.audio_end)
    if info is not None and info.duration and not info.live and media > 0 and info.duration - media > max(1.0, 0.05 * info.duration):
        # The container promised more than could be decoded: a truncated or damaged file, not a clean one.
        errors.append(f"media ends at {media:.2f} s of the {info.duration:.2f} s the container gives (truncated or damaged)")
    return {
        "av_sync": sync.summary() if sync is not None and video and audio else None,
        "file": path,
        "duration": round(float(duration or 0.0), 3),
        "video": video,
        "audio": audio,
        "events": [e.to_dict() for e in resolved],
        "summary": summary,
        "errors": errors,
    }


def _compliance(rt: StreamRuntime, audio: dict[str, Any]) -> dict[str, Any] | None:
    """The programme's integrated loudness and maximum true peak against the stream's loudness standard."""
    from engine.detectors.loudness import standard

    cfg = rt.spec.detectors.get("loudness")
    if cfg is None:
        return None
    std = standard(cfg.standard)
    tp_cfg = rt.spec.detectors.get("true_peak")
    ceiling = tp_cfg.ceiling if tp_cfg is not None else std.true_peak_max
    integrated, tp = audio["integrated_lufs"], audio["true_peak_max_dbtp"]
    loud_ok = None if integrated is None else abs(integrated - cfg.target_lufs) <= cfg.tolerance_lu
    peak_ok = None if tp is None else tp <= ceiling
    return {
        "standard": cfg.standard, "target_lufs": cfg.target_lufs, "tolerance_lu": cfg.tolerance_lu,
        "true_peak_max_dbtp": ceiling, "integrated_ok": loud_ok, "true_peak_ok": peak_ok,
        "compliant": None if loud_ok is None or peak_ok is None else loud_ok and peak_ok,
    }


def _num(v: float | None) -> float | None:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return None
    return round(float(v), 2)


@app.command()
def check(
    files: Annotated[list[str], typer.Argument(help="media files (or URLs) to check")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per file on stdout")] = False,
    profile: Annotated[str, typer.Option(help="detector profile from --config")] = "default",
    config: Annotated[Path | None, typer.Option(help="config YAML with detectors and profiles")] = None,
    thumbnails: Annotated[Path | None, typer.Option(help="write alert thumbnails to this folder")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    decoder: Annotated[str, typer.Option(help="auto (NVDEC on a GPU device), pyav or nvdec")] = "auto",
    tier: Annotated[str, typer.Option(help="all, skip_nonref or keyframes: which frames are decoded")] = "all",
    review: Annotated[Path | None, typer.Option(help="keep corruption alerts' pictures in this review store")] = None,
    duration: Annotated[float, typer.Option(help="seconds to watch a live URL (udp://, srt://, http://…/x.ts, …); files are read to the end", min=0.5, max=86400.0)] = 10.0,
) -> None:
    """Check files (or live URLs, for --duration seconds) for faults. Exit code: 0 no fault, 1 faults found,
    2 error (unreadable input, a live URL that gave no media, bad config)."""
    try:
        cfg = load_config(config) if config is not None else FramewatchConfig()
        if profile != "default" and profile not in cfg.profiles:
            raise ConfigError(f"unknown profile {profile!r}" + (f"; known: {', '.join(sorted(cfg.profiles))}" if cfg.profiles else " (no --config with profiles given)"))
        detectors = resolve_detectors(cfg, profile)
        if decoder not in BACKEND_NAMES:
            raise ConfigError(f"unknown decoder {decoder!r}; choose one of {', '.join(BACKEND_NAMES)}")
        if tier not in TIERS:
            raise ConfigError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
        if tier != "all":
            detectors = {n: (replace(c, enabled=False) if REGISTRY[n].NEEDS_EVERY_FRAME else c) for n, c in detectors.items()}
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    _setup_logging("critical")  # stream problems are reported once, by the lines below (one line per file)
    worst = 0
    show_progress = not as_json and err.is_terminal
    reported = 0
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # between files (set-up, reports) SIGTERM is a Ctrl-C
    try:
        for n, path in enumerate(files):
            memory = MemorySink()
            engine = Engine(memory, device=device, thumbnails=ThumbnailWriter(thumbnails) if thumbnails else None,
                            review=ReviewStore(review) if review else None, torch_threads=cfg.engine.torch_threads, batch_frames=cfg.engine.batch_frames)
            # A live URL is watched as it comes (arrivals decide no_signal) for --duration; files as fast as they decode.
            pace = "auto" if is_live_url(path) else "fast"
            rt = engine.add_stream(StreamSpec(id=Path(path).name or path, url=path, detectors=detectors, source=SourceOptions(pace=pace, decoder=decoder, tier=tier)))
            if show_progress:
                with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=err, transient=True) as bar:
                    task = bar.add_task(Path(path).name, total=100)

                    def tick(rt: StreamRuntime = rt, task: int = task) -> None:
                        total = rt.info.duration if rt.info is not None and rt.info.duration else None
                        if total:
                            bar.update(task, completed=min(100.0, 100.0 * rt.stats.media_end / total))

                    interrupted = _run_check(engine, rt, duration, tick)
            else:
                interrupted = _run_check(engine, rt, duration)
            if rt.ctx.live and rt.stats.frames_scored == 0 and rt.stats.audio_seconds == 0 and not rt.errors:
                # A live input never ends by itself: after the watch, one that gave nothing is an error like an
                # unreadable file, with the reason the last connection attempt gave.
                rt.fail(f"no media within {duration:g} s" + (f" ({rt.last_disconnect})" if rt.last_disconnect else ""))
            promised = rt.info.duration if rt.info is not None and not rt.ctx.live else None
            if promised and rt.stats.frames_scored == 0 and rt.stats.audio_seconds == 0 and not rt.errors:
                rt.fail(f"nothing could be decoded of the {promised:.2f} s the container gives (truncated or damaged)")
            report = _file_report(path, rt, memory.events)
            report["device"] = str(engine.device)
            if interrupted:
                # What was seen up to the interrupt is reported (open events resolved there), never dropped.
                report["interrupted"] = True
                report["errors"].append(f"interrupted at {rt.stats.media_end:.2f} s: the rest was not checked")
            family = engine.scoring.families.get("corruption")
            if family is not None and family.slots:
                # Which model judged the pictures, and a model that could not be used, said out loud.
                report["corruption_model"] = next(iter(family.status().values()))
                report["errors"] += [f"corruption model: {st['error']}" for st in family.status().values() if st["error"]]
            if engine.device_note:
                # A GPU asked for and not there: the file was still checked, on the CPU, and the user is told.
                report["device_note"] = engine.device_note
                if path == files[0]:
                    err.print(f"framewatch: warning: {engine.device_note}", markup=False, highlight=False, soft_wrap=True)
            unreadable = rt.state == "error" and rt.stats.frames_scored == 0 and rt.stats.audio_seconds == 0
            if unreadable:
                err.print(f"framewatch: error: {path}: {rt.errors[0] if rt.errors else 'unreadable'}", markup=False, highlight=False, soft_wrap=True)
                worst = 2
            elif report["errors"]:
                err.print(f"framewatch: warning: {path}: {report['errors'][0]}", markup=False, highlight=False, soft_wrap=True)
            if (report["events"] or report["errors"]) and worst < 2:
                worst = max(worst, 1)  # a damaged file is not a clean one, even where no detector fired
            if as_json:
                sys.stdout.write(json.dumps(report) + "\n")
                sys.stdout.flush()
            elif not unreadable:
                _print_file(report)
            reported = n + 1
            if interrupted:
                _interrupted(files[reported:])
    except KeyboardInterrupt:  # not while a file was read (that one is reported): before or after one
        _interrupted(files[reported:])
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(worst)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _interrupted(rest: list[str]) -> None:
    err.print("framewatch: interrupted" + (f"; not checked: {', '.join(rest)}" if rest else ""),
              markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(130)  # 128 + SIGINT, as shells report it


def _run_check(engine: Engine, rt: StreamRuntime, duration: float, tick: Any = None) -> bool:
    """Run a check's engine to the end of the file (or `duration` of a live URL); True when Ctrl-C or SIGTERM
    cut it short. The engine finishes either way: the detectors close what they had open at that point."""
    previous = signal.getsignal(signal.SIGTERM)
    stopped: list[bool] = []

    def on_term(*_: Any) -> None:
        stopped.append(True)
        engine.stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        engine.run(on_tick=tick, deadline=time.monotonic() + duration if rt.ctx.live else None)
    except KeyboardInterrupt:
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return bool(stopped)


def _print_file(report: dict[str, Any]) -> None:
    v, a = report["video"], report["audio"]
    parts = [f"[bold]{report['file']}[/]  {report['duration']:.2f} s"]
    if v:
        parts.append(f"video {v['codec']} {v['width']}x{v['height']} {_fmt(v['fps'])} fps, {v['frames']} frames, {v['decode_errors']} decode errors")
    if a:
        loud = f"integrated {a['integrated_lufs']:.1f} LUFS" if a["integrated_lufs"] is not None else "too short for integrated loudness"
        parts.append(f"audio {a['codec']} {a['channels']} ch, {loud}")
    err.print("  ".join(parts))
    if not report["events"]:
        if report["errors"]:
            err.print(f"  [yellow]no detector fired, but the input is damaged: {report['errors'][0]}[/]")
        else:
            err.print("  [green]no faults[/]")
        return
    table = Table()
    for col in ("type", "severity", "start s", "end s", "duration s", "value", "threshold"):
        table.add_column(col)
    for e in report["events"]:
        table.add_row(e["type"], e["severity"], f"{e['start']:.3f}", _fmt(e["end"], 3), _fmt(e["duration"], 3), _fmt(e["value"], 3), _fmt(e["threshold"], 3))
    err.print(table)


@config_app.command("validate")
def config_validate(file: Annotated[Path, typer.Argument(help="config YAML")]) -> None:
    """Check a config file; exit 0 when valid, 2 with one line per problem otherwise."""
    try:
        cfg = load_config(file)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    err.print(f"{file}: valid ({len(cfg.streams)} stream(s), {len(cfg.profiles)} profile(s))")


@config_app.command("schema")
def config_schema(output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None) -> None:
    """Export the config's JSON schema (for editors and CI checks)."""
    text = json.dumps(json_schema(), indent=2)
    try:
        if output is None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        else:
            output.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot write the schema to {output or 'stdout'}: {exc.strerror or exc}") from None


@app.command()
def bench(
    device: Annotated[str, typer.Option(help="cuda[:N] or cpu")] = "cuda",
    codecs: Annotated[str, typer.Option(help="comma-separated: h264,hevc")] = "h264,hevc",
    tiers: Annotated[str, typer.Option(help="comma-separated tiers: all,skip_nonref,keyframes")] = "all,skip_nonref,keyframes",
    streams: Annotated[int, typer.Option(min=1, max=4096, help="concurrent streams per case")] = 32,
    procs: Annotated[str, typer.Option(help="worker processes for tier all, comma-separated, e.g. 1,4")] = "1",
    clip_seconds: Annotated[float, typer.Option(min=1, max=600, help="length of each generated 1080p30 clip")] = 10.0,
    keyframe_streams: Annotated[int | None, typer.Option(min=1, max=8192, help="streams for the keyframes tier (default: --streams)")] = None,
    decode_batch: Annotated[int, typer.Option(min=1, max=64, help="pictures per threaded NVDEC batch (tier all)")] = 8,
    clip: Annotated[list[str] | None, typer.Option(help="use this clip instead: CODEC=PATH (repeatable)")] = None,
    clip_dir: Annotated[Path, typer.Option(help="where generated clips are cached")] = Path("benchmarks/.cache"),
    output: Annotated[Path, typer.Option("--json", help="write the JSON report here")] = Path("benchmarks/results/bench.json"),
    calibration: Annotated[Path | None, typer.Option(help="write the scheduler calibration file here")] = None,
) -> None:
    """Throughput on this machine: decode-only ceiling vs end to end with all detectors, per codec and tier."""
    from engine import bench as b

    _setup_logging("warning")
    want_codecs = [c.strip() for c in codecs.split(",") if c.strip()]
    want_tiers = [t.strip() for t in tiers.split(",") if t.strip()]
    for c in want_codecs:
        if c not in b.ENCODERS:
            raise _fail(f"unknown codec {c!r}; choose from {', '.join(b.ENCODERS)}")
    for t in want_tiers:
        if t not in TIERS:
            raise _fail(f"unknown tier {t!r}; choose from {', '.join(TIERS)}")
    try:
        proc_list = [int(p) for p in procs.split(",") if p.strip()]
    except ValueError:
        raise _fail(f"--procs must be numbers like 1,4, not {procs!r}") from None
    given: dict[str, Path] = {}
    for item in clip or []:
        codec, _, path = item.partition("=")
        if codec not in b.ENCODERS or not path or not Path(path).is_file():
            raise _fail(f"--clip wants CODEC=PATH with an existing file, got {item!r}")
        given[codec] = Path(path)
    interrupted = False
    try:
        report = b.run(want_codecs, want_tiers, streams, proc_list or [1], device, clip_dir, clip_seconds, clips=given,
                       output=output, keyframe_streams=keyframe_streams, decode_batch=decode_batch)
        b.write(report, output)
    except KeyboardInterrupt:
        # Out of time (a wrapper's timeout sends SIGINT): show what was measured; the JSON has it already.
        interrupted = True
        if not output.exists():
            raise _fail("bench interrupted before the first case finished", 130) from None
        report = json.loads(output.read_text())
    cal = b.calibration(report)
    if calibration is not None:
        if cal is None:
            err.print("framewatch: no GPU measured; no calibration written")
        else:
            b.write(cal, calibration)
    rows = b.table(report)
    t = Table(title=f"framewatch bench on {report['environment'].get('gpu', 'CPU')} ({device})")
    for col in rows[0]:
        t.add_column(col)
    for r in rows[1:]:
        t.add_row(*r)
    Console(width=max(160, Console().width)).print(t)
    for r in report["results"]:
        for e in r["errors"]:
            err.print(f"  {r['codec']}/{r['tier']}: {e}", markup=False)
    err.print(f"JSON: {output}")
    if interrupted:
        err.print("framewatch: bench interrupted; the table shows the cases that finished")
        raise typer.Exit(130)


@app.command()
def detectors() -> None:
    """List the detectors with their version and default settings."""
    table = Table()
    for col in ("detector", "version", "media", "defaults"):
        table.add_column(col)
    for name, det in sorted(REGISTRY.items()):
        cfg = det.Config()
        defaults = ", ".join(
            f"{f.name}={(getattr(cfg, f.name).value if isinstance(getattr(cfg, f.name), Enum) else getattr(cfg, f.name))}"
            for f in fields(cfg) if f.name != "ignore"
        )
        table.add_row(name, det.VERSION, det.MEDIA, defaults)
    Console().print(table)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


model_cli.register(app)


def main() -> None:
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # A source thread can still be blocked inside FFmpeg (a stalled network read with a long timeout) when
    # everything has been said and stored: the interpreter's teardown under such a thread ends in a segfault.
    # Leave without the teardown then; what matters (events, the store, the outbox) is closed already.
    stuck = [t for t in threading.enumerate() if t.daemon and t.is_alive()]
    if stuck:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
