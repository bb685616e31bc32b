"""Sources: files, live URLs and synthetic:// test streams, each read by its own I/O thread."""

from __future__ import annotations

from urllib.parse import urlparse

from engine.sources.base import Source, SourceError, SourceOptions, Timeline
from engine.sources.media import MediaSource, is_live_url, is_local_url
from engine.sources.synthetic import SyntheticSource

__all__ = ["MediaSource", "Source", "SourceError", "SourceOptions", "SyntheticSource", "Timeline", "is_live_url", "open_source"]


def _threaded_nvdec(options: SourceOptions) -> bool:
    """Files at tier `all` on a GPU go through the native threaded NVDEC reader when NVDEC is usable."""
    if options.decoder not in ("auto", "nvdec") or not str(options.device).startswith("cuda") or options.tier != "all":
        return False
    if not options.video or not options.threaded:
        return False
    from engine.decode.nvdec import available

    return available()[0]


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
    local = is_local_url(url)
    if local and _threaded_nvdec(options):
        from engine.sources.nvdec_file import NvdecFileSource

        return NvdecFileSource(url, options)
    if local or is_live_url(url) or scheme in ("http", "https"):
        if not local:
            _check_address(url)
        return MediaSource(url, options)
    raise SourceError(f"unsupported URL scheme {scheme!r} in {url!r}")


def _check_address(url: str) -> None:
    """A network URL whose port or IPv4 address cannot exist is refused now, not retried for ever."""
    import ipaddress
    import re

    u = urlparse(url)
    try:
        u.port  # noqa: B018 (raises for a port out of range or not a number)
    except ValueError as exc:
        raise SourceError(f"bad port in {url!r}: {exc}") from None
    host = u.hostname or ""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise SourceError(f"bad IPv4 address {host!r} in {url!r}") from None
