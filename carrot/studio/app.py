"""The studio's web layer: a Starlette app over one :class:`~carrot.studio.state.Studio`, served by uvicorn.

Safe by default, as Jupyter is: it binds 127.0.0.1; every request needs the session's random token (in the URL once,
which sets a SameSite=Strict, HttpOnly cookie, or in the ``X-Carrot-Token`` header); requests whose Host is not the
address it serves are refused (DNS rebinding); a POST also needs the ``X-Carrot-Studio`` header, which a page on another
site cannot send without a CORS preflight the app never grants. It serves its own static files, images by id (decoded
and re-encoded, never a raw path), and the pages it wrote into its work folder by relative path, resolved (a path that
leaves it, through '..' or a symlink, is refused), no script in them but their own.
"""
from __future__ import annotations

import hmac
import io
import secrets
import socket
import sys
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from carrot.errors import CarrotError
from carrot.studio.state import Studio, Unknown, parse_actions

STATIC = Path(__file__).resolve().parent / "static"
SERVED = {".html": "text/html", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
          ".json": "application/json", ".csv": "text/csv", ".css": "text/css"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
THUMB = 320  # longest side of an image the app sends, px


def _page_policy() -> str:
    """The Content-Security-Policy of a served page: no script but the report pages' own image check (by its
    SHA-256), no plugins, no base URL, no form posts."""
    import base64
    import hashlib

    from carrot.report.pages import CHECK_JS

    digest = base64.b64encode(hashlib.sha256(CHECK_JS.encode()).digest()).decode()
    return f"script-src 'sha256-{digest}'; object-src 'none'; base-uri 'none'; form-action 'none'"


PAGE_POLICY = _page_policy()


def _cookie(port: int) -> str:
    return f"carrot_studio_{port}"


class Guard(BaseHTTPMiddleware):
    """Token, Host and (for POST) custom-header checks on every request."""

    def __init__(self, app: Any, token: str, hosts: set[str], port: int) -> None:
        super().__init__(app)
        self.token, self.hosts, self.port = token, hosts, port

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1 : host.find("]")]
        if self.hosts and name not in self.hosts:
            return JSONResponse({"error": f"host: this studio answers only {sorted(self.hosts)}, got {host!r}"}, 403)
        given = request.query_params.get("token") or request.headers.get("x-carrot-token") \
            or request.cookies.get(_cookie(self.port)) or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse({"error": "token: missing or wrong; open the URL carrot-run studio printed"}, 403)
        if request.method == "POST" and request.headers.get("x-carrot-studio") != "1":
            return JSONResponse({"error": "header: a studio request carries X-Carrot-Studio: 1"}, 403)
        if request.method == "GET" and request.url.path == "/" and "token" in request.query_params:
            resp: Response = RedirectResponse("/", 303)  # the token leaves the address bar and history
        else:
            resp = await call_next(request)
        resp.set_cookie(_cookie(self.port), self.token, httponly=True, samesite="strict")
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp


