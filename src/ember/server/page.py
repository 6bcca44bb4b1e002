"""The chat page at `/`: static files from the package (server/static/), no build step.

The files are open to everyone (they hold nothing secret); the API calls the page makes need
the key like any other client's. A strict Content-Security-Policy allows only this origin's
scripts, styles and connections: the page works offline and nothing can be injected from a
reply (the page renders replies as text anyway).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

# URL path -> (file in server/static/, media type)
_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/static/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(_FILES)

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new ember version's page, not a cached old one
}


def _endpoint(body: bytes, media_type: str):
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return serve


def add_page(app: FastAPI) -> None:
    static = resources.files("ember.server") / "static"
    for path, (name, media_type) in _FILES.items():
        # Not in the API's schema: the page is not part of the OpenAI protocol.
        app.add_api_route(path, _endpoint((static / name).read_bytes(), media_type),
                          methods=["GET"], include_in_schema=False, response_class=Response)
