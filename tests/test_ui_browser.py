"""The chat UI in a real browser: ``python -m app`` on a free localhost port, driven in headless Chromium
(Debian's /usr/bin/chromium) through Playwright. Saves screenshots under tests/artifacts/.

Without Chromium the test is skipped, except under ``CI=true`` (``.ci/run`` sets it), where that is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_ui_client import AppServer, make_ui_adapters

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TIMEOUT_MS = 120_000  # one step on 2 busy CPU cores can be slow

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# every distinct text the last bot message shows, to see the reply arrive token by token
WATCH_STREAM = """() => {
  window.__botTexts = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const t = bots[bots.length - 1].innerText;
    if (window.__botTexts[window.__botTexts.length - 1] !== t) window.__botTexts.push(t);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""

# the stats panel shows a newer call than `before`, finished (with its comparison when asked)
CALL_DONE = """([before, compare]) => {
  const el = document.querySelector('#stats .alora-stats');
  return !!el && el.dataset.call !== before && el.dataset.state === 'done'
      && el.querySelector('[data-row="call"]') !== null && (!compare || el.querySelector('[data-compare]') !== null);
}"""


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """Runs before the other fixtures: no server is started for a test that cannot run."""
    if not CHROMIUM.exists():
        missing = f"Debian's Chromium is not at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"CI={os.environ['CI']}: {missing}; .ci/run installs it", pytrace=False)
        pytest.skip(missing)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-adapters")
    make_ui_adapters(folder)
    with AppServer(folder, tmp_path_factory.mktemp("ui-log") / "app.log") as s:
        yield s
        print(s.log()[-4000:])


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#msg textarea")
    page.wait_for_selector("#intrinsics button:visible")  # the page-load refresh has run
    return page


def stats_html(page) -> str:
    return page.locator("#stats").inner_html()


def run_and_wait(page, action, compare=False):
    """Do ``action`` (a callable) and wait until the stats panel shows the finished call."""
    before = page.locator("#stats .alora-stats").get_attribute("data-call")
    action()
    page.wait_for_function(CALL_DONE, arg=[before, compare])


def stat(page, name: str, row: str = "call") -> int:
    return int(page.locator(f'#stats [data-row="{row}"] [data-stat="{name}"]').inner_text())


def bot_texts(page) -> list[str]:
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def user_texts(page) -> list[str]:
    return page.locator('#chat [data-testid="user"]').all_inner_texts()


def type_and_send(page, text):
    page.fill("#msg textarea", text)
    page.press("#msg textarea", "Enter")


def select_adapter(page, label_start: str):
    page.click("#adapter input")
    page.locator(f'#adapter li[role="option"][aria-label^="{label_start}"]').click()


def test_chat_switch_adapters_and_load_in_browser(server, browser, template_opening):
    ARTIFACTS.mkdir(exist_ok=True)
    page = open_page(browser, server.url)

    # 1. a message to the base model, streamed token by token
    page.evaluate(WATCH_STREAM)
    run_and_wait(page, lambda: type_and_send(page, "What is the capital of France?"))
    assert user_texts(page) == ["What is the capital of France?"]
    replies = bot_texts(page)
    assert len(replies) == 1 and replies[0].strip()
    seen = page.evaluate("window.__botTexts")
    assert len(seen) >= 3, f"the reply did not stream: {seen}"  # placeholder, partial text(s), final
    assert stat(page, "prefill_tokens") > 0 and page.input_value("#msg textarea") == ""

    # 2. select the aLoRA, then invoke it from its button, compared with LoRA swapping
    select_adapter(page, "judge · aLoRA")
    page.wait_for_function("() => document.querySelector('#adapter-note').innerText.includes('is an aLoRA')")
    page.check("#compare input")
    run_and_wait(page, lambda: page.get_by_role("button", name="judge · aLoRA", exact=True).click(), compare=True)
    side = page.locator('#side-panel [data-adapter="judge"][data-running="0"]')
    assert "chat history unchanged" in side.inner_text()
    assert stat(page, "reused_tokens") > 0, stats_html(page)
    assert 0 < stat(page, "prefill_tokens") <= 8, stats_html(page)  # the 4 invocation tokens and a few more
    assert stat(page, "recomputed_tokens") == 0
    assert stat(page, "reused_tokens", "baseline") == 0
    assert stat(page, "prefill_tokens", "baseline") > stat(page, "prefill_tokens")
    assert "Time to first token" in page.locator("#stats").inner_text()
    assert len(bot_texts(page)) == 1, "the intrinsic changed the chat"

    # 3. send with the aLoRA selected: it answers after the message, reusing the cache
    run_and_wait(page, lambda: type_and_send(page, "Is that right?"), compare=True)
    replies = bot_texts(page)
    assert len(replies) == 2 and replies[1].startswith("[judge · aLoRA]"), replies
    assert stat(page, "reused_tokens") > 0 and stat(page, "recomputed_tokens") == 0
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True, animations="disabled")

    # 4. switch to the standard LoRA: the UI says the history is recomputed, and the stats show it
    page.uncheck("#compare input")
    select_adapter(page, "judge_lora · LoRA")
    page.wait_for_function("() => document.querySelector('#adapter-note').innerText.includes('recomputed')")
    run_and_wait(page, lambda: type_and_send(page, "And of Italy?"))
    assert stat(page, "recomputed_tokens") > 0 and stat(page, "reused_tokens") == 0
    assert "recomputed under its weights" in page.locator("#stats").inner_text()
    assert bot_texts(page)[-1].startswith("[judge_lora · LoRA]")

    # 4b. an intrinsic kept in the chat: a message of its own, not a part of the previous reply's bubble
    page.check("#keep input")
    run_and_wait(page, lambda: page.get_by_role("button", name="judge · aLoRA", exact=True).click())
    page.uncheck("#keep input")
    assert len(bot_texts(page)) == 4 and bot_texts(page)[-1].startswith("[judge · aLoRA]"), bot_texts(page)
    per_row = page.evaluate("""() => [...document.querySelectorAll('#chat .message-row')]
        .map(row => row.querySelectorAll('[data-testid="bot"]').length).filter(n => n > 0)""")
    assert per_row == [1, 1, 1, 1], per_row

    # 5. loading adapters: a path outside the allowed directories, then an invalid folder inside them
    page.get_by_text("Load an adapter", exact=True).click()
    status = page.locator("#load-status")
    for path, message in [("/etc", "not under the adapter directories"), ("broken", "not valid JSON")]:
        page.fill("#adapter-path textarea", path)
        page.click("#load-btn")
        page.wait_for_function("(m) => document.querySelector('#load-status').innerText.includes(m)", arg=message)
        assert status.locator('[data-ok="0"]').count() == 1
    page.screenshot(path=str(ARTIFACTS / "ui-load-error.png"), full_page=True, animations="disabled")
    assert len(bot_texts(page)) == 4  # nothing crashed: the chat is intact

    # 6. another browser session has its own conversation on the same engine
    other = open_page(browser, server.url)
    assert bot_texts(other) == []
    run_and_wait(other, lambda: type_and_send(other, "Hi from the second tab."))
    assert user_texts(other) == ["Hi from the second tab."] and len(bot_texts(other)) == 1
    assert stat(other, "reused_tokens") <= template_opening  # none of the first tab's history
    assert len(user_texts(page)) == 3

    # 7. Stop ends a long reply early and keeps what was generated
    other.fill("#max-tokens input[type=number]", "400")
    other.press("#max-tokens input[type=number]", "Enter")
    other.evaluate(WATCH_STREAM)
    type_and_send(other, "Write a long story about a dragon.")
    other.wait_for_function("() => window.__botTexts.length >= 4")  # placeholder and a few tokens in
    other.click("#stop-btn")
    other.wait_for_function("() => document.querySelector('#stats .alora-stats').innerText.includes('Stopped')")
    partial = bot_texts(other)[-1]
    assert partial.strip() and len(other.locator('#chat [data-testid="bot"]').all()) == 2
    assert len(partial.split()) < 300
    other.close()
    page.close()
