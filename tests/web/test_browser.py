"""The pages in a real browser: headless Chromium (Debian's) driven by Playwright.

SQLite only: the browser adds nothing backend-specific, and the API tests already run
on both backends. Screenshots go to ``test-artifacts/`` (git-ignored) for a human look.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy.orm import Session

from tests.web.conftest import (
    ADMIN_PASSWORD,
    RAD_PASSWORD,
    Web,
    _add_result,
    add_admin,
    make_settings,
    seed_study,
)
from triaged.web import queries
from triaged.web.server import WebServer, serve_in_thread
from triaged.worklist import db
from triaged.worklist.models import Series, Study, utcnow

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def live(tmp_path: Path, rad_hash: str, admin_hash: str) -> Iterator[tuple[Web, WebServer]]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'worklist.db'}")
    db.upgrade(engine)
    add_admin(engine, admin_hash)
    settings = make_settings(tmp_path, rad_hash)
    settings.storage.spool_dir.mkdir(parents=True)
    web = Web(
        engine=engine,
        root=tmp_path,
        settings=settings,
        status={
            "scp_listening": True,
            "scheduler_running": True,
            "live_model": "fusion:v1",
            "spool_free_mb": 5000,
            "min_free_mb": 100,
        },
    )
    server = serve_in_thread(web.app(), "127.0.0.1", 0)
    yield web, server
    server.stop()
    engine.dispose()


def login(page: Page, base: str, name: str, password: str) -> None:
    page.goto(f"{base}/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/")


def score(web: Web, uid: str, **scored: object) -> None:
    """What the scoring worker does when it finishes a study (the page is open meanwhile)."""
    with Session(web.engine) as s, s.begin():
        st = s.scalars(sa.select(Study).where(Study.study_instance_uid == uid)).one()
        series = s.scalars(sa.select(Series).where(Series.study_id == st.id)).one()
        _add_result(web, s, st, series.series_instance_uid, scored, [], utcnow())


def wait_js(page: Page, expression: str, timeout: float = 10.0) -> None:
    """Poll an expression (``wait_for_function`` evals strings, which our CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def new_page(browser: Browser, width: int, height: int = 900) -> tuple[Page, list[str]]:
    """A page that records console errors (a CSP violation shows up there)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def row_uids(page: Page) -> list[str]:
    return page.eval_on_selector_all("#worklist tbody tr", "rs => rs.map(r => r.dataset.uid)")


def test_radiologist_sees_a_positive_rise_and_reads_it(
    browser: Browser, live: tuple[Web, WebServer]
) -> None:
    web, server = live
    base = server.url
    neg = seed_study(
        web,
        1,
        received_ago=3000,
        scored={"fusion": 0.08, "cbam": 0.11, "flag": False, "priority": 0},
        deliveries=[("pacs", "SR", "DELIVERED", None)],
    )
    pos = seed_study(web, 2, received_ago=2000, state="SCORING")
    late = seed_study(web, 3, received_ago=1000, state="QUEUED")
    skipped = seed_study(web, 4, received_ago=500, state="SKIPPED", reason="no axial CT series")
    ARTIFACTS.mkdir(exist_ok=True)
    page, errors = new_page(browser, 1600)
    login(page, base, "rad", RAD_PASSWORD)
    assert row_uids(page) == [neg, pos, late, skipped]
    # mark the document and a row: a full reload or a rebuilt row would lose the marks
    page.evaluate("window.__sameDocument = true")
    page.evaluate(f"document.querySelector('tr[data-uid=\"{late}\"]').__mark = 1")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.dataset.uid") == late

    score(
        web,
        pos,
        fusion=0.93,
        cbam=0.88,
        flag=True,
        priority=90,
        sr=["Finding: COVID-19 (SNOMED CT 840539006)", "Fusion probability 0.93"],
    )
    expect(page.locator("#worklist tbody tr").first).to_have_attribute("data-uid", pos)
    assert row_uids(page) == [pos, neg, late, skipped]
    top = page.locator("#worklist tbody tr").first
    expect(top).to_have_class(re.compile(r"\bflagged\b"))
    expect(top.locator("[data-col=fusion]")).to_have_text("93%")
    expect(top.locator("[data-col=flag]")).to_have_text("COVID-19")
    assert page.evaluate("window.__sameDocument") is True
    assert page.evaluate(f"document.querySelector('tr[data-uid=\"{late}\"]').__mark") == 1
    assert page.evaluate("document.activeElement.dataset.uid") == late  # focus kept
    page.wait_for_timeout(2600)  # let the highlight fade before the picture
    page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

    # keyboard: Home goes to the top study, Enter opens it
    page.keyboard.press("Home")
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{base}/studies/{pos}")
    heat = page.locator("#heatmap")
    expect(heat).to_be_visible()
    wait_js(page, "document.getElementById('heatmap').complete")
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
    assert page.evaluate("document.getElementById('infected').naturalWidth") > 0
    expect(page.locator("svg.slice-plot polyline")).to_have_count(1)
    expect(page.locator("ul.sr")).to_contain_text("Fusion probability 0.93")

    page.fill("textarea[name=note]", "bilateral ground-glass, typical")
    page.click("#confirm")
    expect(page).to_have_url(f"{base}/studies/{pos}#feedback")
    fb = page.locator("ul.feedback li").first
    expect(fb).to_contain_text("confirmed")
    expect(fb).to_contain_text("rad")
    expect(fb).to_contain_text("bilateral ground-glass, typical")
    page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)

    # Escape returns to the worklist, which now shows the reading
    page.keyboard.press("Escape")
    expect(page).to_have_url(f"{base}/")
    expect(page.locator(f"tr[data-uid='{pos}'] .fb")).to_have_text("✓ confirmed")

    # filters live in the URL and apply without a reload
    page.evaluate("window.__sameDocument = true")
    page.select_option("select[name=state]", "SKIPPED")
    expect(page).to_have_url(f"{base}/?state=SKIPPED")
    expect(page.locator("#worklist tbody tr")).to_have_count(1)
    assert row_uids(page) == [skipped]
    assert page.evaluate("window.__sameDocument") is True
    page.reload()
    assert page.eval_on_selector("select[name=state]", "s => s.value") == "SKIPPED"
    assert row_uids(page) == [skipped]

    assert errors == []
    # no admin for a radiologist: no link, and the page refuses
    expect(page.locator("nav a[href='/admin']")).to_have_count(0)
    resp = page.goto(f"{base}/admin")
    assert resp is not None and resp.status == 403
    expect(page.locator("h1")).to_have_text("403")
    page.close()


def test_open_study_page_follows_scoring_and_keeps_a_note_being_typed(
    browser: Browser, live: tuple[Web, WebServer]
) -> None:
    web, server = live
    uid = seed_study(web, 7, state="SCORING")
    page, errors = new_page(browser, 1400)
    login(page, server.url, "rad", RAD_PASSWORD)
    page.goto(f"{server.url}/studies/{uid}")
    expect(page.locator("p.lead")).to_have_text("Not scored yet.")
    score(web, uid, fusion=0.91, cbam=0.8, flag=True, priority=90)
    # the page notices the score by itself (nothing is being typed, so it just reloads)
    expect(page.locator("#heatmap")).to_be_visible()
    expect(page.locator(".study-head .state")).to_have_text("SCORED")
    expect(page.locator("#changed")).to_be_hidden()

    page.evaluate("window.__sameDocument = true")
    page.fill("textarea[name=note]", "half-written note")
    with Session(web.engine) as s, s.begin():  # a colleague reads the study meanwhile
        queries.add_feedback(s, uid, "ann", "refute", "looks like oedema")
    banner = page.locator("#changed")
    expect(banner).to_be_visible()
    assert page.evaluate("window.__sameDocument") is True  # no reload under the reader
    assert page.input_value("textarea[name=note]") == "half-written note"
    page.click("#reload")
    expect(page.locator("ul.feedback li").first).to_contain_text("looks like oedema")
    assert page.evaluate("window.__sameDocument") is None  # the reader chose to reload
    page.close()
    assert errors == []


def test_admin_page_echo_in_place(browser: Browser, live: tuple[Web, WebServer]) -> None:
    web, server = live
    page, errors = new_page(browser, 1400)
    login(page, server.url, "ann", ADMIN_PASSWORD)
    page.click("nav a[href='/admin']")
    expect(page).to_have_url(f"{server.url}/admin")
    page.evaluate("window.__sameDocument = true")
    page.click("form.echo[data-name=pacs] button")
    expect(page.locator(".echo-result[data-for=pacs]")).to_have_text("C-ECHO success")
    page.click("form.echo[data-name=down] button")
    expect(page.locator(".echo-result[data-for=down]")).to_have_text("refused")
    assert page.evaluate("window.__sameDocument") is True
    assert web.echoes == ["pacs", "down"]
    page.screenshot(path=str(ARTIFACTS / "admin.png"), full_page=True)
    page.close()
    assert errors == []


def test_narrow_screen_keeps_columns_and_scroll(
    browser: Browser, live: tuple[Web, WebServer]
) -> None:
    web, server = live
    seed_study(web, 1, scored={"fusion": 0.91, "cbam": 0.8, "flag": True, "priority": 80})
    waiting = [seed_study(web, n, received_ago=5000 - n * 10, state="QUEUED") for n in range(2, 31)]
    page, errors = new_page(browser, 800, 600)
    login(page, server.url, "rad", RAD_PASSWORD)
    row = page.locator("#worklist tbody tr").first
    expect(row.locator("[data-col=fusion]")).to_be_visible()
    expect(row.locator("[data-col=patient]")).to_be_visible()
    expect(row.locator("[data-col=model]")).to_be_hidden()
    page.screenshot(path=str(ARTIFACTS / "worklist-narrow.png"))
    # scrolled down, a study far below is scored and moves up: what the reader looks at
    # stays where it is on the screen (the page is patched, not reloaded)
    page.mouse.wheel(0, 500)
    wait_js(page, "window.scrollY >= 400")
    in_view = """() => { const r = [...document.querySelectorAll('#worklist tbody tr')]
        .find(r => r.getBoundingClientRect().top > 100);
        return [r.dataset.uid, Math.round(r.getBoundingClientRect().top)]; }"""
    before = page.evaluate(in_view)
    assert before[0] != waiting[-1]
    score(web, waiting[-1], fusion=0.7, cbam=0.6, flag=True, priority=50)
    expect(page.locator("#worklist tbody tr").nth(1)).to_have_attribute("data-uid", waiting[-1])
    row_top = f"document.querySelector('tr[data-uid=\"{before[0]}\"]').getBoundingClientRect().top"
    assert abs(page.evaluate(row_top) - before[1]) <= 1
    assert page.evaluate("window.scrollY") >= 400
    page.close()
    assert errors == []


def test_open_worklist_shows_out_of_distribution_when_scored(
    browser: Browser, live: tuple[Web, WebServer]
) -> None:
    """The worklist's live update (worklist.js) adds the marker and reason to the row."""
    from triaged.worklist.models import Result
    from triaged.worklist.result_details import OodSummary, ResultDetails, ScoreSummary

    web, server = live
    uid = seed_study(web, 1, received_ago=100, state="SCORING")
    page, errors = new_page(browser, 1600)
    login(page, server.url, "rad", RAD_PASSWORD)
    page.evaluate("window.__sameDocument = true")
    reason = "out of distribution: 8 of 8 slices unlike the training data"
    score(web, uid, fusion=0.95, flag=False, priority=50)
    details = ResultDetails(
        summary=ScoreSummary(ood=OodSummary(slices_beyond=8, slices=8, reason=reason))
    )
    with Session(web.engine) as s, s.begin():
        s.execute(sa.update(Result).values(details=details.to_json()))
        st = s.scalars(sa.select(Study).where(Study.study_instance_uid == uid)).one()
        st.updated_at = utcnow()
    row = page.locator(f'tr[data-uid="{uid}"]')
    expect(row.locator("[data-col=state] .ood")).to_have_text("out of distribution")
    expect(row.locator("[data-col=state]")).to_contain_text(reason)
    expect(row.locator("[data-col=flag]")).not_to_contain_text("COVID-19")
    assert page.evaluate("window.__sameDocument") is True  # updated in place, not reloaded
    assert errors == []
