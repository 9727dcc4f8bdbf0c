"""`recs serve`: run the API under uvicorn with N workers (also `python -m serving.cli`)."""

from __future__ import annotations

import os
from typing import Any

import typer

from common.settings import Settings, SettingsError, get_settings

APP = "serving.main:create_app"
WORKER_HEALTHCHECK_S = 30
# Requests run concurrently in each worker; multi-threaded BLAS per matrix product only contends
# (a 50k x 64 product takes ~7 ms with a thread per core on a busy box, ~0.7 ms with one).
ONE_BLAS_THREAD = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")


def serve(
    workers: int = typer.Option(
        None, "--workers", "-w", help="Worker processes (default: settings.api.workers)."
    ),
    port: int = typer.Option(None, "--port", "-p", help="Port (default: settings.api.port)."),
    host: str = typer.Option(None, "--host", help="Interface (default: settings.api.host)."),
) -> None:
    """Serve the recommendations API (model loaded once per worker; hot reload on activation)."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    run_server(APP, settings, workers=workers, port=port, host=host)


def run_server(
    app: str, settings: Settings, *, workers: int | None = None, port: int | None = None, host: str | None = None
) -> None:
    """Run the ASGI app factory `app` ("module:function") as `recs serve` does: the one set of server
    settings, which `recs bench serve` also gives its no-op app to measure the same server's ceiling."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from common.metrics import MULTIPROC_ENV, multiprocess_dir
    from serving.core.limits import uvicorn_limits
    from serving.listeners import PerWorkerListener, balances_connections, ensure_port_free

    workers = workers or settings.api.workers
    for name, value in ONE_BLAS_THREAD.items():
        os.environ.setdefault(name, value)
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Each worker writes its metrics under this directory and /metrics sums them; it must be
        # set (and empty) before any worker imports prometheus_client.
        multiprocess_dir(settings.var_dir / "prometheus")
    host, port = host or settings.api.host, port or settings.api.port
    options: dict[str, Any] = dict(
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,  # request lines carry query strings; keys travel in headers and are never logged
        log_level="warning",
        # uvicorn's supervisor kills a worker that does not answer its ping in time; one spawned on a busy
        # machine spends seconds importing before it can, so its default of 5 s can kill it before it serves
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        **uvicorn_limits(settings.api),
    )
    if workers > 1 and balances_connections():  # a socket per worker: serving/listeners.py
        try:
            ensure_port_free(host, port)
        except OSError as exc:
            raise SystemExit(f"cannot serve on {host}:{port}: {exc.strerror}") from None
        config = uvicorn.Config(app, **options)
        Multiprocess(config, sockets=[PerWorkerListener(host, port)]).run()
    else:
        uvicorn.run(app, **options)


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.command("serve")(serve)


if __name__ == "__main__":
    typer.run(serve)
