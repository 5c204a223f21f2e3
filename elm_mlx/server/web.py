"""The chat page: static files shipped in the package (static/), served at / and /static/.

The page talks to the server only through the public API (/v1/models,
/v1/chat/completions streamed, /health), so it needs nothing beyond Starlette.
"""

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


class _Revalidated(StaticFiles):
    """Static files that the browser revalidates (ETag) on each load, so an upgraded server serves its own page."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        return response


async def _index(request: Request):
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})


def page_routes() -> list:
    return [Route("/", _index, methods=["GET", "HEAD"]), Mount("/static", app=_Revalidated(directory=STATIC), name="static")]
