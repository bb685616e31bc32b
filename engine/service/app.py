"""The service's HTTP side: the stream API, alert history and acks, /metrics, health, the page's event
stream and the mosaic page itself. FastAPI on uvicorn, in the engine's process."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from engine.service.metrics import CONTENT_TYPE, ServiceMetrics
from engine.service.service import Service, StreamRequestError
from engine.service.store import AlertQuery

log = logging.getLogger("framewatch.service")
STATIC = Path(__file__).resolve().parent / "static"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ALERT_ID = re.compile(r"^[0-9a-f]{1,64}$")
MAX_BODY = 256 * 1024


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _since(v: str | None) -> str | None:
    """An ISO 8601 time (or Unix seconds) as the store's ISO UTC text."""
    if v is None or v == "":
        return None
    bad = HTTPException(422, detail=[{"loc": ["query", "since"], "type": "value_error",
                                      "msg": "since must be an ISO 8601 time or Unix seconds"}])
    try:
        t = datetime.fromtimestamp(float(v), UTC)
    except (OverflowError, OSError):  # inf, or seconds beyond the calendar
        raise bad from None
    except ValueError:
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise bad from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _BodyLimit:
    """MAX_BODY for bodies sent without a length (chunked) too: they are counted as they are read, and the
    request ends with 413 the moment they pass the limit, before the rest is taken in."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise HTTPException(413, detail=f"request body larger than {MAX_BODY} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(service: Service, *, manage: bool = True) -> FastAPI:
    """The app for a service. With `manage`, the app's lifespan starts and stops the service."""
    metrics = ServiceMetrics(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage:
            await asyncio.to_thread(service.start)
        try:
            yield
        finally:
            if manage:
                await asyncio.to_thread(service.stop)

    app = FastAPI(title="framewatch", version=service.about()["version"], lifespan=lifespan,
                  docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(_BodyLimit)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"detail": f"request body larger than {MAX_BODY} bytes"}, status_code=413)
        protected = path.startswith("/api/") or path == "/metrics"
        if protected and service.token and path not in ("/api/docs", "/api/openapi.json") and not _authorised(request):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    def _authorised(request: Request) -> bool:
        token = service.token or ""
        given = ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        # The page's EventSource and <img> cannot send headers: a cookie (set by the page) or a query parameter.
        given = given or request.cookies.get("framewatch_token", "") or request.query_params.get("access_token", "")
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    # -- health and metrics
    # Liveness answers on the event loop itself: requests waiting for a worker thread (a burst of slow stream
    # changes fills the pool) must not make a live process look dead and get it restarted. (Readiness reads
    # the store, which may wait on its lock: it stays on the pool.)
    @app.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        ok, problems = service.readiness()
        return JSONResponse({"status": "ready" if ok else "not ready", "problems": problems},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # -- streams
    def _stream_id(stream_id: str) -> str:
        if not _ID.fullmatch(stream_id):
            raise HTTPException(404, detail=f"no stream {stream_id!r}")
        return stream_id

    @app.get("/api/about")
    def about() -> dict[str, Any]:
        return service.about()

    @app.get("/api/streams")
    def list_streams() -> list[dict[str, Any]]:
        return service.streams_status()

    @app.post("/api/streams", status_code=201)
    def add_stream(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        try:
            return service.add_stream(body)
        except StreamRequestError as exc:
            raise HTTPException(422, detail=exc.errors) from None
        except KeyError:
            raise HTTPException(409, detail=f"stream {body.get('id')!r} exists already") from None
        except RuntimeError as exc:
            raise HTTPException(503, detail=str(exc)) from None

    @app.get("/api/streams/{stream_id}")
    def get_stream(stream_id: str) -> dict[str, Any]:
        sid = _stream_id(stream_id)
        try:
            out = service.stream_status(sid)
        except LookupError:
            raise HTTPException(404, detail=f"no stream {sid!r}") from None
        out["config"] = service.stream_config(sid)
        return out

    @app.patch("/api/streams/{stream_id}")
    def patch_stream(stream_id: str, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        sid = _stream_id(stream_id)
        try:
            return service.update_stream(sid, body)
        except StreamRequestError as exc:
            raise HTTPException(422, detail=exc.errors) from None
        except LookupError:
            raise HTTPException(404, detail=f"no stream {sid!r}") from None
        except RuntimeError as exc:
            raise HTTPException(503, detail=str(exc)) from None

    @app.delete("/api/streams/{stream_id}", status_code=204)
    def delete_stream(stream_id: str) -> Response:
        sid = _stream_id(stream_id)
        try:
            service.remove_stream(sid)
        except LookupError:
            raise HTTPException(404, detail=f"no stream {sid!r}") from None
        return Response(status_code=204)

    @app.get("/api/streams/{stream_id}/thumbnail.jpg")
    def stream_thumbnail(stream_id: str) -> Response:
        sid = _stream_id(stream_id)
        try:
            data = service.tile(sid)
        except LookupError:
            raise HTTPException(404, detail=f"no stream {sid!r}") from None
        if data is None:
            raise HTTPException(404, detail=f"stream {sid!r} has no picture yet")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    # -- alerts
    @app.get("/api/alerts")
    def list_alerts(
        stream: Annotated[str | None, Query(max_length=64)] = None,
        type: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z0-9_]+$")] = None,
        status: Literal["firing", "resolved", "acknowledged", "unacknowledged"] | None = None,
        since: Annotated[str | None, Query(max_length=40)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        return service.alerts(AlertQuery(stream=stream, type=type, status=status, since=_since(since), limit=limit))

    def _alert_id(alert_id: str) -> str:
        if not _ALERT_ID.fullmatch(alert_id):
            raise HTTPException(404, detail=f"no alert {alert_id!r}")
        return alert_id

    @app.get("/api/alerts/{alert_id}")
    def get_alert(alert_id: str) -> dict[str, Any]:
        a = service.alert_view(_alert_id(alert_id))
        if a is None:
            raise HTTPException(404, detail=f"no alert {alert_id!r}")
        return a

    @app.post("/api/alerts/{alert_id}/ack")
    def ack_alert(alert_id: str, body: Annotated[dict[str, Any] | None, Body()] = None) -> dict[str, Any]:
        body = body or {}
        by, comment = body.get("by", ""), body.get("comment", "")
        if not isinstance(by, str) or len(by) > 100 or not isinstance(comment, str) or len(comment) > 1000:
            raise HTTPException(422, detail=[{"loc": ["body"], "type": "value_error",
                                              "msg": "by (<= 100 chars) and comment (<= 1000 chars) must be text"}])
        try:
            return service.ack(_alert_id(alert_id), by, comment)
        except LookupError:
            raise HTTPException(404, detail=f"no alert {alert_id!r}") from None

    @app.get("/api/alerts/{alert_id}/thumbnail.jpg")
    def alert_thumbnail(alert_id: str) -> Response:
        try:
            path = service.alert_thumbnail(_alert_id(alert_id))
        except LookupError:
            raise HTTPException(404, detail=f"no alert {alert_id!r}") from None
        if path is None:
            raise HTTPException(404, detail=f"alert {alert_id!r} has no thumbnail")
        return FileResponse(path, media_type="image/jpeg")

    # -- the page's live feed
    @app.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        q = service.broadcast.subscribe(loop)

        async def feed():
            try:
                first = await asyncio.to_thread(service.streams_status)
                yield _sse("streams", first)
                while not service.broadcast.closed:
                    try:
                        item = await asyncio.wait_for(q.get(), timeout=15)
                    except TimeoutError:
                        if await request.is_disconnected():
                            break
                        yield ": keep-alive\n\n"
                        continue
                    if item is None:
                        break
                    yield _sse(*item)
            finally:
                service.broadcast.unsubscribe(q)

        return StreamingResponse(feed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- the mosaic page (plain files: no build step)
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            raise HTTPException(404, detail="the mosaic page is not installed")
        return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def serve(service: Service, host: str, port: int, log_level: str = "warning",
          on_started: Any = None) -> None:
    """Run the service under uvicorn until SIGTERM or Ctrl-C; then drain (see Service.stop)."""
    import uvicorn

    app = create_app(service)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # The page's event streams never end by themselves; ending them first lets uvicorn's graceful
            # shutdown finish at once, then the lifespan drains the engine and the outbox.
            service.broadcast.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=False, lifespan="on")
    server = _Server(config)
    if on_started is not None:
        on_started(server)
    # uvicorn re-raises the signal that stopped it once it has shut down, with the handlers found at start:
    # these make that a normal exit (status 0) after the drain, instead of death by SIGTERM.
    import signal

    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
