"""`broker dev` as a newcomer meets it: a real browser opens the approvals page, is sent to the
development IdP's page, picks carol, and is back on the page signed in as dev/carol."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, expect

from tests.integration.test_cli_serve_dev import _dev
from tests.support import browser as browser_support

browser = browser_support.browser  # one chromium for this module


def test_a_newcomer_signs_in_as_an_approver_through_the_dev_idp(
    browser: Browser, tmp_path: Path
) -> None:
    with _dev(tmp_path) as (url, idp_url, _, _, log):
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(f"{url}/approvals")
            expect(page.get_by_text("DEVELOPMENT identity provider")).to_be_visible()
            assert page.url.startswith(f"{idp_url}/authorize?")
            page.click("button[name=person][value=carol]")
            expect(page.locator("#approver-id")).to_have_text("dev/carol")
            expect(page.locator("#empty")).to_be_visible()
            assert page.url == f"{url}/approvals/"
        finally:
            context.close()
    assert "session_secret_ref is not set" in log.read_text()  # said once, at start
