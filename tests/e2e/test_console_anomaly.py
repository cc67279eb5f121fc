"""Learning from good parts only, end to end in a real browser: a PatchCore model fitted on the
good parts of a synthetic line goes from ingest to champion to a served verdict with a region, and
the console's review page lays its heatmap over the part (key ``h``).

The line starts with a classifier as champion (registered as the console scene registers one) and
a real ``kensa serve`` following the champion alias. Meanwhile a dataset is made and ingested as
an anomaly task (defective parts only in calibration and test), PatchCore is fitted, its band
calibrated, exported with parity and registered as a candidate by ``kensa.flows.register`` (dana,
a data scientist). In the browser alice, an operator, approves it (the two-person rule: not her
own); serving swaps to it; a defective part judged into the review band reaches the queue.

The tests run in file order: the first looks at the line while the classifier is still served.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from console_models import NAME, register_version
from console_scene import PROJECT_CONFIG, UNNAMED_CONTROLS_JS, Scene, _start, make_people
from PIL import Image
from playwright.sync_api import Page, expect
from serving_helpers import Server, build_contract_model, solid
from sqlalchemy import select

from kensa.registry import ALIAS_CHAMPION, TAG_REGISTERED_BY, TAG_STATUS
from kensa.store.models import ReviewItem

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 96  # the integration test's size: PatchCore finds the synthetic line's defects at 96 px
CLASSIFIER_LINE = "line-1"  # parts the classifier judged
GONE_LINE = "line-gone"  # a part whose stored image is deleted
ANOMALY_LINE = "line-anomaly"  # parts the anomaly model judged
JUDGED_STREAM = 55  # parts sent over the line: never in the dataset


def sign_in(page: Page, scene: Scene, person: str, next_path: str) -> None:
    page.goto(f"{scene.console}/login?next={next_path}")
    page.get_by_label("API key").fill(scene.keys[person])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("user")).to_contain_text(person)


def learn_from_good_parts(root: Path) -> tuple[Path, dict[str, Any]]:
    """Dataset → ingest (task anomaly) → fit on good parts → band → ONNX with parity; seconds."""
    from kensa.models.data.ingest import ingest_dataset
    from kensa.models.evaluation.evaluate_anomaly import evaluate_anomaly_run
    from kensa.models.evaluation.evaluate_run import BandPolicy
    from kensa.models.line.synthetic import generate_dataset
    from kensa.models.nets.patchcore import PatchCoreConfig
    from kensa.models.onnx.anomaly import export_anomaly_run
    from kensa.models.train.anomaly import fit_anomaly_run
    from kensa.settings import Settings

    data = root / "line"
    generate_dataset(data, n=120, seed=5, image_size=SIZE)
    dataset = ingest_dataset(data, Settings(data_dir=root / "home"), task="anomaly")
    assert dataset.task == "anomaly" and {r.label for r in dataset.split("train")} == {"ok"}
    run = root / "run"
    fit_anomaly_run(data, run, PatchCoreConfig(bank_size=256))
    # A pilot's targets, loose enough for 120 parts (the band certifies them from 15 good and
    # 23 defective calibration parts).
    metrics = evaluate_anomaly_run(run, BandPolicy(alpha=0.2, delta=0.2, max_false_reject=0.2))
    report = export_anomaly_run(run, run / "model.onnx", parity_images=16)
    assert report["parity"]["passed"]
    return run / "model.onnx", {**metrics, "parity": report["parity"]}


def register_candidate_as_flows_do(
    onnx_path: Path, metrics: dict[str, Any], *, uri: str, store: str, experiment: str, by: str
) -> str:
    """``kensa.flows.register.register_candidate`` in an MLflow run holding the evaluation."""
    import mlflow

    from kensa.flows.register import register_candidate
    from kensa.settings import Settings

    settings = Settings(data_dir=onnx_path.parent / "home", store_url=store, mlflow_tracking_uri=uri)
    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment, run_name="patchcore-good-parts"):
            mlflow.log_metrics(
                {
                    f"test.{k}": float(metrics[k])
                    for k in ("escape_rate", "false_reject_rate", "automation_rate")
                    if metrics.get(k) is not None
                }
            )
            registered = register_candidate(
                onnx_path,
                NAME,
                registered_by=by,
                source="pilot",
                kpi={"passed": True, "escape_rate": metrics["escape_rate"], "n_test": metrics["n_test"]},
                cost={"currency": "USD"},
                parity=metrics["parity"],
                settings=settings,
            )
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return registered.version


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("anomaly-console")
    uri, store = f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'kensa.db'}"
    data = root / "data"
    data.mkdir()
    (root / "kensa.toml").write_text(PROJECT_CONFIG)
    keys, ids = make_people(store)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("anomaly-e2e", artifact_location=(root / "mlartifacts").as_uri())
    env = {
        "KENSA_REGISTRY_NAME": NAME,
        "KENSA_PROJECT_CONFIG": str(root / "kensa.toml"),
        "KENSA_SESSION_SECRET": "e2e-anomaly-secret",
        "KENSA_SAMPLE_RATE": "0",
        "KENSA_CHAMPION_POLL_S": "1",
    }
    server = Server(data, store, env=env, mlflow_uri=uri)
    # The line's classifier is the champion today; serving starts while the anomaly model is made.
    classifier = register_version(client, build_contract_model(root / "classifier.onnx"), experiment)
    client.set_model_version_tag(NAME, classifier, TAG_REGISTERED_BY, "dana")
    client.set_model_version_tag(NAME, classifier, TAG_STATUS, "approved")
    client.set_registered_model_alias(NAME, ALIAS_CHAMPION, classifier)
    started: list[BaseException | None] = []
    starter = threading.Thread(target=lambda: started.append(_start(server)), daemon=True)
    starter.start()
    try:
        model, metrics = learn_from_good_parts(root / "anomaly")
        version = register_candidate_as_flows_do(
            model, metrics, uri=uri, store=store, experiment=experiment, by="dana"
        )
        starter.join(120)
        if not started or started[0] is not None:
            raise RuntimeError(f"serving did not start: {started[0] if started else 'timed out'}")
        scene = Scene(root, store, uri, server, keys, ids, {"classifier": classifier, "anomaly": version}, 0)
        for line_id, seed in ((CLASSIFIER_LINE, 1), (GONE_LINE, 2)):  # mid grey: the review band
            assert scene.inspect(solid(128, noise_seed=seed), line=line_id)["verdict"] == "review"
    except BaseException:
        starter.join(120)
        server.stop()
        raise
    yield scene
    assert server.stop() in (0, -15), server.log()[-2000:]
    log = server.log()
    assert "Traceback" not in log, log[-4000:]
    assert not any(key in log for key in keys.values())


def inspect_with_heatmap(scene: Scene, image: np.ndarray, part: str) -> dict[str, Any]:
    from kensa.models.line.synthetic import encode_png

    r = httpx.post(
        f"{scene.base}/v1/inspect",
        params={"line_id": ANOMALY_LINE, "camera_id": "cam-1", "part_id": part, "heatmap": "true"},
        content=encode_png(image),
        headers={"Authorization": f"Bearer {scene.keys['cam-1']}", "content-type": "image/png"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def first_review_with_a_region(scene: Scene, start: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Defective parts from the line until the model sends one to a person with a region."""
    from kensa.models.line.synthetic import DEFECT_TYPES, LineConditions, generate_part, part_seed

    verdicts = []
    for k in range(start, start + 40):
        label = DEFECT_TYPES[k % len(DEFECT_TYPES)]
        image, _ = generate_part(part_seed(JUDGED_STREAM, k), LineConditions(), SIZE, label)
        # A part id with markup in it: the console must show it as text.
        answer = inspect_with_heatmap(scene, image, f"A-{k} <i>{label}</i>")
        verdicts.append(answer["verdict"])
        if answer["verdict"] == "review" and answer["anomaly"]["region"] is not None:
            return answer, image
    raise AssertionError(f"no defective part landed in the review band with a region: {verdicts}")


