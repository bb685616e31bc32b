"""Prometheus metrics of the service, read from the engine's own counters when scraped.

Nothing is counted twice or per frame: a collector walks the streams at scrape time (frames, drops, errors,
reconnects, fps, loudness, active alerts), and only what the engine does not keep itself (alerts fired by
type, detection latency) is counted as it happens. Each service has its own registry, so several services in
one process (tests) do not collide.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import __version__

if TYPE_CHECKING:
    from engine.service.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = (
    ("frames_decoded", "Video frames decoded", "video_frames"),
    ("frames_dropped", "Video frames dropped because the stream's queue was full", "frames_dropped"),
    ("decode_errors", "Packets or frames the decoder could not decode", "decode_errors"),
    ("reconnects", "Reconnections of a live input", "reconnects"),
    ("audio_gaps", "Forward jumps of the audio timestamps (missing audio)", "audio_gaps"),
    ("timestamp_resets", "Live timestamp discontinuities re-anchored on", "timestamp_resets"),
    ("clicks_paused", "Times the click analysis paused because the engine fell behind its live streams", "clicks_paused"),
)


class _EngineCollector(Collector):
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        streams = list(svc.engine.streams.items())
        for name, doc, field in _COUNTERS:
            fam = CounterMetricFamily(f"framewatch_{name}", doc, labels=["stream"])
            for sid, rt in streams:
                fam.add_metric([sid], float(getattr(rt.counters, field)))
            yield fam
        fps = GaugeMetricFamily("framewatch_stream_fps", "Decoded video frames per second, last seconds", labels=["stream"])
        up = GaugeMetricFamily("framewatch_stream_up", "1 while the stream delivers media (running), else 0",
                               labels=["stream", "state"])
        loud = GaugeMetricFamily("framewatch_loudness_lufs", "Loudness (EBU R128), LUFS", labels=["stream", "window"])
        for sid, rt in streams:
            r = svc._rates.get(sid)
            fps.add_metric([sid], r.fps if r is not None else 0.0)
            state = svc.display_state(rt)
            up.add_metric([sid, state], 1.0 if state == "running" else 0.0)
            m = rt.audio.meter
            for window, v in (("momentary", m.momentary), ("short_term", m.short_term), ("integrated", m.integrated)):
                if v is not None and math.isfinite(v):
                    loud.add_metric([sid, window], float(v))
        for sid in svc.engine.refused():
            up.add_metric([sid, "refused"], 0.0)  # no device had capacity: nothing watches it
        for sid in list(svc._not_started):
            up.add_metric([sid, "error"], 0.0)  # stored, but the config cannot run it
        yield fps
        yield up
        yield loud
        shed = GaugeMetricFamily("framewatch_load_shed", "1 while an analysis is paused because the engine is behind its "
                                 "live streams", labels=["analysis"])
        shed.add_metric(["clicks"], 1.0 if svc.engine.shed else 0.0)
        yield shed
        active = GaugeMetricFamily("framewatch_alerts_active", "Alerts firing now", labels=["stream", "type", "severity"])
        counts: dict[tuple[str, str, str], int] = {}
        for e in svc.active_alerts():
            key = (e.stream, e.type, e.severity.value)
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            active.add_metric(list(key), n)
        yield active
        total = CounterMetricFamily("framewatch_alerts", "Alerts fired since the service started", labels=["type"])
        for t, n in sorted(dict(svc.alerts_total).items()):
            total.add_metric([t], n)
        yield total
        for sink in svc.webhooks:
            yield from _webhook_metrics(sink)
        yield from _device_metrics(svc)
        info = InfoMetricFamily("framewatch_build", "framewatch build and runtime")
        info.add_metric([], {"version": __version__, "torch": torch.__version__, "device": svc.engine.label(),
                             "run": svc.run_id})
        yield info


def _webhook_metrics(sink: object) -> Iterator[Metric]:
    try:
        st = sink.stats()  # type: ignore[attr-defined]
    except Exception:
        return
    name = getattr(sink, "name", "webhook")
    for key, metric, doc in (("pending", "pending", "Alerts waiting in the webhook outbox"),
                             ("oldest_pending_age_s", "oldest_pending_seconds", "Age of the oldest alert waiting in the outbox")):
        g = GaugeMetricFamily(f"framewatch_webhook_{metric}", doc, labels=["sink"])
        v = st.get(key)
        g.add_metric([name], float(v or 0.0))
        yield g
    for key, doc in (("delivered", "Alerts the webhook receiver accepted"),
                     ("rejected", "Alerts the webhook receiver refused for good (4xx)"),
                     ("failures", "Failed delivery attempts (retried)")):
        c = CounterMetricFamily(f"framewatch_webhook_{key}", doc, labels=["sink"])
        c.add_metric([name], float(st.get(key) or 0))
        yield c


def _device_metrics(svc: Service) -> Iterator[Metric]:
    devs = list(dict.fromkeys(e.device for e in svc.engine.engines if e.device.type == "cuda"))
    if not devs:
        return
    mem = GaugeMetricFamily("framewatch_device_memory_bytes", "GPU memory", labels=["device", "kind"])
    util = GaugeMetricFamily("framewatch_device_utilisation_ratio", "GPU busy fraction", labels=["device", "engine"])
    for dev in devs:
        try:
            free, total = torch.cuda.mem_get_info(dev)
            mem.add_metric([str(dev), "total"], float(total))
            mem.add_metric([str(dev), "used"], float(total - free))
            mem.add_metric([str(dev), "torch_allocated"], float(torch.cuda.memory_allocated(dev)))
        except Exception:  # a lost device has no figures; the others still do
            continue
        try:  # utilisation needs NVML (nvidia-ml-py, the gpu extra)
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(dev.index or 0)
            u = pynvml.nvmlDeviceGetUtilizationRates(h)
            dec = pynvml.nvmlDeviceGetDecoderUtilization(h)[0]
            util.add_metric([str(dev), "sm"], u.gpu / 100)
            util.add_metric([str(dev), "decoder"], dec / 100)
        except Exception:
            pass
    yield mem
    if util.samples:
        yield util


class ServiceMetrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(_EngineCollector(service))
        self.latency = Histogram(
            "framewatch_detection_latency_seconds", "Fault onset to the alert firing",
            buckets=(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120), registry=self.registry)
        service.latency_observer = self.latency.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
