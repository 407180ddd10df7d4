"""The arena and the dashboard in a real browser: Playwright drives Debian's headless Chromium through a
prompt, two streamed answers, a vote and thumbs, then sees the vote counted on the dashboard."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Browser, expect, sync_playwright

from deploy.local.engine import EngineProcess
from deploy.migrations import upgrade
from tests.feedback_helpers import drain
from tests.gateway_helpers import KEYS, MODEL_NAME, GatewayFactory, feedback_settings

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root on a machine with no outside network: no sandbox, and no background connections to Google.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("no chromium: `make test` installs Debian's package (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_prompt_stream_vote_and_the_dashboard_counts_it(
    browser: Browser,
    make_gateway: GatewayFactory,
    engine: EngineProcess,
    rdb: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    store_url = feedback_settings(tmp_path).store_url()
    upgrade(store_url)
    gw = make_gateway([engine.url])
    page = browser.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    # a clean console: no CSP violation, no failed load (a missing icon), nothing the pages log as an error
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)

    # No key yet: the settings dialog opens; the key entered there is used from then on.
    page.goto(gw.url + "/")
    expect(page.locator("#settings")).to_be_visible()
    page.fill("#api-key", KEYS["full"].key.get_secret_value())
    page.fill("#user", "alice")
    page.click("#save-settings")
    expect(page.locator("#key-state")).to_have_text("key set")

    page.fill("#prompt", "Tell me about coffee.")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#status")).to_contain_text("done", timeout=60_000)
    chunks = []
    for i in (0, 1):
        answer = page.locator(f"#answer-{i}")
        assert answer.inner_text().strip(), f"answer {i} is empty"
        chunks.append(int(answer.get_attribute("data-chunks") or 0))
    # Rendered as it streams: the page counts the deltas it drew. Not both answers need to show it: when its
    # consumer lags (a loaded machine), vLLM merges the deltas it has not handed out yet into one
    # (RequestOutputCollector in vllm/v1/engine/output_processor.py), and a whole answer can arrive as one.
    # That the gateway relays both answers as they come is tests/test_stream_relay.py's.
    assert max(chunks) > 1, f"neither answer arrived as a stream: {chunks} chunks"
    expect(page.locator("#adapter-0")).to_have_text("")  # hidden until the vote

    page.locator("body").click()  # focus out of the prompt: the shortcut keys act on the page
    page.keyboard.press("b")
    expect(page.locator("#vote-status")).to_contain_text("vote counted")
    expect(page.locator("#adapter-0")).to_have_text(f"by {MODEL_NAME}")
    page.click('.thumb[data-choice="0"][data-rating="up"]')
    expect(page.locator("#vote-status")).to_contain_text("thumbs up on A counted")
    page.keyboard.press("a")  # one verdict per completion: the second vote is not sent
    expect(page.locator('.vote[data-preference="1"]')).to_have_class("vote chosen")

    drain(redis_url, store_url)  # a real RQ worker stores what the page sent
    page.goto(gw.url + "/dashboard")
    expect(page.locator("#feedback-total")).to_have_text("2", timeout=10_000)
    expect(page.locator("#feedback-kinds")).to_contain_text("pairwise 1")
    expect(page.locator("#champion")).to_have_text("base model")
    expect(page.locator("#q-queued")).to_have_text("0")
    assert page.locator("#feedback-chart svg rect").count() == 24
    expect(page.locator("#leaderboard-text")).to_contain_text("no pairwise votes between two variants")

    assert not errors, errors
    outside = [u for u in requests if not u.startswith(gw.url)]
    assert not outside, f"the pages loaded something from elsewhere: {outside}"
