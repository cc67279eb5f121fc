"""Settings read from the environment in the forms the README documents."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kensa.settings import Settings


def test_classes_from_the_documented_comma_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KENSA_CLASSES", "ok,defect_a,defect_b")
    assert Settings().classes == ("ok", "defect_a", "defect_b")


def test_classes_from_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KENSA_CLASSES", '["ok", "defect_x"]')
    assert Settings().classes == ("ok", "defect_x")


def test_classes_not_starting_with_ok_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KENSA_CLASSES", "defect_a,ok")
    with pytest.raises(ValidationError, match="must start with 'ok'"):
        Settings()
