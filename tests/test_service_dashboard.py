"""The dashboard end to end in headless Chromium against the real service on 127.0.0.1: sign in (a wrong key
is refused on the sign-in screen), upload a file (a bad one's error shown as text), create a job on a tiny
model from the form, watch its loss curve grow, chat with the finished job beside its base; pause, resume and
cancel another.

    python -m pytest -q tests/test_service_dashboard.py
    GEMCUT_DASHBOARD_SCREENSHOT=docs/img/dashboard.png python -m pytest -q tests/test_service_dashboard.py  # the docs' picture

Needs Debian's chromium (/usr/bin/chromium; scripts/setup.sh installs it when run as root), driven by
Playwright's python package. The page's Content-Security-Policy forbids eval, so waits poll from Python.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from serve_runs import plain_model, running

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN_KEY = "admin-key-for-the-dashboard-test"
SCREENSHOT = os.environ.get("GEMCUT_DASHBOARD_SCREENSHOT")



def chat_rows(numbers: range) -> bytes:
    """Distinct little sums as chat SFT rows (distinct: the data pipeline drops duplicates and train/valid overlap)."""
    rows = [{"messages": [{"role": "user", "content": f"What is {n} plus {n + 1}?"},
                          {"role": "assistant", "content": f"{n} plus {n + 1} is {2 * n + 1}."}]} for n in numbers]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload_payload(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "application/jsonl", "buffer": data}


@pytest.fixture()
def service(tmp_path):
    from gemcut.service.app import create_service_app
    from gemcut.service.settings import ServiceSettings

    base = plain_model(tmp_path / "tiny")
    settings = ServiceSettings(models=[str(base)], api_keys=[ADMIN_KEY], service_root=str(tmp_path / "service"),
                               workers=1, job_lease_s=10, num_threads=1)
    app = create_service_app(settings)
    key = app.state.service.keys.create("alice")
    with running(app) as url:
        yield url, key


@pytest.fixture()
def page(service):
    from playwright.sync_api import sync_playwright

    url, _ = service
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.requests = []  # every URL the page asked for: all on this server, none carrying the key
        pg.on("request", lambda r: pg.requests.append(r.url))
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        yield pg
        context.close()
        browser.close()


def wait_until(page, expression: str, timeout: float = 60.0, what: str = ""):
    """Poll `expression` in the page from Python (the page's CSP forbids the eval that page.wait_for_function uses)."""
    deadline = time.time() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or expression}; page status: "
                                 f"{page.inner_text('#status')!r}, job error: {page.inner_text('#job-error')!r}")
        time.sleep(0.2)


def visible(selector: str) -> str:
    return f"(() => {{ const e = document.querySelector({json.dumps(selector)}); return e !== null && !e.closest('[hidden]'); }})()"


def text_of(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).textContent"


def train_points(page) -> int:
    return int(page.get_attribute("#loss-chart", "data-train-points"))


def job_status(page) -> str:
    return page.inner_text("#job-status").strip()


def create_job_from_form(page, *, epochs: str, lr: str, suffix: str, validation: bool, overrides: dict) -> str:
    page.click("#show-new-job")
    wait_until(page, "document.querySelector('#f-training-file').options.length > 0", what="processed files in the form")
    assert "tiny" in page.locator("#f-model option").all_inner_texts()
    page.select_option("#f-model", "tiny")
    page.select_option("#f-training-file", label=page.locator("#f-training-file option", has_text="train.jsonl").first.inner_text())
    if validation:
        page.select_option("#f-validation-file", label=page.locator("#f-validation-file option", has_text="valid.jsonl").first.inner_text())
    page.fill("#f-n-epochs", epochs)
    page.fill("#f-batch-size", "2")
    page.fill("#f-lr-multiplier", lr)
    page.fill("#f-suffix", suffix)
    page.fill("#f-seed", "7")
    page.fill("#f-gemcut", json.dumps(overrides))
    page.click("#f-submit")
    wait_until(page, visible("#view-job"), 30, "the new job's page")
    return page.inner_text("#job-id").strip()


