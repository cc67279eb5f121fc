"""What the console's pages share, attached to the console app as ``app.state.console``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from kensa.serving.console.web import Pages
from kensa.settings import Settings

if TYPE_CHECKING:
    from kensa.serving.console.heatmap import Heatmap
    from kensa.serving.console.registry_view import RegistryView

CurrentModel = Callable[[], dict[str, Any] | None]
RefreshChampion = Callable[[str], Awaitable[str]]
# The served anomaly model's heatmap of an encoded image, drawn off the event loop; raises
# HeatmapUnavailable (no model, a classifier) or ApiError (bytes that are no readable image).
DrawHeatmap = Callable[[bytes], Awaitable["Heatmap"]]


async def _no_serving(data: bytes) -> Heatmap:
    from kensa.serving.console.heatmap import HeatmapUnavailable

    raise HeatmapUnavailable(503, "no_model", "the console runs without serving: no model can draw a heatmap")


@dataclass
class Console:
    settings: Settings
    sessions: sessionmaker[Session]
    pages: Pages
    current_model: CurrentModel  # the model the inference app serves now (describe()), if any
    refresh_champion: RefreshChampion  # look at the champion alias now; a sentence for people
    draw_heatmap: DrawHeatmap = field(default=_no_serving)  # the served anomaly model's heatmap

    @cached_property
    def registry(self) -> RegistryView:
        from kensa.serving.console.registry_view import RegistryView  # MLflow: only when used

        return RegistryView(self.settings)


def console_of(request: Request) -> Console:
    found: Console = request.app.state.console
    return found
