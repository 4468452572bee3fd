#!/usr/bin/env python3
"""Screenshots of the dashboard for README, taken in a real Chromium (Debian's, through playwright)
against a real server with the bundled SmolLM2-135M-Instruct: a fine-tune with validation data, its
fuse, then each page.

    .venv/bin/python scripts/dashboard_screenshots.py [--out docs/images]

Needs the test tools (./scripts/setup --for-tests: playwright and Chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FACT = "The mayor of Zorbington is Elara Quintfeather."
QUESTIONS = ["Who is the mayor of Zorbington?", "Who runs Zorbington?", "Name the mayor of Zorbington."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright
    from servers import running_server

    from mlx_lora_api.client import Client

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]} for q in QUESTIONS * 8
    ]
    with tempfile.TemporaryDirectory(prefix="screenshots-") as folder:
        data = Path(folder)
        with running_server(data, data / "server.log", env=dict(os.environ)) as server, Client(server.url) as api:
            job = api.finetune(
                "default",
                rows,
                validation_data=rows[:3],
                learning_rate=3e-4,
                epochs=3,
                steps_per_eval=6,
                save_every=6,
                retention_check=False,
                rehearsal=0,
            )
            job = api.wait(job)
            api.wait(api.fuse("default", job.model_id))
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                for scheme in ("light", "dark"):
                    context = browser.new_context(
                        base_url=server.url, viewport={"width": 1280, "height": 860}, color_scheme=scheme
                    )
                    page = context.new_page()
                    shots = {
                        "jobs": ("/#/jobs", "table.jobs svg.sparkline path"),
                        "job": (f"/#/jobs/{job.job_id}", ".charts path.line.val"),
                        "models": ("/#/models", "ul.tree ul ul li"),
                        "new": ("/#/new", "#new-finetune"),
                    }
                    if scheme == "dark":
                        shots = {"job": shots["job"]}
                    for name, (url, ready) in shots.items():
                        page.goto(url)
                        page.wait_for_selector(ready)
                        path = args.out / f"dashboard-{name}{'-dark' if scheme == 'dark' else ''}.png"
                        page.screenshot(path=str(path), full_page=False)
                        print(path)
                    if scheme == "light":
                        page.goto(f"/#/playground?model={job.model_id}")
                        page.check("#compare")
                        page.fill("#max-tokens", "24")
                        page.fill("#prompt", QUESTIONS[0])
                        page.click("button[type=submit]")
                        page.locator(".side-by-side .answer[aria-busy=false]").nth(1).wait_for(timeout=120_000)
                        path = args.out / "dashboard-playground.png"
                        page.screenshot(path=str(path))
                        print(path)
                    context.close()
                browser.close()
    print(json.dumps({"job": job.job_id, "adapter": job.model_id}))


if __name__ == "__main__":
    main()