@needs_chromium
def chat_with_finished_job(page) -> None:
    wait_until(page, visible("#chat-box"), 30, "the try-it chat")
    tuned = page.inner_text("#chat-tuned-name")
    assert tuned.startswith("ft:tiny:alice:demo:")
    assert page.inner_text("#chat-base-name") == "tiny"
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "What is 3 plus 4?")
    page.click("#chat-send")
    done = "document.querySelectorAll('#chat-{side} .bubble[data-role=assistant]:not(.pending)').length === 1"
    wait_until(page, done.format(side="tuned") + " && " + done.format(side="base"), 60, "both replies")
    assert page.locator(".bubble.error").count() == 0, page.locator(".bubble.error").all_inner_texts()
    assert page.locator("#chat-tuned .bubble[data-role=user]").inner_text() == "What is 3 plus 4?"


def test_dashboard_end_to_end(service, page):
    url, key = service

    # A wrong key: the sign-in screen says the server refused it, and nothing is kept.
    page.goto(url + "/dashboard")
    page.fill("#api-key", "not-a-key-of-this-server")
    page.click("#sign-in-button")
    wait_until(page, f"{text_of('#sign-in-error')}.includes('401')", 20, "the 401 on the sign-in screen")
    assert "incorrect API key" in page.inner_text("#sign-in-error")
    assert page.evaluate("sessionStorage.length") == 0

    page.fill("#api-key", key)
    page.click("#sign-in-button")
    wait_until(page, visible("#view-files"), 20, "the files view (no jobs yet)")

    # A bad file: the validation error names its line, shown as text (its name is user input, so is the error).
    bad_name = "bad<img src=x>.jsonl"
    bad = chat_rows(range(1)) + b'{"prompt": "<b>a line cut short</b>"\n'
    page.set_input_files("#upload-file", upload_payload(bad_name, bad))
    page.click("#upload-button")
    wait_until(page, visible("#upload-error"), 60, "the bad file's error")
    error = page.inner_text("#upload-error")
    assert bad_name in error and "line 2" in error, error
    assert page.locator("#upload-error img, #files img").count() == 0

    for name, data in (("train.jsonl", chat_rows(range(24))), ("valid.jsonl", chat_rows(range(100, 106)))):
        page.set_input_files("#upload-file", upload_payload(name, data))
        page.click("#upload-button")
        wait_until(page, f"{visible('#upload-result')} && {text_of('#upload-result')}.includes({json.dumps(name)})", 60, name)
        assert "processed" in page.inner_text("#upload-result")
    wait_until(page, "document.querySelectorAll('#files tbody tr[data-file-id]').length === 3", 20, "three files listed")

    # A job from the form: its curves fill in while it runs, the page polling its events.
    quick = {"train": {"eval_every": 4, "log_every": 1}}
    first = create_job_from_form(page, epochs="2", lr="50", suffix="demo", validation=True, overrides=quick)
    assert first.startswith("ftjob-")
    seen = []
    deadline = time.time() + 300
    while job_status(page) != "succeeded":
        assert job_status(page) not in ("failed", "cancelled"), page.inner_text("#job-error")
        assert time.time() < deadline, f"the job did not finish: {job_status(page)}, points {seen[-5:]}"
        seen.append(train_points(page))
        time.sleep(0.3)
    wait_until(page, f"Number(document.querySelector('#loss-chart').dataset.trainPoints) >= {max(seen + [2])}", 30, "the final curve")
    points = train_points(page)
    assert points >= 2 and seen == sorted(seen), seen  # the curve only grows
    assert int(page.get_attribute("#loss-chart", "data-valid-points")) >= 1
    chart_points = page.evaluate("Chart.getChart(document.querySelector('#loss-chart')).data.datasets[0].data.length")
    assert chart_points == points
    assert page.locator("#events li[data-type=metrics]").count() >= points
    wait_until(page, "document.querySelectorAll('#checkpoints tbody tr').length > 0", 30, "a checkpoint listed")
    assert page.inner_text("#checkpoints tbody").count("ft:") >= 1

    # Chat with the finished job: the same message to the tuned model and to its base.
    chat_with_finished_job(page)

    # A second, longer job: its curve grows while it runs, then Cancel stops it at a step boundary.
    second = create_job_from_form(page, epochs="40", lr="auto", suffix="long", validation=False, overrides={"train": {"log_every": 1}})
    assert second != first
    wait_until(page, f"{text_of('#job-status')} === 'running' && Number(document.querySelector('#loss-chart').dataset.trainPoints) >= 2",
               120, "the second job running with two points")
    before = train_points(page)
    wait_until(page, f"Number(document.querySelector('#loss-chart').dataset.trainPoints) > {before}", 60, "the curve growing")
    page.click("#job-pause")  # the worker stops at a step boundary, keeping its last checkpoint
    wait_until(page, f"{text_of('#job-status')} === 'paused'", 60, "the job paused")
    assert page.locator("#job-pause").is_hidden() and page.locator("#job-resume").is_visible()
    page.click("#job-resume")
    wait_until(page, f"{text_of('#job-status')} === 'running'", 120, "the job running again")
    assert page.locator("#events li", has_text="resumed").count() >= 1, page.locator("#events li").all_inner_texts()[:5]
    page.click("#job-cancel")
    wait_until(page, f"{text_of('#job-status')} === 'cancelled'", 60, "the job cancelled")
    assert page.locator("#job-cancel").is_hidden()
    items = {li.get_attribute("data-job-id"): li.get_attribute("data-status") for li in page.locator("#jobs .job-item").all()}
    assert items == {first: "succeeded", second: "cancelled"}

    # Back to the finished job: its whole history is read again (the same curve), and it still answers.
    page.locator(f"#jobs .job-item[data-job-id='{first}']").click()
    wait_until(page, f"Number(document.querySelector('#loss-chart').dataset.trainPoints) === {points}", 30, "the first job's curve again")
    wait_until(page, visible("#headline-box"), 30, "the eval headline")
    assert re.match(r"ROUGE-L \d\.\d\d", page.inner_text("#headline-text"))  # the tuned score, then its margin (docs/evaluation.md)
    page.click("#report-open")  # fetched with the key, shown in a sandboxed frame that runs no script
    wait_until(page, visible("#report-frame"), 30, "the eval report")
    assert page.get_attribute("#report-frame", "sandbox") == ""
    assert page.frame_locator("#report-frame").locator("body").inner_text(timeout=10_000).strip()
    page.click("#report-open")
    chat_with_finished_job(page)
    if SCREENSHOT:  # the picture in docs/service.md
        page.set_viewport_size({"width": 1280, "height": 1200})
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=SCREENSHOT)

    # The key lives in this tab's sessionStorage only, and nothing left this server or carried the key in a URL.
    assert page.evaluate("sessionStorage.getItem('gemcut-api-key')") == key
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    assert all(u.startswith(url + "/") for u in page.requests), [u for u in page.requests if not u.startswith(url)]
    assert not any(key in u for u in page.requests)
    assert page.errors == []

    # Signing out forgets the key; the page asks for one again.
    page.click("#sign-out")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("#sign-in").is_visible()


