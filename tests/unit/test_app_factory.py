"""`broker serve`'s app factory: start-up objects are frozen out of the garbage collector's view
(the full collections that walked them were the exchange's p99 in the production shape)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import broker.app as app_module
import broker.settings as settings_module


def test_the_serve_factory_freezes_after_the_app_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(settings_module, "load_settings", lambda path: _Settings())
    monkeypatch.setattr(app_module, "configure_logging", lambda *a: order.append("logging"))
    monkeypatch.setattr(app_module, "create_app", lambda settings: order.append("app") or "app")
    monkeypatch.setattr(app_module, "freeze_startup_objects", lambda: order.append("freeze"))
    assert app_module.create_app_from_environment() == "app"
    assert order == ["logging", "app", "freeze"]


class _Settings:
    log_level = "INFO"
    log_format = "json"


def test_freezing_moves_live_objects_to_the_permanent_generation() -> None:
    code = (
        "import gc, broker.app as a\n"
        "before = gc.get_freeze_count()\n"
        "a.freeze_startup_objects()\n"
        "print(before, gc.get_freeze_count(), sum(gc.get_count()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    before, after, young = (int(x) for x in out)
    assert before == 0
    assert after > 10_000  # the imported broker, FastAPI, pydantic... all frozen
    assert young < 100  # collected just before freezing
