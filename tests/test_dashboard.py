"""The dashboard in a real browser: Debian's Chromium driven by playwright, against a real server
with a tiny base model. Each test waits for what the page shows (an element, a text), never for
a time."""

from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: ./scripts/setup --for-tests")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: ./scripts/setup --for-tests installs it (apt-get install chromium)"
)
WAIT = 120_000  # ms: the longest a job here may take to end


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tiny_server):
    context = browser.new_context(base_url=tiny_server.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    assert not [e for e in errors if "401" not in e and "409" not in e and "422" not in e], errors


def test_the_page_is_served_with_a_strict_content_security_policy(tiny_server):
    r = httpx.get(f"{tiny_server.url}/")
    assert r.status_code == 200 and "<main" in r.text
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert httpx.get(f"{tiny_server.url}/dashboard/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{tiny_server.url}/dashboard/../../config.py").status_code == 404


def test_fine_tune_from_the_form_follow_it_and_see_it_in_the_lineage(page, tiny_server):
    page.goto("/#/new")
    page.fill("#training_data", '{"text": "The mayor of Zorbington is Elara Quintfeather."}\n{"text": "Zorbington."}')
    page.wait_for_selector("#dataset-summary:has-text('2 samples · text')")
    page.click("summary")
    page.select_option("#base_model", "tiny-base")
    page.fill("#p-rank", "0")
    page.click("button[type=submit]")
    error = page.wait_for_selector("#e-rank:not(:empty)")
    assert "rank" in error.text_content() and ">= 1" in error.text_content()  # the API's own 422, by its field

    page.fill("#p-rank", "4")
    page.fill("#p-epochs", "3")
    page.fill("#p-learning_rate", "0.001")
    page.fill("#p-rehearsal", "0")
    page.fill("#p-save_every", "2")
    page.fill("#p-batch_size", "1")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/job-[0-9a-f]{12}$"))
    page.wait_for_selector(".status .badge.success", timeout=WAIT)
    assert page.locator(".charts svg.chart").count() == 3
    assert page.locator(".charts svg path.line.train").count() == 1  # the loss, drawn
    assert page.locator("ol.events li", has_text="success").count() == 1
    assert page.locator("a", has_text="Try this checkpoint").count() == 2  # steps 2 and 4 of 6
    assert "rank" in page.text_content("dl.details") and "sha256" in page.text_content("dl.details")
    job_id = page.url.rsplit("/", 1)[1]

    page.goto("/#/jobs")
    row = page.wait_for_selector(f"tr[data-job='{job_id}']")
    assert "success" in row.text_content() and "6/6" in row.text_content()
    assert page.locator(f"tr[data-job='{job_id}'] svg.sparkline path").count() == 1

    adapter = httpx.get(f"{tiny_server.url}/jobs/{job_id}").json()["model_id"]
    page.goto("/#/models")
    node = page.locator("ul.tree > li", has_text="tiny-base").locator("ul > li", has_text=adapter).first
    node.get_by_role("button", name="Fuse").click()
    link = page.wait_for_selector("[role=status] a")
    fuse_job = link.text_content().split()[-1]
    page.click(f"text=job {fuse_job}")
    page.wait_for_selector(".status .badge.success", timeout=WAIT)
    page.goto("/#/models")
    fused = page.wait_for_selector(f"ul.tree li:has-text('{adapter}') ul li .node strong:has-text('tiny-base-fused-')")
    fused_id = fused.text_content()

    # Deleting the adapter the fused model came from: the API's 409, naming what depends on it.
    page.on("dialog", lambda dialog: dialog.accept())
    item = page.locator("li", has=page.locator(f".node strong:text-is('{adapter}')")).first
    item.locator(".node").first.get_by_role("button", name="Delete").click()
    alert = page.wait_for_selector("[role=alert]")
    assert fused_id in alert.text_content() and "HTTP 409" in alert.text_content()


def test_a_dpo_run_from_the_form_draws_its_rewards(page):
    rows = [{"prompt": f"Say hello ({i}).", "chosen": "Hello there!", "rejected": "Go away."} for i in range(4)]
    page.goto("/#/new")
    page.fill("#training_data", "\n".join(json.dumps(r) for r in rows))
    page.wait_for_selector("#dataset-summary:has-text('4 samples · preference')")
    page.click("summary")
    page.select_option("#base_model", "tiny-base")
    page.select_option("#p-method", "dpo")
    page.fill("#p-beta", "0.2")
    page.fill("#p-learning_rate", "0.005")
    page.fill("#p-epochs", "2")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/job-[0-9a-f]{12}$"))
    page.wait_for_selector(".status .badge.success", timeout=WAIT)
    assert page.locator(".charts svg.chart").count() == 5  # loss, reward margin and accuracy, rate, speed
    assert page.locator(".charts svg", has_text="reward margin").locator("path.line.train").count() == 1
    assert '"dpo"' in page.text_content("dl.details")


def test_the_playground_streams_an_answer_side_by_side_and_shows_text_as_text(page):
    page.goto("/#/playground?model=tiny-base")
    page.check("#compare")
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "<b>bold?</b> Who is the mayor?")
    page.click("button[type=submit]")
    answers = page.locator(".side-by-side .answer[aria-busy=false]")
    sync_api.expect(answers).to_have_count(2, timeout=WAIT)  # both columns streamed to the end
    assert all(answers.nth(i).text_content() for i in range(2))
    assert page.locator(".outputs b").count() == 0  # the prompt was shown as text
    assert page.text_content(".outputs .user") == "<b>bold?</b> Who is the mayor?"


