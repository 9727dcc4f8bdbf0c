"""No-op FastAPI routes served exactly as `recs serve` serves the API: the ceilings `recs bench serve` and
`recs bench ingest` compare the recommendations and events routes with (`python -m bench.noop_app
--workers N --port P`)."""

from __future__ import annotations

import typer
from fastapi import FastAPI, Request, Response

APP = "bench.noop_app:create_app"


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/noop")
    async def noop() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/noop")
    async def noop_post(request: Request) -> Response:
        await request.body()  # read, as an ingesting route must
        return Response(b'{"ok":true}', status_code=202, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app


def main(
    workers: int = typer.Option(2, "--workers", "-w"),
    port: int = typer.Option(..., "--port", "-p"),
) -> None:
    from common.settings import get_settings
    from serving.cli import run_server

    run_server(APP, get_settings(), workers=workers, port=port)


if __name__ == "__main__":
    typer.run(main)
