"""SPC alerts of the drift job: p-charts over the chain's block windows, one alert per broken rule.

Each block window (non-overlapping, see ``windows.py``) stores its verdict counts in the drift
result's ``details["spc"]``; this module reads the newest blocks back, runs the defect-rate and
review-rate charts over them and opens an ``spc`` alert for a rule that a new block broke (one
active alert per chart, line and camera; a critical hit supersedes an active warning).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from kensa.monitoring.alerts import SYSTEM_ACTOR, find_active, open_alert, resolve
from kensa.monitoring.policy_store import PolicyStore
from kensa.monitoring.reference import ReferenceProfile
from kensa.monitoring.spc import CHARTS, RuleHit
from kensa.monitoring.windows import Group, recent_blocks
from kensa.store.models import DriftResult

_RANK = {"none": 0, "warning": 1, "critical": 2}


def check_spc(
    session: Session,
    store: PolicyStore,
    reference: ReferenceProfile,
    ref_camera: str | None,
    mode: str,
    group: Group,
    new_blocks: int,
) -> list[int]:
    """Run both charts over the chain's newest subgroups; open alerts for rules the new ones broke."""
    opened: list[int] = []
    if not new_blocks:
        return opened
    blocks = recent_blocks(session, group, mode, limit=8 + new_blocks)
    sizes = np.array([b.details["spc"]["n"] for b in blocks])
    for chart_name, key in zip(CHARTS, ("defect", "review"), strict=True):
        chart = store.chart(reference, ref_camera, chart_name, subgroup=int(np.median(sizes)))
        counts = np.array([b.details["spc"][key] for b in blocks])
        hits = [h for h in chart.check(counts, sizes) if h.index >= len(blocks) - new_blocks]
        if hits:
            worst = max(hits, key=lambda h: (h.level == "critical", h.index))
            alert_id = _raise_spc(
                session, group, chart.describe(), blocks[worst.index], counts[worst.index], worst
            )
            if alert_id is not None:
                opened.append(alert_id)
    return opened


def _raise_spc(
    session: Session,
    group: Group,
    chart: dict[str, Any],
    block: DriftResult,
    count: int,
    hit: RuleHit,
) -> int | None:
    name = str(chart["chart"])
    key = f"spc:{name}"
    active = find_active(session, kind="spc", line_id=group.line_id, camera_id=group.camera_id, cause_key=key)
    if active is not None and _RANK[active.level] >= _RANK[hit.level]:
        return None
    share = count / block.window_size
    cause = (
        f"{name.replace('_', ' ')} {share:.1%} on line {group.line_id}"
        + (f" camera {group.camera_id}" if group.camera_id else "")
        + f" vs centre {float(chart['center']):.1%}"
        + f" (limits {float(chart['lcl']):.1%}–{float(chart['ucl']):.1%}):"
        + f" {hit.describe()}"
    )
    alert = open_alert(
        session,
        level=hit.level,
        kind="spc",
        cause=cause,
        line_id=group.line_id,
        camera_id=group.camera_id,
        window_start=block.window_start,
        window_end=block.window_end,
        window_size=block.window_size,
        top_features=[{"name": name, "share": round(share, 4), "rule": hit.rule}],
        details={"key": key, "chart": chart, "drift_result": block.id, "rule": hit.rule, "side": hit.side},
    )
    if active is not None:
        resolve(session, active.id, by=SYSTEM_ACTOR, comment=f"superseded by critical alert {alert.id}")
    return alert.id
