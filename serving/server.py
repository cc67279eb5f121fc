"""Run the inference app under uvicorn, with a graceful SIGTERM: not-ready, drain, then exit."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kensa.logs import configure_logging
from kensa.serving.app import create_app
from kensa.settings import Settings

log = logging.getLogger("kensa.serving.server")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM, readiness turns 503 for ``drain_s`` while requests are still
    served (so a load balancer stops sending new ones), then uvicorn shuts down gracefully:
    the listener closes, requests in flight finish, queued images are judged and logged.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._draining:
            super().handle_exit(sig, frame)  # Ctrl-C, or a second SIGTERM: stop now (still graceful)
            return
        self._draining = True
        state = getattr(self._app.state, "kensa", None)
        if state is not None:
            state.draining = True
        log.info("draining", extra={"seconds": self._drain_s})
        timer = threading.Timer(self._drain_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def serve(settings: Settings, *, model_file: Path | None = None, registry_name: str | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; blocks."""
    # One JSON object per line (kensa.logs), kensa's loggers and uvicorn's alike.
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, model_file=model_file, registry_name=registry_name)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        lifespan="on",
    )
    DrainingServer(config, app, settings.drain_s).run()