def test_page_is_public_and_only_its_own_files_are_served(service):
    import httpx

    url, key = service
    page = httpx.get(url + "/dashboard")
    assert page.status_code == 200 and "<canvas id=\"loss-chart\"" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "connect-src 'self';" in policy and "default-src 'none'" in policy
    for name in ("dashboard.js", "dashboard.css", "vendor/chart.umd.min.js", "vendor/LICENSE.md"):
        assert httpx.get(f"{url}/dashboard/static/{name}").status_code == 200, name
    for name in ("index.html", "../dashboard.py", "..%2Fdashboard.py", "vendor/chart.umd.min.js.map", "vendor"):
        assert httpx.get(f"{url}/dashboard/static/{name}").status_code == 404, name
    # The API behind it is not public.
    assert httpx.get(url + "/v1/fine_tuning/jobs").status_code == 401
    assert httpx.get(url + "/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_page_files_are_packaged():
    from gemcut.service.dashboard import STATIC, STATIC_FILES

    for name in ("index.html", *STATIC_FILES):
        assert (STATIC / name).is_file(), name
    assert "Chart.js v4" in (STATIC / "vendor/chart.umd.min.js").read_text(encoding="utf-8")[:200]
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # nothing from another host
    assert Path(STATIC).parent.name == "service"
