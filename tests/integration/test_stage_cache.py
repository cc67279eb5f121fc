"""Prefect's cache of a training stage: one recipe on one dataset is trained once per top-level run.

The shape of pilot → sweep: a flow trains a stage, then a subflow asks for the same recipe from
another folder, on another device budget, with a reference; Prefect hands back the first result
(state ``Cached``) and nothing is trained. Another top-level run has another key: it trains again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from kensa.flows.stages import StageOutcome
from kensa.flows.tasks import TRAINED_FOR, reused_from, stage_cache_key, stage_task
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.models.train.trainer import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPE = TrainConfig(model="tiny_cnn", epochs=1, fraction=0.3, seed=0, max_minutes=10)


@pytest.fixture(scope="module", autouse=True)
def prefect_api(prefect_harness: None) -> None:
    """The session's Prefect API (see tests/conftest.py)."""


def _inputs(data: Path, out: Path, **config: Any) -> dict[str, Any]:
    return {
        "data_root": data,
        "out_dir": out,
        "train_config": replace(RECIPE, **config),
        "policy": BandPolicy(),
        "reference": None,
        "serving_batch": 8,
        "max_robustness_images": 16,
        "nproc": 1,
    }


@flow
def _sweep_like(data: str, out: str, reference: str) -> tuple[StageOutcome, str]:
    """The sweep's side: the same recipe, its own folder and run, no time budget, a reference."""
    inputs = _inputs(Path(data), Path(out) / "sweep", max_minutes=None)
    inputs["reference"] = Path(reference)
    state = stage_task(**inputs, mlflow_run_id="sweep-run", return_state=True)
    return state.result(), str(state.name)


@flow
def _pilot_like(data: str, out: str) -> tuple[StageOutcome, StageOutcome, str]:
    first = stage_task(**_inputs(Path(data), Path(out) / "pilot"), mlflow_run_id="pilot-run")
    second, state = _sweep_like(data, out, str(first.run_dir))
    return first, second, state


@flow
def _keys(data: str, out: str) -> dict[str, str | None]:
    """Cache keys of variants of the recipe, inside a flow run (the key is scoped to its root)."""
    d, o = Path(data), Path(out)
    variants = {
        "base": _inputs(d, o / "a"),
        "elsewhere": {**_inputs(d, o / "b", device="cuda", max_minutes=None), "nproc": 2},
        "seed": _inputs(d, o / "a", seed=1),
        "epochs": _inputs(d, o / "a", epochs=2),
        "fraction": _inputs(d, o / "a", fraction=0.5),
        "model": _inputs(d, o / "a", model="small_cnn"),
        "image_size": _inputs(d, o / "a", image_size=32),
        "band": {**_inputs(d, o / "a"), "policy": BandPolicy(alpha=0.05)},
        "pretrained": _inputs(d, o / "a", model="efficientnet_lite0"),  # its default rung: head
        "rung_named": _inputs(d, o / "a", model="efficientnet_lite0", finetune="head"),
        "rung_last": _inputs(d, o / "a", model="efficientnet_lite0", finetune="last"),
    }
    return {name: stage_cache_key(None, inputs) for name, inputs in variants.items()}  # type: ignore[arg-type]


def test_only_what_defines_the_stage_is_in_its_cache_key(tiny_line: Path, tmp_path: Path) -> None:
    keys = _keys(str(tiny_line), str(tmp_path))
    assert keys["base"] and keys["elsewhere"] == keys["base"]  # where and how long: not the recipe
    # A pilot left at the model's default rung and a sweep point naming it train the same thing.
    assert keys["rung_named"] == keys["pretrained"]
    others = [k for name, k in keys.items() if name not in ("base", "elsewhere", "rung_named")]
    assert len(set(others)) == len(others) and keys["base"] not in others
    # Another top-level run: another scope, another key for the same recipe.
    assert _keys(str(tiny_line), str(tmp_path))["base"] != keys["base"]


def test_the_same_stage_in_a_subflow_comes_from_the_cache(tiny_line: Path, tmp_path: Path) -> None:
    first, second, state = _pilot_like(str(tiny_line), str(tmp_path / "one"))
    assert (first.run_dir / "model.onnx").is_file() and first.extra[TRAINED_FOR] == "pilot-run"
    # Prefect's cached result: the pilot's outcome, its folder and run; nothing trained again.
    assert state == "Cached"
    assert second.run_dir == first.run_dir == tmp_path / "one" / "pilot"
    assert second.seconds == first.seconds and second.onnx_path == first.onnx_path
    assert reused_from(second, "sweep-run") == "pilot-run"
    assert not (tmp_path / "one" / "sweep").exists()
    assert reused_from(first, "pilot-run") is None
