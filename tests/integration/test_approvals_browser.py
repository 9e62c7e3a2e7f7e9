"""A real browser (Debian's chromium under Playwright) signs in at the approvals page through the
development IdP's page and through an OIDC provider nobody here wrote (oidc-provider-mock's
authorization code flow), sees the requests agents opened at ``/oauth2/bc-authorize``, approves
and denies them; the agents then get their token, or ``access_denied``."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import jwt
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.support import browser as browser_support
from tests.support.approvals import API_AUDIENCE, TEST_AGENT, ApprovalStack, run_approval_stack

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import oidc_provider_mock

browser = browser_support.browser  # one chromium for this module
MOCK_CLIENT = "broker-approvals-web"
MOCK_SECRET_VARIABLE = "APPROVALS_MOCK_CLIENT_SECRET"


@pytest.fixture(scope="module")
def mock_provider() -> Iterator[str]:
    users = [
        oidc_provider_mock.User(
            sub="fiona",
            claims={"name": "Fiona Finance", "email": "fiona@corp.example", "groups": ["finance"]},
        )
    ]
    with oidc_provider_mock.run_server_in_thread(port=0, user_claims=users) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mock_provider: str) -> Iterator[ApprovalStack]:
    """The example policy; approvers sign in through the dev IdP or the mock (``corp``), whose
    finance group approves bob's comments (a rule of this test)."""
    corp = {
        "name": "corp",
        "kind": "oidc",
        "issuer": mock_provider,
        "client_ids": [MOCK_CLIENT],
        "audiences": ["https://broker.example"],
        "algorithms": ["RS256"],
    }
    policy_extra = {
        "approvals": {
            "corp-finance-reviews-bobs-comments": {
                "description": "Corp's finance team reviews what agents write for bob.",
                "permissions": ["tickets:comment"],
                "agents": [TEST_AGENT],
                "people": ["person:dev/bob"],
                "approvers": ["group:corp/finance"],
                "quorum": 1,
                "request_expiry_seconds": 300,
            }
        }
    }
    approvals = {
        "sign_in": [
            {"idp": "dev", "client_id": "broker-dev", "label": "the development IdP"},
            {
                "idp": "corp",
                "client_id": MOCK_CLIENT,
                "client_secret_ref": f"env:{MOCK_SECRET_VARIABLE}",
                "label": "Corp SSO",
            },
        ],
        "api_audiences": [API_AUDIENCE],
    }
    patch = pytest.MonkeyPatch()
    patch.setenv(MOCK_SECRET_VARIABLE, "any-secret-the-mock-accepts")
    try:
        with run_approval_stack(
            tmp_path_factory.mktemp("approvals-browser"),
            policy_extra=policy_extra,
            extra_identity_providers=[corp],
            approvals=approvals,
        ) as running:
            yield running
    finally:
        patch.undo()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()  # its own cookies: a fresh approver every test
    try:
        yield context.new_page()
    finally:
        context.close()


def sign_in_with_dev_idp(page: Page, stack: ApprovalStack, who: str) -> None:
    page.goto(f"{stack.url}/approvals")
    page.click("#sign-in-dev")
    expect(page).to_have_url(re.compile(re.escape(stack.idp.authorization_endpoint)))
    page.click(f"button[name=person][value={who}]")
    expect(page.locator("#approver-id")).to_have_text(f"dev/{who}")


def review(page: Page, stack: ApprovalStack, binding_message: str) -> str:
    """Open the listed request showing `binding_message`; returns its id."""
    row = page.locator("tr.request", has_text=binding_message)
    expect(row).to_have_count(1)
    approval_id = row.get_attribute("data-id")
    assert approval_id and approval_id.startswith("apr_")
    row.get_by_role("link", name="Review").click()
    expect(page).to_have_url(f"{stack.url}/approvals/{approval_id}")
    return approval_id


def test_an_approver_signs_in_through_the_dev_idp_and_approves(
    page: Page, stack: ApprovalStack
) -> None:
    auth_req_id = stack.ask(
        "dave",
        "tickets:read tickets:close",
        binding_message="Close 40 stale tickets",
        authorization_details='[{"type": "ticket_bulk_close", "count": 40, "note": "<b>x</b>"}]',
    )
    sign_in_with_dev_idp(page, stack, "dave")  # consent: dave approves for himself
    review(page, stack, "Close 40 stale tickets")
    expect(page.locator("#binding-message")).to_have_text("Close 40 stale tickets")
    expect(page.locator("#permissions")).to_contain_text("tickets:close")
    expect(page.locator("#scope")).to_have_text("tickets:read tickets:close")
    details = page.locator("#authorization-details")
    expect(details).to_contain_text('"note": "<b>x</b>"')  # shown as text, never markup
    assert page.locator("#authorization-details b").count() == 0
    page.fill("form.approve textarea[name=comment]", "Yes, these are mine")
    page.click("#approve")
    expect(page.locator("#outcome")).to_contain_text("approved")

    issued = stack.poll(auth_req_id)
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "dev/dave" and "tickets:close" in claims["scope"].split()
    assert claims["approval"]["approved_by"] == ["dev/dave"]

    page.goto(f"{stack.url}/approvals")
    expect(page.locator("#empty")).to_be_visible()  # decided: gone from the list


def test_an_approver_denies_and_the_agent_is_told(page: Page, stack: ApprovalStack) -> None:
    auth_req_id = stack.ask("dave", "tickets:read tickets:refund", binding_message="Refund 120")
    sign_in_with_dev_idp(page, stack, "carol")
    review(page, stack, "Refund 120")
    page.click("#deny")
    expect(page.locator("#outcome")).to_contain_text("denied")
    assert stack.poll(auth_req_id).json()["error"] == "access_denied"


def test_an_approver_signs_in_through_an_independent_oidc_provider(
    page: Page, stack: ApprovalStack, mock_provider: str
) -> None:
    auth_req_id = stack.ask(
        "bob", "tickets:read tickets:comment", agent=TEST_AGENT, binding_message="Reply to #7"
    )
    page.goto(f"{stack.url}/approvals")
    page.click("#sign-in-corp")
    expect(page).to_have_url(re.compile("^" + re.escape(mock_provider)))
    page.click("button[name=sub][value=fiona]")  # the mock's own authorization form
    expect(page.locator("#approver-id")).to_have_text("corp/fiona")
    expect(page.locator("#approver-name")).to_have_text("Fiona Finance")
    review(page, stack, "Reply to #7")
    page.click("#approve")
    expect(page.locator("#outcome")).to_contain_text("approved")
    issued = stack.poll(auth_req_id, TEST_AGENT)
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert claims["approval"]["approved_by"] == ["corp/fiona"]


def test_signing_out_ends_the_session(page: Page, stack: ApprovalStack) -> None:
    sign_in_with_dev_idp(page, stack, "erin")
    page.click("#sign-out")
    expect(page.locator("#message")).to_have_text("You are signed out.")
    page.goto(f"{stack.url}/approvals")
    expect(page.locator("#sign-in-dev")).to_be_visible()  # asked to sign in again