class Endpoints:
    """The app's endpoints over one studio (JSON answers under /api, images by id, files by checked path)."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.thumbnail = lru_cache(maxsize=512)(self._thumbnail)

    @staticmethod
    def api(work: Callable[[Any], Any]) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint running ``work(request)`` (GET) or ``work((request, body))`` (POST, JSON body) in a worker
        thread; a CarrotError is a 400 with its one line, an unknown id a 404."""
        async def endpoint(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            try:
                body = await request.json() if request.method == "POST" else None
            except ValueError:
                return JSONResponse({"error": "body: expected JSON"}, 400)
            try:
                out = await run_in_threadpool(work, (request, body) if request.method == "POST" else request)
            except Unknown as exc:
                return JSONResponse({"error": str(exc)}, 404)
            except CarrotError as exc:
                return JSONResponse({"error": str(exc)}, 400)
            return out if isinstance(out, Response) else JSONResponse(out)

        return endpoint

    @staticmethod
    def int_param(request: Request, name: str) -> int:
        raw = request.path_params.get(name, request.query_params.get(name))
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise CarrotError(f"{name}: expected an integer, got {raw!r}") from None

    @staticmethod
    def split_param(request: Request) -> str:
        split = request.path_params["split"]
        if split not in ("train", "test"):
            raise Unknown(f"split: expected 'train' or 'test', got {split!r}")
        return split

    def _thumbnail(self, split: str, i: int) -> bytes:
        from carrot.data import load_image

        im = load_image(self.studio.image_path(split, i))
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    def image(self, request: Request) -> Response:
        return Response(self.thumbnail(self.split_param(request), self.int_param(request, "i")), media_type="image/png")

    @staticmethod
    def served_file(root: Path, rel: str) -> Response:
        """A file under ``root`` by relative path, resolved first ('..' and symlinks out are refused); a page is served
        under :data:`PAGE_POLICY`: only the report pages' own check script runs, nothing injected into one could."""
        try:
            target = (root / rel).resolve()
            ok = root in target.parents and target.is_file() and target.suffix.lower() in SERVED
        except (OSError, ValueError):  # a NUL byte, a name too long
            ok = False
        if not ok:
            return JSONResponse({"error": f"path: {rel[:200]!r} is not a file of this studio"}, 404)
        media = SERVED[target.suffix.lower()]
        headers = {"Content-Security-Policy": PAGE_POLICY} if media in ("text/html", "image/svg+xml") else None
        return FileResponse(target, media_type=media, headers=headers)

    def export(self, args: Any) -> Response:
        _, body = args
        text, media = self.studio.export(parse_actions(body), str(body.get("format", "csv")))
        return Response(text, media_type=media)

    def routes(self) -> list:
        s, api, num = self.studio, self.api, self.int_param
        return [
            Route("/", lambda r: FileResponse(STATIC / "studio.html", media_type="text/html")),
            Route("/api/summary", api(lambda r: s.summary())),
            Route("/api/test", api(lambda r: s.test_list())),
            Route("/api/test/{i}", api(lambda r: s.test_detail(num(r, "i")))),
            Route("/api/train/{i}", api(lambda r: s.train_detail(num(r, "i")))),
            Route("/api/review", api(lambda r: s.review_list())),
            Route("/api/similar/{split}/{i}", api(lambda r: s.similar(self.split_param(r), num(r, "i")))),
            Route("/api/whatif", api(lambda a: s.answer(parse_actions(a[1]), bool(a[1].get("verify")))), methods=["POST"]),
            Route("/api/apply", api(lambda a: s.apply(parse_actions(a[1]), a[1].get("name"))), methods=["POST"]),
            Route("/api/export", api(self.export), methods=["POST"]),
            Route("/api/explain/{i}", api(lambda a: s.explain_job(num(a[0], "i")).view()), methods=["POST"]),
            Route("/api/certificate/{i}", api(lambda a: s.certificate_job(num(a[0], "i")).view()), methods=["POST"]),
            Route("/api/certificates", api(lambda a: s.certificates_job().view()), methods=["POST"]),
            Route("/api/jobs/{id}", api(lambda r: s.jobs.get(r.path_params["id"]).view())),
            Route("/img/{split}/{i}", api(self.image)),
            Route("/work/{path:path}", lambda r: self.served_file(s.work_dir, r.path_params["path"])),
            Mount("/static", StaticFiles(directory=STATIC)),
        ]


def create_app(studio: Studio, token: str, host: str = "127.0.0.1", port: int = 0) -> Starlette:
    """The ASGI app of ``studio``; ``token`` guards it; ``host``/``port``: where it is served (for the Host check)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        studio.close()

    hosts = set() if host in WILDCARD else {host, *LOOPBACK}  # bound everywhere on purpose: any name, the token guards
    return Starlette(routes=Endpoints(studio).routes(),
                     middleware=[Middleware(Guard, token=token, hosts=hosts, port=port)], lifespan=lifespan)


def listening_socket(host: str, port: int = 0) -> socket.socket:
    """A socket bound to (host, port) (port 0: a free one), handed to uvicorn as it is: no other process can take the
    port between choosing and serving it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CarrotError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


def free_port(host: str) -> int:
    with listening_socket(host) as s:
        return int(s.getsockname()[1])


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          work_dir: str | Path | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Open ``run_dir`` and serve the studio until interrupted; ``ready(url)`` is called once it listens (default:
    print the URL, token included, on stdout)."""
    import uvicorn

    from carrot.progress import note

    if host not in LOOPBACK:
        print(f"carrot: warning: the studio listens on {host}, reachable from other machines; anyone with the "
              "token can edit what-ifs and write new runs beside this one", file=sys.stderr)
    note(f"studio: opening '{run_dir}' (exact what-if over its test set)")
    studio = Studio(run_dir, work_dir)
    token = token or secrets.token_urlsafe(24)
    sock = listening_socket(host, port)
    port = int(sock.getsockname()[1])
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/?token={token}"
    app = create_app(studio, token, host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets)
        (ready or (lambda u: print(f"carrot studio: {u}", flush=True)))(url)

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
