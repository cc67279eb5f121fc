"""The operator console in a real browser (Debian's Chromium via Playwright) against a real
``kensa serve``: sign-in, keyboard labelling, alert handling, approval with hot swap, the approval
policy, CSRF, revoked keys, the live line page, escaping and labelled controls."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from console_models import NAME
from console_scene import UNNAMED_CONTROLS_JS, Scene, open_drift_alert
from playwright.sync_api import Page, expect
from serving_helpers import solid
from sqlalchemy import select

from kensa.store.keys import revoke_key
from kensa.store.models import Alert, AuditEvent, ReviewItem, utcnow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COOKIE = "kensa_console"


def sign_in(page: Page, scene: Scene, person: str, next_path: str = "/console/") -> None:
    page.goto(f"{scene.console}/login?next={next_path}")
    page.get_by_label("API key").fill(scene.keys[person])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("user")).to_contain_text(person)


def events(scene: Scene, action: str, subject: str | None = None) -> list[AuditEvent]:
    with scene.store() as session:
        query = select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
        if subject is not None:
            query = query.where(AuditEvent.subject == subject)
        return list(session.scalars(query))


def champion(scene: Scene) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=scene.mlflow_uri, registry_uri=scene.mlflow_uri)
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def post_from_page(page: Page, url: str, body: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A form post made by script from the signed-in page (same origin: the cookie goes along)."""
    result: dict[str, Any] = page.evaluate(
        """async ([url, body, headers]) => {
             const r = await fetch(url, {method: "POST", body, credentials: "same-origin",
               headers: {"content-type": "application/x-www-form-urlencoded", ...headers}});
             return {status: r.status, body: await r.text()};
           }""",
        [url, body, headers or {}],
    )
    return result


def test_sign_in_turns_the_key_into_a_strict_httponly_session_cookie(scene: Scene, page: Page) -> None:
    page.goto(f"{scene.console}/review")
    expect(page).to_have_url(re.compile(r"/console/login\?next=%2Fconsole%2Freview"))
    # By keyboard: the key field has focus on arrival.
    page.keyboard.type(scene.keys["alice"])
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/console/review$"))
    expect(page.get_by_test_id("user")).to_contain_text("alice")
    expect(page.get_by_test_id("flash")).to_contain_text("Signed in as alice (operator)")

    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console"
    assert scene.keys["alice"] not in cookie["value"]  # the session names the key; it is not the key
    assert COOKIE not in page.evaluate("document.cookie")  # scripts cannot read it
    signed = events(scene, "console.sign_in", f"key:{scene.key_ids['alice']}")
    assert signed and signed[-1].actor == "alice"


