"""A no-op FastAPI route served exactly as `recs serve` serves the API: the ceiling `recs bench serve`
compares the recommendations route with (`python -m bench.noop_app --workers N --port P`)."""

from __future__ import annotations

import typer
from fastapi import FastAPI

APP = "bench.noop_app:create_app"


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/noop")
    async def noop() -> dict[str, bool]:
        return {"ok": True}

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