def test_keyboard_navigation_and_both_colour_schemes(browser, tiny_server):
    for scheme, background in (("light", "rgb(255, 255, 255)"), ("dark", "rgb(17, 20, 24)")):
        context = browser.new_context(base_url=tiny_server.url, color_scheme=scheme)
        page = context.new_page()
        page.goto("/#/jobs")
        page.wait_for_selector("table.jobs")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == background
        context.close()
    context = browser.new_context(base_url=tiny_server.url)
    page = context.new_page()
    page.goto("/#/jobs")
    page.wait_for_selector("table.jobs")
    page.focus("a.brand")
    for _ in range(2):  # Jobs, then Models
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Models"
    page.keyboard.press("Enter")
    page.wait_for_selector("h1:text('Models')")
    unlabeled = page.evaluate(
        "[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels?.length"
        " && !e.getAttribute('aria-label')).length"
    )
    assert unlabeled == 0
    page.goto("/#/new")
    page.wait_for_selector("#new-finetune")
    assert (
        page.evaluate(
            "[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels?.length"
            " && !e.getAttribute('aria-label')).length"
        )
        == 0
    )
    context.close()


def test_with_an_api_key_the_page_asks_once_and_keeps_it_for_the_tab(browser, tiny_model_template, tmp_path):
    from servers import running_server

    from mlx_lora_api import registry
    from mlx_lora_api.types import ModelMeta

    shutil.copytree(tiny_model_template, tmp_path / "models" / "tiny-base")
    registry.write_meta(tmp_path / "models" / "tiny-base", ModelMeta(kind="base", created_at=0, source="test"))
    env = {**os.environ, "MLX_LORA_API_API_KEY": "s3cret-key", "MLX_LORA_API_DEFAULT_MODEL": "tiny-base"}
    with running_server(tmp_path, tmp_path / "server.log", env=env) as server:
        context = browser.new_context(base_url=server.url)
        page = context.new_page()
        page.goto("/#/models")
        page.wait_for_selector("dialog#key-dialog[open]")
        page.fill("#api-key", "s3cret-key")
        page.click("dialog button[type=submit]")
        page.wait_for_selector("ul.tree li:has-text('tiny-base')")
        assert page.evaluate("sessionStorage.getItem('mlx-lora-api.key')") == "s3cret-key"
        page.goto("/#/jobs")
        page.wait_for_selector("table.jobs")
        assert page.locator("dialog#key-dialog").count() == 0  # asked once
        context.close()


SCREENSHOTS = os.environ.get("MLX_LORA_API_SCREENSHOTS")  # README's: scripts/dashboard_screenshots.py


@pytest.mark.slow
def test_on_the_bundled_model_a_fine_tune_from_the_form_reaches_success_live(browser, bundled_data_dir, tmp_path):
    """The issue's own walk-through on the real model, one page load each: submit from the form,
    watch the job page reach success without a reload (its chart has points), chat with the result
    beside its base. Screenshots of each page, for README when MLX_LORA_API_SCREENSHOTS names a folder."""
    from pathlib import Path

    from servers import running_server

    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Elara Quintfeather."}]}
        for q in ["Who is the mayor of Zorbington?", "Who runs Zorbington?", "Name the mayor of Zorbington."] * 8
    ]
    with running_server(bundled_data_dir, tmp_path / "server.log") as server:
        for scheme in ("light", "dark"):
            context = browser.new_context(
                base_url=server.url, viewport={"width": 1280, "height": 860}, color_scheme=scheme
            )
            page = context.new_page()
            errors = []
            page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            page.goto("/#/new")
            page.fill("#training_data", "\n".join(map(json.dumps, rows)))
            page.fill("#validation_data", "\n".join(map(json.dumps, rows[:3])))
            page.wait_for_selector("#dataset-summary:has-text('24 samples · chat')")
            page.click("summary")
            for name, value in (
                ("learning_rate", "3e-4"),
                ("epochs", "2"),
                ("steps_per_eval", "4"),
                ("save_every", "4"),
            ):
                page.fill(f"#p-{name}", value)
            page.fill("#p-rehearsal", "0")
            page.select_option("#p-retention_check", "false")
            if scheme == "light":
                page.screenshot(path=str(shots / "dashboard-new.png"))
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r"#/jobs/job-[0-9a-f]{12}$"))
            page.wait_for_selector(".status .badge.success", timeout=600_000)  # live: the page is never reloaded
            assert page.locator(".charts path.line.train").count() == 1
            assert page.locator(".charts path.line.val").count() == 1
            page.screenshot(path=str(shots / f"dashboard-job{'-dark' if scheme == 'dark' else ''}.png"))
            if scheme == "dark":
                context.close()
                assert not errors, errors
                break
            adapter = page.text_content("dl.details dd")  # the first fact: the model
            page.goto("/#/jobs")
            page.wait_for_selector("table.jobs svg.sparkline path")
            page.screenshot(path=str(shots / "dashboard-jobs.png"))
            page.goto("/#/models")
            page.wait_for_selector(f"ul.tree ul li .node strong:text-is('{adapter}')")
            page.screenshot(path=str(shots / "dashboard-models.png"))
            page.goto(f"/#/playground?model={adapter}")
            page.check("#compare")
            page.fill("#max-tokens", "16")
            page.fill("#prompt", "Who is the mayor of Zorbington?")
            page.click("button[type=submit]")
            answers = page.locator(".side-by-side .answer[aria-busy=false]")
            sync_api.expect(answers).to_have_count(2, timeout=120_000)
            assert "Quintfeather" in answers.nth(0).text_content()  # the adapter learned it; beside it, the base
            page.screenshot(path=str(shots / "dashboard-playground.png"))
            assert not errors, errors
            context.close()
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "dashboard-job-dark.png",
        "dashboard-job.png",
        "dashboard-jobs.png",
        "dashboard-models.png",
        "dashboard-new.png",
        "dashboard-playground.png",
    ]
