"""Calibrated drift policies and SPC charts, cached in memory and on disk per reference and design.

Calibrating a policy bootstraps tens of thousands of windows (seconds); a check that runs every few
minutes should not pay that each time, so the result is kept under
``data_dir/monitoring/policies/`` keyed by the reference's content hash, the camera subset, the
window design and the budget.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kensa.monitoring.policy import DriftPolicy, calibrate, load_policy, save_policy
from kensa.monitoring.reference import ReferenceProfile
from kensa.monitoring.spc import PChart, calibrate_chart
from kensa.settings import Settings

log = logging.getLogger("kensa.monitoring.policy_store")


class PolicyStore:
    """Hands out calibrated policies and charts, calibrating each at most once per key."""

    def __init__(self, settings: Settings, *, seed: int = 0, n_boot: int = 10_000) -> None:
        self._root = settings.data_dir / "monitoring" / "policies"
        self._budget = settings.false_alarm_per_10k
        self._seed = seed
        self._n_boot = n_boot
        self._policies: dict[str, DriftPolicy] = {}
        self._charts: dict[str, PChart] = {}

    def _key(self, reference: ReferenceProfile, camera: str | None, *parts: object) -> str:
        cam = "".join(ch if ch.isalnum() else "_" for ch in (camera or "all"))[:32]
        tail = "-".join(str(p) for p in parts)
        return f"{reference.digest()}-{cam}-{tail}-b{self._budget:g}-s{self._seed}"

    def policy(
        self, reference: ReferenceProfile, camera: str | None, *, window: int, stride: int
    ) -> DriftPolicy:
        key = self._key(reference, camera, f"w{window}", f"s{stride}", f"n{self._n_boot}")
        if key in self._policies:
            return self._policies[key]
        path = self._root / f"{key}.npz"
        policy: DriftPolicy | None = None
        if path.is_file():
            try:
                policy = load_policy(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("policy_cache_unreadable", extra={"path": str(path), "error": str(exc)})
        if policy is None:
            table, _ = reference.for_camera(camera)
            policy = calibrate(
                table,
                window=window,
                stride=stride,
                false_alarm_per_10k=self._budget,
                n_boot=self._n_boot,
                seed=self._seed,
            )
            save_policy(policy, path)
            log.info(
                "policy_calibrated",
                extra={
                    "policy": key,
                    "warning": round(policy.warning, 4),
                    "critical": round(policy.critical, 4),
                },
            )
        self._policies[key] = policy
        return policy

    def chart(self, reference: ReferenceProfile, camera: str | None, name: str, *, subgroup: int) -> PChart:
        key = self._key(reference, camera, name, f"m{subgroup}")
        if key in self._charts:
            return self._charts[key]
        path: Path = self._root / f"{key}.json"
        if path.is_file():
            chart = PChart(**json.loads(path.read_text()))
        else:
            table, _ = reference.for_camera(camera)
            center = reference.verdict_rates(table)[name]
            chart = calibrate_chart(
                name,
                center,
                len(table),
                subgroup=subgroup,
                false_alarm_per_10k=self._budget,
                seed=self._seed,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(chart.__dict__))
        self._charts[key] = chart
        return chart
