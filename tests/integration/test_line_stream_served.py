"""`kensa line stream` against a real `kensa serve` (uvicorn, SQLite store): N parts in, N rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from serving_helpers import Api, serve_api
from typer.testing import CliRunner

from kensa.cli.main import app
from kensa.models.line.stream import StreamPlan, iter_stream

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from serve_api(tmp_path_factory.mktemp("stream-serve"))


def _stream(api: Api, *args: str) -> str:
    result = CliRunner().invoke(
        app,
        ["line", "stream", "--url", api.server.base, "--key", api.keys["line"], *args],
    )
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("batch", ["1", "12"])
def test_every_part_sent_is_judged_and_logged_once(api: Api, batch: str) -> None:
    before = api.count()
    line = f"L7b{batch}"
    out = _stream(
        api,
        "--n",
        "240",
        "--seed",
        "11",
        "--image-size",
        "32",
        "--line-id",
        line,
        "--concurrency",
        "6",
        "--batch",
        batch,
    )
    rows = api.rows(line_id=line)
    assert api.count() - before == 240 and len(rows) == 240
    assert sorted(r.part_id for r in rows) == [f"{line}-11-{k:06d}" for k in range(240)]
    # Each part carries the camera it was imaged by (a batch holds one camera's parts).
    cameras = {p.part_id: p.camera for p in iter_stream(StreamPlan(240, 11, 32, line=line))}
    assert {r.part_id: r.camera_id for r in rows} == cameras
    assert Counter(cameras.values()).keys() == {"C1", "C2"}
    assert {r.model_name for r in rows} == {api.model_name}
    assert len({r.idempotency_key for r in rows}) == 240
    assert "240 judged, 0 failed" in out
    version = rows[0].model_version
    assert f"{api.model_name}/{version}" in out  # the summary names the version that judged


def test_a_shifted_stream_reports_both_phases_and_sends_the_camera_given(api: Api) -> None:
    out = _stream(
        api,
        "--n",
        "60",
        "--seed",
        "12",
        "--image-size",
        "32",
        "--line-id",
        "L8",
        "--camera-id",
        "C2",
        "--shift",
        "lighting=0.4",
        "--shift-at",
        "30",
        "--rate",
        "400",
    )
    rows = api.rows(line_id="L8")
    assert len(rows) == 60 and {r.camera_id for r in rows} == {"C2"}
    assert "before shift" in out and "after shift" in out and "lighting=0.4 from part 30" in out
    # The contract model's p(ok) follows brightness: darker parts get fewer ok verdicts.
    by_part = {r.part_id: r.probs["ok"] for r in rows}
    early = [by_part[f"L8-12-{k:06d}"] for k in range(30)]
    late = [by_part[f"L8-12-{k:06d}"] for k in range(30, 60)]
    assert sum(late) / 30 < sum(early) / 30


def test_a_wrong_key_stops_the_stream_with_exit_code_2(api: Api) -> None:
    before = api.count()
    result = CliRunner().invoke(
        app,
        [
            "line",
            "stream",
            "--url",
            api.server.base,
            "--key",
            "kensa_not_a_key",
            "--n",
            "20",
            "--image-size",
            "32",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "refused the API key (401" in " ".join(result.output.split())
    assert api.count() == before
