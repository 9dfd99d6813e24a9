"""The operations console in a real headless Chromium (Debian's, driven by Playwright).

Screenshots go to EOB_SCREENSHOTS (default: the test's tmp dir) so they can be looked at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.ops.console.app import create_app
from pipeline.ops.console.auth import Role, add_user, mask_email
from pipeline.ops.demo import free_port
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import AuditEvent, ResendCase
from tests.ledger_seed import seed_run_and_file
from tests.test_cases import _hard_bounced_case

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium missing")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct horse battery"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, Settings, str]]:
    settings = Settings(data_dir=tmp_path / "data")
    sessions = open_ledger(settings.ledger_url)
    with sessions.begin() as session:
        seed_run_and_file(session)
        case_id = _hard_bounced_case(session).case_id
        for name, role in (("alice", Role.OPERATOR), ("bob", Role.APPROVER), ("vic", Role.VIEWER)):
            add_user(session, name, PASSWORD, role, actor="test")
    app = create_app(settings, secret_key="s" * 40, secure_cookies=False)
    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", settings, case_id
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser() -> Iterator[object]:
    # The console answers in milliseconds; Playwright's 5 s default is too tight only on a
    # machine busy with other work (CI's other tests), so assertions wait up to 20 s.
    playwright_api.expect.set_options(timeout=20_000)
    profile = tempfile.mkdtemp(prefix="eob-chromium-")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            yield p, context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("EOB_SCREENSHOTS", tmp_path / "shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _submit(page, selector: str) -> None:
    """Click a form's button and wait for the page the POST redirects to."""
    with page.expect_navigation():
        page.click(selector)
    page.wait_for_load_state()


def _login(page, base: str, user: str, password: str = PASSWORD) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    _submit(page, "button[type=submit]")


def _new_context(p, browser_context, tmp_path: Path, name: str):
    """A second, independent browser profile (another person at another desk)."""
    profile = tmp_path / f"profile-{name}"
    return p.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS
    )


def test_verify_then_approve_by_a_second_user(console, browser, tmp_path: Path):
    base, settings, case_id = console
    p, context = browser
    shots = _shots(tmp_path)
    page = context.new_page()

    # Anonymous: pages send you to the login form; an action is refused.
    page.goto(f"{base}/cases")
    assert page.url.endswith("/login")
    anonymous = page.request.post(f"{base}/cases/{case_id}/approve", form={"csrf": "x"})
    assert anonymous.status == 401

    _login(page, base, "alice", "wrong password")
    assert "Wrong user name or password" in page.content()
    _login(page, base, "alice")
    assert page.url.endswith("/cases")
    assert case_id in page.inner_text("#cases")
    page.screenshot(path=str(shots / "01-cases-list.png"), full_page=True)

    _submit(page, f"a[href='/cases/{case_id}']")
    # The delivery history masks the address.
    assert "old@example.org" not in page.content()
    assert mask_email("old@example.org") in page.inner_text("#attempts")
    page.select_option("#verify select[name=channel]", "phone")
    page.fill("#verify input[name=evidence]", "called the member's number on file")
    page.fill("#verify input[name=address]", "new.address@example.net")
    _submit(page, "#verify button")
    # Retries until the redirected page shows it (the machine is shared and can be slow).
    playwright_api.expect(page.locator("#state")).to_have_text("verified")
    assert "new.address@example.net" not in page.content()
    page.screenshot(path=str(shots / "02-case-verified.png"), full_page=True)

    # The operator has no approve button, and a forged approve POST is refused for the role.
    assert page.locator("#approve").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    refused = page.request.post(f"{base}/cases/{case_id}/approve", form={"csrf": csrf})
    assert refused.status == 403

    second = _new_context(p, context, tmp_path, "bob")
    try:
        bob = second.new_page()
        _login(bob, base, "bob")
        bob.goto(f"{base}/cases/{case_id}")
        # Without the CSRF token the same POST is refused even for the approver.
        no_csrf = bob.request.post(f"{base}/cases/{case_id}/approve", form={})
        assert no_csrf.status == 403
        _submit(bob, "#approve button")
        playwright_api.expect(bob.locator("#verification")).to_contain_text("approved by bob")
        bob.screenshot(path=str(shots / "03-case-approved.png"), full_page=True)
    finally:
        second.close()

    with open_ledger(settings.ledger_url)() as session:
        case = session.get_one(ResendCase, case_id)
        assert (case.verified_by, case.approved_by) == ("alice", "bob")
        events = session.scalars(select(AuditEvent)).all()
        views = {(e.actor, e.action) for e in events}
        assert {
            ("alice", "console_view"),
            ("bob", "console_view"),
            ("alice", "console_login"),
            ("alice", "console_verify"),
            ("bob", "console_approve"),
            ("alice", "console_refused"),
            ("anonymous", "console_login_failed"),
        } <= views
        assert not any("@" in e.detail for e in events)


def test_a_viewer_sees_but_cannot_act(console, browser, tmp_path: Path):
    base, settings, case_id = console
    _, context = browser
    page = context.new_page()
    _login(page, base, "vic")
    page.goto(f"{base}/cases/{case_id}")
    assert page.locator("form#verify").count() == 0
    assert "Read-only (viewer)" in page.content()
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    refused = page.request.post(
        f"{base}/cases/{case_id}/verify",
        form={"csrf": csrf, "channel": "phone", "evidence": "x", "address": "a@example.net"},
    )
    assert refused.status == 403
    # Acknowledging an alert is refused too, and the refusal is audited like a case action's.
    refused = page.request.post(f"{base}/alerts/1/ack", form={"csrf": csrf})
    assert refused.status == 403
    with open_ledger(settings.ledger_url)() as session:
        refusals = session.scalars(
            select(AuditEvent).where(
                AuditEvent.actor == "vic", AuditEvent.action == "console_refused"
            )
        ).all()
        assert {(e.entity_kind, e.detail) for e in refusals} == {
            ("case", "action=verify role=viewer"),
            ("alert", "action=ack role=viewer"),
        }
    page.goto(f"{base}/bounces")
    assert "hard_bounce" in page.inner_text("#bounces")
    page.screenshot(path=str(_shots(tmp_path) / "04-viewer-bounces.png"), full_page=True)
