"""Screenshots of every console page for the README: ``make screenshots`` (or
``python tests/e2e/screenshots.py --out docs/screenshots``).

Builds the same scene as the browser tests, with more traffic, plots logged with each version and
a real Evidently drift report on the alert, then photographs each page in Debian's Chromium.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]  # console_scene, serving_helpers, repo

from console_scene import CHROMIUM, LINE, Scene, build_scene  # noqa: E402


def evidently_report(scene: Scene) -> None:
    """Replace the alert's report with the one the monitor renders (monitoring.report.write_report:
    Evidently's data-drift report) for a window whose parts came out darker and flatter than the
    reference, as behind a dirty lens."""
    import numpy as np

    from kensa.monitoring.features import SCALAR_COLUMNS, FeatureTable
    from kensa.monitoring.report import write_report
    from kensa.store.models import Alert

    rng = np.random.default_rng(0)
    classes = ("ok", "defect_scratch", "defect_dent")

    def table(n: int, brightness: float, contrast: float, shift: float) -> FeatureTable:
        centre = {"brightness": brightness, "contrast": contrast, "log_sharpness": 5.0, "rg_ratio": 1.0,
                  "bg_ratio": 1.0, "defect_score": 0.2, "margin": 0.6, "entropy": 0.5}  # fmt: skip
        spread = {"brightness": 15, "contrast": 5, "log_sharpness": 0.3, "rg_ratio": 0.02, "bg_ratio": 0.02,
                  "defect_score": 0.1, "margin": 0.15, "entropy": 0.1}  # fmt: skip
        scalars = np.stack([rng.normal(centre[c], spread[c], n) for c in SCALAR_COLUMNS], axis=1)
        return FeatureTable(
            scalars=scalars,
            embedding=rng.normal(shift, 1.0, (n, 3)),
            probs=rng.dirichlet([6, 2, 1], n),
            classes=classes,
        )

    with scene.store() as session:
        alert = session.get(Alert, scene.alert_id)
        assert alert is not None and alert.report_uri
        write_report(table(400, 182, 40, 0.0), table(200, 151, 33, 0.8), Path(alert.report_uri))


def more_alerts(scene: Scene) -> None:
    """Two more alerts as the monitor and serving raise them: an SPC warning someone acknowledged
    and a refused model, resolved."""
    from kensa.monitoring.alerts import acknowledge, open_alert, resolve

    with scene.store() as session:
        spc = open_alert(
            session,
            level="warning",
            kind="spc",
            cause="review rate 50.0% on line line-1 camera cam-1 vs centre 31.0% (limits 0.0%–80.0%): "
            "2 of 3 points beyond 2 sigma, same side (high)",
            line_id=LINE,
            camera_id="cam-1",
            window_size=8,
            top_features=[{"name": "review_rate", "share": 0.5, "rule": "rule2"}],
            details={
                "key": "spc:review_rate",
                "chart": {"chart": "review_rate", "center": 0.31, "lcl": 0.0, "ucl": 0.8, "subgroup": 8},
            },  # fmt: skip
        )
        acknowledge(session, spc.id, by="bob", comment="Operator on it: checking the light bar")
        model = open_alert(
            session,
            level="critical",
            kind="model",
            cause="model qc-console version 4 refused at parity: max |Δp| 0.41 > atol 0.001; still serving 1",
            line_id=None,
        )
        resolve(session, model.id, by="dana", comment="Re-exported; the broken file never served")
        session.commit()


def shoot(scene: Scene, out: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    v = scene.versions
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(30_000)

        def snap(name: str, path: str, full: bool = True) -> None:
            page.goto(scene.base + path)
            page.wait_for_load_state("networkidle")
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=full)
            saved.append(target)

        snap("signin", "/console/login")
        page.get_by_label("API key").fill(scene.keys["alice"])
        page.get_by_role("button", name="Sign in").click()
        # A few labels first, so the line's Pareto has people's column too.
        page.goto(f"{scene.console}/review")
        for key in ("2", "3", "1"):
            item = page.locator("[data-item-id]").get_attribute("data-item-id")
            page.keyboard.press(key)
            expect(page.locator("[data-item-id]")).not_to_have_attribute("data-item-id", str(item))
        snap("review", "/console/review")
        snap("alerts", "/console/alerts?status=all")
        page.goto(f"{scene.console}/alerts/{scene.alert_id}")
        page.locator("iframe.report").scroll_into_view_if_needed()  # it loads lazily
        page.frame_locator("iframe.report").get_by_text("Dataset Drift").first.wait_for()
        page.wait_for_timeout(2000)  # the report draws its charts after load
        # A full-page capture re-lays the page out, which blanks the framed report; a viewport as
        # tall as the page keeps it drawn.
        height = int(page.evaluate("document.documentElement.scrollHeight"))
        page.set_viewport_size({"width": 1280, "height": height})
        page.wait_for_timeout(1500)
        target = out / "alert.png"
        page.screenshot(path=str(target))
        saved.append(target)
        page.set_viewport_size({"width": 1280, "height": 860})
        snap("models", "/console/models")
        snap("model", f"/console/models/{v['candidate']}")
        snap("compare", f"/console/models/compare?a={v['champion']}&b={v['candidate']}", full=False)
        snap("line", f"/console/line?line={LINE}", full=True)
        browser.close()
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: run `make chromium` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kensa-screens-") as tmp:
        scene = build_scene(Path(tmp), parts=160, plots=True, extra_lines=1)
        try:
            evidently_report(scene)
            more_alerts(scene)
            for path in shoot(scene, args.out.resolve()):
                print(f"saved {path}")
        finally:
            scene.server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
