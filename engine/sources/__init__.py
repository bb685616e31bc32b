"""Sources: files, live URLs and synthetic:// test streams, each read by its own I/O thread."""

from __future__ import annotations

from urllib.parse import urlparse

from engine.sources.base import Source, SourceError, SourceOptions, Timeline
from engine.sources.media import MediaSource, is_live_url
from engine.sources.synthetic import SyntheticSource

__all__ = ["MediaSource", "Source", "SourceError", "SourceOptions", "SyntheticSource", "Timeline", "is_live_url", "open_source"]


def open_source(url: str, options: SourceOptions | None = None, faults: list[dict] | None = None) -> Source:
    """The source for a URL. Raises SourceError for a URL no source can take (checked before any I/O)."""
    options = options or SourceOptions()
    if not url or not url.strip():
        raise SourceError("empty URL")
    scheme = urlparse(url).scheme.lower()
    if scheme == "synthetic":
        return SyntheticSource(url, options, faults)
    if faults:
        raise SourceError("faults can only be scheduled on synthetic:// sources")
    if scheme in ("", "file") or len(scheme) == 1 or is_live_url(url) or scheme in ("http", "https"):
        return MediaSource(url, options)
    raise SourceError(f"unsupported URL scheme {scheme!r} in {url!r}")