def test_revoked_key_cannot_sign_in_and_its_session_ends(scene: Scene, page: Page) -> None:
    sign_in(page, scene, "mallory", "/console/line")
    expect(page.get_by_test_id("parts-total")).to_be_visible()
    with scene.store() as session:
        revoke_key(session, scene.key_ids["mallory"])
        session.commit()

    page.reload()  # the open session of a revoked key is over at once
    expect(page).to_have_url(re.compile(r"/console/login\?next=.*expired=1"))
    expect(page.get_by_role("alert")).to_contain_text("revoked")

    page.get_by_label("API key").fill(scene.keys["mallory"])
    with page.expect_response(
        lambda r: r.url.endswith("/console/login") and r.request.method == "POST"
    ) as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    expect(page.get_by_test_id("signin-error")).to_contain_text("unknown or has been revoked")
    page.goto(f"{scene.console}/line")
    expect(page).to_have_url(re.compile(r"/console/login"))
    # A machine key is refused too: the console is for people.
    page.get_by_label("API key").fill(scene.keys["cam-1"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("signin-error")).to_contain_text("for machines on the line")


def test_label_three_parts_with_the_keyboard_alone(scene: Scene, page: Page) -> None:
    sign_in(page, scene, "alice", "/console/review")
    part = page.locator("[data-item-id]")
    started = utcnow()
    labelled: dict[int, str] = {}
    for key, label in (("2", "defect_scratch"), ("1", "ok"), ("u", "unsure")):
        expect(
            page.get_by_role("button", name="Label as ok (key 1)")
        ).to_be_enabled()  # what a person waits for
        item = int(part.get_attribute("data-item-id") or 0)
        page.keyboard.press(key)
        expect(part).not_to_have_attribute("data-item-id", str(item))  # the next part is there
        labelled[item] = label
    expect(page.get_by_test_id("flash")).to_contain_text("set aside as unsure")

    with scene.store() as session:
        rows = {r.id: r for r in session.scalars(select(ReviewItem).where(ReviewItem.id.in_(labelled)))}
    assert {i: rows[i].label for i in labelled} == labelled
    assert [rows[i].status for i in labelled] == ["labelled", "labelled", "skipped"]
    for row in rows.values():
        assert row.labelled_by == "alice"
        assert row.labelled_at is not None and started - timedelta(seconds=1) <= row.labelled_at <= utcnow()
    audited = {e.subject: e for e in events(scene, "review.label")}
    assert all(audited[f"review:{i}"].actor == "alice" for i in labelled)


def test_acknowledge_and_escalate_an_alert_with_a_comment(scene: Scene, page: Page) -> None:
    sign_in(page, scene, "alice", "/console/alerts")
    page.get_by_role("link", name=re.compile(f"#{scene.alert_id} ")).click()
    expect(page.get_by_test_id("alert-status")).to_have_text("open")
    # Its Evidently report is embedded, sandboxed: its scripts run but cannot reach the console.
    report = page.locator("iframe.report")
    assert report.get_attribute("sandbox") == "allow-scripts"
    expect(page.frame_locator("iframe.report").locator("#probe")).to_contain_text("isolated from the console")
    expect(page.get_by_role("row", name=re.compile("^brightness: mean "))).to_be_visible()  # what moved
    expect(page.locator("figure.spc")).to_have_count(3)  # drift score, defect and review p-charts

    page.get_by_label("Comment").fill("Lens wiped; watching the next windows")
    page.get_by_role("button", name=f"Acknowledge alert {scene.alert_id}").click()
    expect(page.get_by_test_id("alert-status")).to_have_text("acknowledged")
    expect(page.get_by_test_id("alert-comment")).to_have_text("Lens wiped; watching the next windows")

    page.get_by_label("Comment").fill("Still drifting after cleaning: maintenance please")
    page.get_by_role("button", name=f"Escalate alert {scene.alert_id}").click()
    expect(page.get_by_test_id("alert-status")).to_have_text("escalated")
    expect(page.get_by_test_id("alert-history")).to_contain_text("acknowledged → escalated")

    with scene.store() as session:
        alert = session.get(Alert, scene.alert_id)
        assert alert is not None
        assert alert.acknowledged_by == "alice" and alert.escalated_at is not None
        assert alert.comment == "Still drifting after cleaning: maintenance please"
    trail = [
        (e.action, e.actor, e.details["comment"])
        for e in events(scene, "alert.acknowledge") + events(scene, "alert.escalate")
        if e.subject == f"alert:{scene.alert_id}"
    ]
    assert trail == [
        ("alert.acknowledge", "alice", "Lens wiped; watching the next windows"),
        ("alert.escalate", "alice", "Still drifting after cleaning: maintenance please"),
    ]


def test_approve_a_candidate_then_roll_back_and_serving_follows(scene: Scene, page: Page) -> None:
    candidate = scene.versions["candidate"]
    before = champion(scene)
    assert scene.inspect(solid(250))["model_version"] == before != candidate
    sign_in(page, scene, "alice", "/console/models")
    expect(page.get_by_test_id("evidence")).to_contain_text(f"version {candidate}")
    page.get_by_test_id("versions").get_by_role("link", name=f"version {candidate}", exact=True).click()
    expect(page.get_by_test_id("kpi")).to_contain_text("escape rate")
    expect(page.get_by_test_id("model-card")).to_contain_text("dana")

    page.get_by_label("Reason").fill("Passes the KPI gate on the grey-parts test; wider review band")
    page.get_by_role("button", name=f"Approve version {candidate} as champion").click()
    # The console has serving look at the alias at once (its poll may have been first).
    expect(page.get_by_test_id("flash")).to_contain_text(
        re.compile(f"serving (now )?answers with version {candidate}")
    )

    answer = scene.inspect(solid(250))
    assert answer["model_version"] == candidate and answer["verdict"] == "ok"
    assert champion(scene) == candidate
    approved = events(scene, "model.approve", f"model:{NAME}/{candidate}")
    assert approved and approved[-1].actor == "alice"
    page.goto(f"{scene.console}/models")
    expect(page.get_by_test_id("champion-history")).to_contain_text("approve")

    # And back: a rollback returns the alias to the version it replaced; serving follows at once.
    page.get_by_label(f"Roll back version {candidate} to version {before}: why?").fill(
        "More review load; back"
    )
    page.get_by_role("button", name="Roll back").click()
    expect(page.get_by_test_id("flash")).to_contain_text(f"rolled back from version {candidate} to {before}")
    assert scene.inspect(solid(250))["model_version"] == before
    assert champion(scene) == before


def test_the_approval_policy_denies_an_operator_approving_their_own_model(scene: Scene, page: Page) -> None:
    own = scene.versions["own"]
    before = champion(scene)
    sign_in(page, scene, "bob", f"/console/models/{own}")
    page.get_by_label("Reason").fill("I trained it, it is good")
    with page.expect_response(lambda r: r.url.endswith(f"/models/{own}/approve")) as answer:
        page.get_by_role("button", name=f"Approve version {own} as champion").click()
    assert answer.value.status == 403
    expect(page.get_by_test_id("error-detail")).to_contain_text("two-person approval: bob registered")
    assert champion(scene) == before
    assert scene.inspect(solid(250))["model_version"] == before

    # An auditor gets no approve button, and forcing the request (with a valid token) is refused.
    page.context.clear_cookies()
    sign_in(page, scene, "audrey", f"/console/models/{own}")
    expect(page.get_by_role("button", name=re.compile("^Approve"))).to_have_count(0)
    expect(page.get_by_text("may not approve models")).to_be_visible()
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forced = post_from_page(page, f"/console/models/{own}/approve", f"reason=audit&csrf_token={token}")
    assert forced["status"] == 403 and '"forbidden"' in forced["body"]
    assert champion(scene) == before


def test_a_forged_post_without_the_csrf_token_changes_nothing(scene: Scene, page: Page) -> None:
    alert_id = open_drift_alert(
        scene, cause="SPC: review rate above its control limit", level="warning", windows=2
    )
    sign_in(page, scene, "alice", f"/console/alerts/{alert_id}")
    for body, headers in (
        ("comment=forged", {}),
        ("comment=forged&csrf_token=guess", {}),
        ("comment=forged", {"x-csrf-token": "guess"}),
    ):
        forged = post_from_page(page, f"/console/alerts/{alert_id}/resolve", body, headers)
        assert forged["status"] == 403, forged
        assert '"csrf_failed"' in forged["body"]
    with scene.store() as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None and alert.status == "open" and alert.comment is None
    assert not [e for e in events(scene, "alert.resolve") if e.subject == f"alert:{alert_id}"]
    # The same request from the page's own form works.
    page.get_by_role("button", name=f"Resolve alert {alert_id}").click()
    expect(page.get_by_test_id("alert-status")).to_have_text("resolved")


def test_the_line_page_refreshes_without_reloading(scene: Scene, page: Page) -> None:
    sign_in(page, scene, "audrey", "/console/line?refresh=1")
    total = page.get_by_test_id("parts-total")
    before = int(total.inner_text())
    page.evaluate("window.__loadedOnce = true")
    for i in range(3):
        scene.inspect(solid(20, noise_seed=900 + i))  # three defects
    expect(total).to_have_text(str(before + 3), timeout=10_000)
    assert page.evaluate("window.__loadedOnce") is True  # same page: the panel was swapped in
    serving = scene.inspect(solid(250))["model_version"]
    expect(page.get_by_test_id("champion")).to_have_text(f"v{serving}", timeout=10_000)
    expect(page.get_by_test_id("pareto")).to_contain_text("defect_scratch")
    expect(page.get_by_test_id("automation")).to_have_text(re.compile(r"^\d+\.\d %$"))
    expect(page.get_by_test_id("escape")).to_have_text(re.compile(r"^\d+\.\d\d %$"))
    expect(page.get_by_test_id("backlog-count")).to_have_text(re.compile(r"^\d+$"))


def test_everything_is_escaped_and_every_control_is_labelled(scene: Scene, page: Page) -> None:
    hostile = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> camera moved'
    alert_id = open_drift_alert(scene, cause=hostile, windows=1)
    sign_in(page, scene, "ada", f"/console/alerts/{alert_id}")
    expect(page.locator("p.cause")).to_have_text(hostile)  # shown as text
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img[src=x], main script").count() == 0

    pages = [
        "/console/review",
        "/console/alerts",
        f"/console/alerts/{alert_id}",
        "/console/models",
        f"/console/models/{scene.versions['own']}",
        f"/console/models/compare?a={scene.versions['champion']}&b={scene.versions['candidate']}",
        "/console/line",
    ]
    for path in pages:
        response = page.goto(scene.base + path)
        assert response is not None and response.status == 200, path
        assert page.evaluate(UNNAMED_CONTROLS_JS) == [], path
