"""Alert sinks: where events go once a detector has emitted them."""

from engine.alerts.sinks import CallbackSink, EventSink, JsonlSink, MemorySink, MultiSink
from engine.alerts.thumbnails import ThumbnailWriter

__all__ = ["CallbackSink", "EventSink", "JsonlSink", "MemorySink", "MultiSink", "ThumbnailWriter"]
