"""The simulated line stream: deterministic parts, a shift that starts at part K, clear refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kensa.cli.main import app
from kensa.cli.stream import Sent, StreamSummary
from kensa.models.line.stream import StreamPlan, iter_stream, parse_shifts


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def test_the_same_seed_sends_the_same_parts_and_another_seed_others() -> None:
    plan = StreamPlan(n=12, seed=3, image_size=32)
    first = list(iter_stream(plan))
    again = list(iter_stream(plan))
    assert [p.png for p in first] == [p.png for p in again]
    assert [p.part_id for p in first] == [f"L1-3-{k:06d}" for k in range(12)]
    # Starting half-way gives the same parts: part k depends on (seed, k) only.
    assert [p.png for p in iter_stream(plan, start=6)] == [p.png for p in first[6:]]
    other = list(iter_stream(StreamPlan(n=12, seed=4, image_size=32)))
    assert all(a.png != b.png for a, b in zip(first, other, strict=True))
    assert {p.label for p in first + other} & {"ok"}  # a line of real parts, ok ones included


def test_a_lighting_shift_darkens_exactly_the_parts_from_k_on() -> None:
    clean = list(iter_stream(StreamPlan(n=20, seed=1, image_size=32)))
    plan = StreamPlan(n=20, seed=1, image_size=32, shift=parse_shifts(["lighting=0.5"]), shift_at=8)
    shifted = list(iter_stream(plan))
    assert [p.shifted for p in shifted] == [k >= 8 for k in range(20)]
    # Before K: byte-identical to the clean stream. From K: the same parts, darker.
    assert [p.png for p in shifted[:8]] == [p.png for p in clean[:8]]
    for before, after in zip(clean[8:], shifted[8:], strict=True):
        assert after.part_id == before.part_id and after.label == before.label
        ratio = _pixels(after.png).mean() / _pixels(before.png).mean()
        assert 0.35 < ratio < 0.65, ratio


@pytest.mark.parametrize(
    ("shift", "check"),
    [
        ("blur=4", lambda a, b: np.abs(np.diff(a, axis=1)).mean() < np.abs(np.diff(b, axis=1)).mean()),
        ("noise=30", lambda a, b: np.abs(np.diff(a, axis=1)).mean() > np.abs(np.diff(b, axis=1)).mean()),
        ("colour_temp=3000", lambda a, b: (a[..., 0] / a[..., 2]).mean() > (b[..., 0] / b[..., 2]).mean()),
    ],
    ids=["blur-smooths", "noise-roughens", "warm-light-reddens"],
)
def test_each_optical_shift_changes_the_images_the_way_its_name_says(shift: str, check) -> None:  # type: ignore[no-untyped-def]
    clean = list(iter_stream(StreamPlan(n=6, seed=2, image_size=64)))
    moved = list(iter_stream(StreamPlan(n=6, seed=2, image_size=64, shift=parse_shifts([shift]))))
    a = np.stack([_pixels(p.png) for p in moved]) + 1.0
    b = np.stack([_pixels(p.png) for p in clean]) + 1.0
    assert check(a, b)


def test_class_shifts_change_the_labels() -> None:
    new_type = StreamPlan(n=200, seed=5, image_size=32, shift=parse_shifts(["new_defect=crack"]))
    labels = {p.label for p in iter_stream(new_type)}
    assert labels == {"ok", "defect_crack"}
    more = StreamPlan(n=200, seed=5, image_size=32, shift=parse_shifts(["class_mix=0.8"]))
    share = np.mean([p.label != "ok" for p in iter_stream(more)])
    assert share > 0.7  # from the nominal 0.3


def test_bad_shift_names_and_values_are_refused_naming_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown shift 'brightness'; accepted shifts: lighting"):
        parse_shifts(["brightness=0.5"])
    with pytest.raises(ValueError, match="not of the form name=value"):
        parse_shifts(["lighting"])
    with pytest.raises(ValueError, match="not a defect type; accepted: scratch, dent"):
        parse_shifts(["new_defect=bubble"])
    with pytest.raises(ValueError, match="outside the accepted range"):
        StreamPlan(n=5, shift=parse_shifts(["lighting=9"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shift", "brightness=0.5"], "unknown shift 'brightness'; accepted shifts:"),
        (["--shift", "lighting=dim"], "condition lighting needs a number"),
        (["--shift", "lighting=0.5", "--shift-at", "50"], "--shift-at 50 is outside"),
        (["--shift-at", "3"], "--shift-at needs at least one --shift"),
        (["--line-id", "line one"], "condition line='line one'"),
        (["--url", "127.0.0.1:8000"], "--url must be the service's http(s) address"),
    ],
)
def test_the_cli_refuses_bad_input_with_exit_code_2(args: list[str], message: str) -> None:
    base = ["line", "stream", "--url", "http://127.0.0.1:9", "--key", "k", "--n", "10"]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_an_unreachable_service_is_named_not_retried_part_by_part() -> None:
    result = CliRunner().invoke(
        app, ["line", "stream", "--url", "http://127.0.0.1:9", "--key", "k", "--n", "5"]
    )
    assert result.exit_code == 4  # ExitCode.UNAVAILABLE: try again later, unlike bad input (2)
    assert "cannot reach the service at http://127.0.0.1:9" in " ".join(result.output.split())


def test_the_summary_counts_escapes_and_false_rejects_per_model_and_phase() -> None:
    plan = StreamPlan(n=4, shift=parse_shifts(["lighting=0.5"]), shift_at=2)
    summary = StreamSummary(plan, "run")
    summary.results = [
        Sent(0, "a", "ok", False, 200, verdict="ok", model="m/1"),
        Sent(1, "b", "defect_dent", False, 200, verdict="defect", model="m/1"),
        Sent(2, "c", "defect_dent", True, 200, verdict="ok", model="m/1"),  # an escape
        Sent(3, "d", "ok", True, 200, verdict="defect", model="m/2"),  # a false reject
        Sent(4, "e", "ok", True, 503, error="503 queue_full"),
    ]
    rows = {(r["model"], r["phase"]): r for r in summary.by_model()}
    assert rows[("m/1", "before shift")]["parts"] == 2
    assert rows[("m/1", "after shift")]["escapes"] == 1
    assert rows[("m/2", "after shift")]["false_rejects"] == 1
    assert len(summary.errors) == 1 and summary.to_json()["judged"] == 4
