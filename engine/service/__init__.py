"""`framewatch serve`: the engine as a service with a stream API, alert history, metrics and a mosaic page."""

from engine.service.service import Service, StreamRequestError
from engine.service.store import AlertQuery, StateStore

__all__ = ["AlertQuery", "Service", "StateStore", "StreamRequestError"]