def item_of(scene: Scene, line_id: str) -> ReviewItem:
    with scene.store() as session:
        found = session.scalars(
            select(ReviewItem).where(ReviewItem.line_id == line_id, ReviewItem.status == "open")
        ).first()
        assert found is not None, f"no open review item on {line_id}"
        return found


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_classifier_verdict_offers_no_heatmap_and_the_route_says_why(line: Scene, page: Page) -> None:
    item = item_of(line, CLASSIFIER_LINE)
    sign_in(page, line, "alice", f"/console/review?line={CLASSIFIER_LINE}")
    expect(page.get_by_test_id("model-version")).to_have_text(line.versions["classifier"])
    expect(page.get_by_role("button", name=re.compile("anomaly heatmap"))).to_have_count(0)
    expect(page.get_by_test_id("heatmap")).to_have_count(0)
    expect(page.get_by_test_id("anomaly-region")).to_have_count(0)
    page.keyboard.press("h")  # nothing to toggle, and no label is given either
    expect(page.locator("[data-item-id]")).to_have_attribute("data-item-id", str(item.id))

    # The route itself, with the session: a classifier is served, so there is no map to draw.
    refused = page.request.get(f"{line.console}/review/{item.id}/heatmap.png")
    assert refused.status == 409 and refused.headers["content-type"].startswith("application/json")
    body = refused.json()
    assert body["error"] == "heatmap_unavailable" and "classifier" in body["detail"]
    unknown = page.request.get(f"{line.console}/review/999999/heatmap.png")
    assert unknown.status == 404 and unknown.json()["error"] == "unknown_review_item"
    # A person's page, not an API: no session, no heatmap (and a bearer key is no session).
    anonymous = httpx.get(f"{line.console}/review/{item.id}/heatmap.png", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "not_signed_in"
    keyed = httpx.get(
        f"{line.console}/review/{item.id}/heatmap.png",
        headers={"Authorization": f"Bearer {line.keys['alice']}"},
        timeout=10,
    )
    assert keyed.status_code == 401


def test_good_parts_only_model_goes_from_ingest_to_champion_to_a_heatmap_in_the_console(
    line: Scene, page: Page
) -> None:
    version = line.versions["anomaly"]
    # Approved in the console by an operator who did not register it (dana did).
    sign_in(page, line, "alice", f"/console/models/{version}")
    expect(page.get_by_test_id("model-card")).to_contain_text("dana")
    page.get_by_label("Reason").fill("Learned from good parts only; band certified on the pilot line")
    page.get_by_role("button", name=f"Approve version {version} as champion").click()
    expect(page.get_by_test_id("flash")).to_contain_text(
        re.compile(f"serving (now )?answers with version {version}")
    )

    # The line sends defective parts; one the model is unsure of goes to a person, with a region.
    answer, _ = first_review_with_a_region(line)
    assert answer["model_version"] == version
    assert set(answer["probs"]) == {"ok", "defect_anomaly"}
    region = answer["anomaly"]["region"]
    served_heatmap = png_pixels(base64.b64decode(answer["anomaly"]["heatmap_png"]))

    page.goto(f"{line.console}/review?line={ANOMALY_LINE}")
    part = page.locator("[data-item-id]")
    item_id = int(part.get_attribute("data-item-id") or 0)
    expect(page.get_by_role("heading", name=answer["part_id"])).to_be_visible()  # markup as text
    assert page.locator("main i").count() == 0
    expect(page.get_by_test_id("model-version")).to_have_text(version)
    box = region["image_box"]
    expect(page.get_by_test_id("anomaly-region")).to_contain_text(
        f"region x {box['x0']}–{box['x1']}, y {box['y0']}–{box['y1']} px"
    )
    expect(page.get_by_text("h shows or hides the anomaly heatmap")).to_be_visible()  # key help
    toggle = page.get_by_role("button", name="Show the anomaly heatmap and region (key h)")
    expect(toggle).to_be_enabled()
    overlay, drawn_region = page.get_by_test_id("heatmap"), page.get_by_test_id("region")
    expect(overlay).to_be_hidden()
    expect(drawn_region).to_be_hidden()
    assert overlay.get_attribute("src") is None  # not drawn until asked for: it runs the model

    # Key h: the served model draws the heatmap now, over the part, the region outlined.
    with page.expect_response(lambda r: r.url.endswith(f"/review/{item_id}/heatmap.png")) as drawn:
        page.keyboard.press("h")
    response = drawn.value
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-kensa-model-version"] == version
    expect(overlay).to_be_visible()
    page.wait_for_function(
        "() => { const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0; }"
    )
    sizes = page.evaluate(
        """() => [document.getElementById('heatmap'), document.getElementById('part-image')]
             .map(i => [i.naturalWidth, i.naturalHeight])"""
    )
    assert sizes[0] == sizes[1] == [SIZE, SIZE]  # drawn at the part image's own size: it lies on it
    # The same heatmap serving answered with ?heatmap=true (the map is recomputed, not stored).
    assert np.abs(png_pixels(response.body()).astype(int) - served_heatmap).max() <= 2
    expect(drawn_region).to_be_visible()
    rect = drawn_region.locator("rect")
    assert [rect.get_attribute(a) for a in ("x", "y", "width", "height")] == [
        str(box["x0"]),
        str(box["y0"]),
        str(box["x1"] - box["x0"]),
        str(box["y1"] - box["y0"]),
    ]
    shown, outline = page.locator("#part-image").bounding_box(), rect.bounding_box()
    assert shown is not None and outline is not None
    scale = shown["width"] / SIZE  # 320 px on the page for a 96 px part
    assert outline["x"] == pytest.approx(shown["x"] + box["x0"] * scale, abs=3)
    assert outline["y"] == pytest.approx(shown["y"] + box["y0"] * scale, abs=3)
    assert outline["width"] == pytest.approx((box["x1"] - box["x0"]) * scale, abs=4)
    hide = page.get_by_role("button", name="Hide the anomaly heatmap and region (key h)")
    expect(hide).to_have_attribute("aria-pressed", "true")
    expect(page.get_by_test_id("heat-status")).to_contain_text("Heatmap shown")
    assert page.evaluate(UNNAMED_CONTROLS_JS) == []  # every control on the page is named

    # h again hides it; the button shows it again without drawing it twice.
    page.keyboard.press("h")
    expect(overlay).to_be_hidden()
    expect(drawn_region).to_be_hidden()
    expect(toggle).to_have_attribute("aria-pressed", "false")
    toggle.click()
    expect(overlay).to_be_visible()
    expect(drawn_region).to_be_visible()

    # The person labels the part with its key; the label goes to the queue's record.
    page.keyboard.press("2")
    expect(page.get_by_test_id("flash")).to_contain_text(f"Part {item_id} labelled defect_anomaly")
    with line.store() as session:
        labelled = session.get(ReviewItem, item_id)
        assert labelled is not None and labelled.label == "defect_anomaly"
        assert labelled.labelled_by == "alice" and labelled.model_version == version


def test_a_part_whose_image_is_gone_gets_no_heatmap_and_says_why(line: Scene, page: Page) -> None:
    # Checked before the model: whatever is served, a missing image is a 404.
    gone = item_of(line, GONE_LINE)
    Path(gone.image_path).unlink()
    sign_in(page, line, "audrey", f"/console/review?line={ANOMALY_LINE}")  # an auditor may look
    missing = page.request.get(f"{line.console}/review/{gone.id}/heatmap.png")
    assert missing.status == 404
    assert json.loads(missing.text()) == {
        "error": "image_missing",
        "detail": f"the image of review item {gone.id} is not in the image store",
    }

    # An anomaly model's part whose image goes while its page is open: h says why, in words.
    first_review_with_a_region(line, start=100)
    item = item_of(line, ANOMALY_LINE)
    page.reload()
    expect(page.locator("[data-item-id]")).to_have_attribute("data-item-id", str(item.id))
    Path(item.image_path).unlink()
    page.keyboard.press("h")
    status = page.get_by_test_id("heat-status")
    expect(status).to_have_text(f"No heatmap: the image of review item {item.id} is not in the image store")
    expect(page.get_by_test_id("heatmap")).to_be_hidden()
    expect(page.get_by_role("button", name="Show the anomaly heatmap and region (key h)")).to_have_attribute(
        "aria-pressed", "false"
    )
    # Opened afresh, the page knows at once: the toggle is off and the note says why.
    page.reload()
    expect(page.get_by_role("button", name="Show the anomaly heatmap and region (key h)")).to_be_disabled()
    expect(page.get_by_test_id("heat-note")).to_have_text(
        "The part's image is not in the image store: no heatmap."
    )
