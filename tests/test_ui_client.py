"""The chat UI (``python -m app``) driven through ``gradio_client``: the same flow as the browser test, read
from the API's structured outputs, plus Stop, separate sessions, and the adapter-folder allow-list.

The helpers here (``make_ui_adapters``, ``AppServer``) are also used by ``test_ui_browser.py``.
"""

from __future__ import annotations

import html as htmllib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import alora

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 6  # replies stay short: 2 shared CPU cores


# ---- helpers shared with test_ui_browser.py ---------------------------------------------------------------

def make_ui_adapters(folder: Path) -> list[int]:
    """Write, under ``folder``: ``judge`` (a PEFT aLoRA on the default model, random non-zero weights),
    ``judge_lora`` (the same weights as a plain LoRA: its "LoRA swapping" twin), and two folders the
    engine must refuse: ``broken`` (invalid JSON) and ``pickled`` (only a .bin checkpoint).
    Returns the aLoRA's invocation token ids."""
    from peft_helpers import make_adapter
    from transformers import AutoTokenizer

    from alora.default_model import default_model_dir

    base = default_model_dir()
    invocation = AutoTokenizer.from_pretrained(base)("<|im_start|>judge\n", add_special_tokens=False)["input_ids"]
    make_adapter(base, folder / "judge", seed=1, invocation=invocation, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"])
    shutil.copytree(folder / "judge", folder / "judge_lora")
    cfg = json.loads((folder / "judge_lora" / "adapter_config.json").read_text())
    cfg["alora_invocation_tokens"] = None
    (folder / "judge_lora" / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "broken").mkdir()
    (folder / "broken" / "adapter_config.json").write_text("{not json")
    (folder / "pickled").mkdir()
    shutil.copy(folder / "judge_lora" / "adapter_config.json", folder / "pickled")
    (folder / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return invocation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python -m app`` in a subprocess on a free localhost port, until the ``with`` block ends."""

    def __init__(self, adapters: Path, log: Path, *args: str, timeout: float = 240):
        self.adapters, self.log_path, self.args, self.timeout = adapters, log, args, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> "AppServer":
        cmd = [sys.executable, "-m", "app", "--adapters", str(self.adapters), "--port", str(self.port),
               "--no-demo", "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS), *self.args]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the app did not answer on {self.url} within {self.timeout} s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ui-adapters")
    make_ui_adapters(folder)
    return folder


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    with AppServer(adapters_dir, tmp_path_factory.mktemp("ui-log") / "app.log") as s:
        yield s
        print(s.log()[-4000:])


def _client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def _is_update(v) -> bool:
    return isinstance(v, dict) and v.get("__type__") == "update"


def final(job) -> list:
    """Every output's latest value over a finished job's stream (handlers leave some outputs unchanged)."""
    for _ in job:
        pass
    merged: list = []
    for out in job.outputs():
        out = list(out)
        merged = merged or [None] * len(out)
        for i, v in enumerate(out):
            if not _is_update(v):
                merged[i] = v
    return merged


def texts(chat: list[dict]) -> list[tuple[str, str]]:
    def text(content):
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content)
    return [(m["role"], text(m["content"])) for m in chat]


def send(client, text, adapter="base", compare=False, max_tokens=MAX_TOKENS):
    """(chat, stats html, stats json, every streamed assistant text) of one /send."""
    job = client.submit(text, adapter, "", 0.0, max_tokens, compare, api_name="/send")
    chat, _, html, raw = final(job)
    streamed = [texts(out[0])[-1][1] for out in job.outputs() if isinstance(out[0], list) and out[0]]
    return texts(chat), html, raw, streamed


def invoke(client, adapter, keep=False, compare=False):
    """(chat, side panel html, stats html, stats json) of one /invoke."""
    chat, side, html, raw = final(client.submit(adapter, keep, compare, MAX_TOKENS, "", api_name="/invoke"))
    return texts(chat) if chat is not None else None, side, html, raw


def load(client, path, name=""):
    out = client.predict(path, name, "base", api_name="/load_adapter")
    return out[0], out[1]


# ---- no server needed --------------------------------------------------------------------------------------

def test_cli_binds_localhost_without_share():
    from app.cli import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.adapters) == ("127.0.0.1", 7860, False, [])
    args = build_parser().parse_args(["--adapters", "a", "b", "--adapters", "c", "--port", "9000"])
    assert args.adapters == ["a", "b", "c"] and args.port == 9000


def test_adapter_folders_allow_only_configured_directories(tmp_path):
    from app.session import AdapterFolders, LoadRefused

    root, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    (root / "good").mkdir(parents=True)
    (root / "good" / "adapter_config.json").write_text("{}")
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    folders = AdapterFolders([root])
    assert folders.resolve("good") == (root / "good").resolve()
    assert folders.resolve(str(root / "good")) == (root / "good").resolve()
    assert folders.resolve("missing") == (root / "missing").resolve()  # the engine reports it missing
    assert folders.discover() == [("good", (root / "good").resolve())]
    for bad in (str(outside), "../elsewhere", "good/../../elsewhere", "escape", "/etc", "~"):
        with pytest.raises(LoadRefused, match="not under the adapter directories"):
            folders.resolve(bad)
    with pytest.raises(LoadRefused, match="enter the path"):
        folders.resolve("  ")
    with pytest.raises(LoadRefused, match="--adapters"):
        AdapterFolders([]).resolve("good")


def test_session_calls_supersede_each_other_across_threads(engine):
    """Gradio steps a streaming handler on any worker thread, and a browser may Send again or Stop while a
    reply streams: the session ends the older call (its partial reply kept) and never steps it again."""
    from app.session import ChatSession

    sess = ChatSession(engine, "Be brief.")
    call, ticket, _ = sess.start("Be brief.", lambda c: c.start_send("Count from one to fifty.", max_new_tokens=40))
    stream = sess.drain(call, ticket)
    seen: list[str] = []
    worker = threading.Thread(target=lambda: seen.extend(next(stream) for _ in range(2)))
    worker.start()
    worker.join(60)
    assert len(seen) == 2

    call2, ticket2, before = sess.start("Be brief.", lambda c: c.start_send("Stop.", max_new_tokens=2))
    assert [m["role"] for m in before] == ["system", "user", "assistant"]
    assert before[-1]["content"].startswith("".join(seen).strip()[:3]) and before[-1]["content"]
    assert call.finished and call.stats.finish_reason == "cancelled" and len(call.output_ids) < 40
    assert list(stream) == []  # the superseded stream ends without another delta
    "".join(sess.drain(call2, ticket2))
    assert [m["role"] for m in sess.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert call2.stats.reused_tokens > 0

    call3, ticket3, _ = sess.start("Be brief.", lambda c: c.start_send("Hi.", max_new_tokens=4))
    sess.stop()  # before its first step: it ends at once, the conversation stays usable
    assert list(sess.drain(call3, ticket3)) == [] and sess.stopped_ticket == ticket3
    assert call3.wait(30) and call3.stats.finish_reason in ("cancelled", "stop", "length")
    sess.clear("Be brief.")
    assert [m["role"] for m in sess.messages()] == ["system"]


def test_a_long_chat_drops_its_oldest_exchanges_and_says_so(tiny_dirs):
    """The UI's default overflow policy: a chat that outgrows the context (512 tokens here) keeps going."""
    from app import render
    from app.session import ChatSession

    eng = alora.Engine.from_pretrained(tiny_dirs["llama"], device="cpu", dtype="float32")
    sess = ChatSession(eng, "Be brief.")
    dropped = 0
    for i in range(12):
        call, ticket, _ = sess.start("Be brief.", lambda c: c.start_send(f"Message {i}: " + "word " * 60,
                                                                          max_new_tokens=8))
        "".join(sess.drain(call, ticket))
        dropped += call.stats.dropped_turns
        if call.stats.dropped_turns:
            assert f'data-dropped="{call.stats.dropped_turns}"' in render.stats_html(call.stats)
    assert dropped > 0 and sess.messages()[0]["role"] == "system"
    assert sess.messages()[-2]["content"].startswith("Message 11:")
    eng.shutdown()


# ---- through the API ---------------------------------------------------------------------------------------

def test_chat_adapters_stats_and_loading(server, adapters_dir, template_opening):
    client = _client(server)

    # base model: a streamed reply joins the chat
    chat, html, raw, streamed = send(client, "What is the capital of France?")
    assert [r for r, _ in chat] == ["user", "assistant"] and chat[0][1] == "What is the capital of France?"
    assert chat[1][1].strip(), "empty reply"
    assert len(set(streamed)) >= 2, f"the reply was not streamed: {streamed}"
    assert raw["call"]["prefill_tokens"] > 0 and raw["call"]["decode_tokens"] > 0
    assert 'data-stat="reused_tokens"' in html and 'data-stat="ttft_s"' in html

    # an intrinsic (aLoRA) on the conversation: cache reused, tiny prefill, chat unchanged, side panel filled,
    # and the comparison with its LoRA twin reported beside it
    after, side, html, raw = invoke(client, "judge", compare=True)
    call = raw["call"]
    assert raw["kind"] == "alora" and call["reused_tokens"] > 0, raw
    assert 0 < call["prefill_tokens"] <= 4 + 4 and call["recomputed_tokens"] == 0, raw
    assert after == chat, "invoking without 'keep' changed the chat"
    assert 'data-adapter="judge"' in side and 'data-running="0"' in side and "chat history unchanged" in side
    base = raw["baseline"]
    assert base["adapter"] == "judge_lora" and base["error"] is None
    assert base["stats"]["reused_tokens"] == 0 and base["stats"]["prefill_tokens"] > call["prefill_tokens"]
    assert 'data-row="baseline"' in html and "Time to first token" in html

    # keep in chat: the output joins the history, labelled (the button label form of the name works too)
    kept, side, _, raw = invoke(client, "judge · aLoRA", keep=True)
    assert len(kept) == 3 and kept[-1][0] == "assistant" and kept[-1][1].startswith("`[judge · aLoRA]`")
    assert "kept in chat" in side

    # a standard LoRA for the next message: the history is recomputed, and the UI says so
    chat, html, raw, _ = send(client, "And of Italy?", adapter="judge_lora")
    assert raw["kind"] == "lora" and raw["call"]["reused_tokens"] == 0 and raw["call"]["recomputed_tokens"] > 0
    assert "recomputed under its weights" in html
    assert chat[-2] == ("user", "And of Italy?") and chat[-1][1].startswith("`[judge_lora · LoRA]`")

    # an aLoRA for the next message: history reused, only the new message and the invocation prefilled
    chat, html, raw, _ = send(client, "Is that right?", adapter="judge", compare=True)
    assert raw["call"]["reused_tokens"] > 0 and raw["call"]["recomputed_tokens"] == 0
    assert raw["baseline"]["stats"]["prefill_tokens"] > raw["call"]["prefill_tokens"]

    # errors are shown, not raised
    _, side, html, raw = invoke(client, "nope")
    assert "no adapter named 'nope'" in htmllib.unescape(side) and raw["error"]
    for path, message in [("/etc", "not under the adapter directories"),
                          ("judge/../../..", "not under the adapter directories"),
                          ("broken", "not valid JSON"),
                          ("pickled", "pickle"),
                          ("missing", "adapter folder not found"),
                          ("judge", "already loaded")]:
        status, _ = load(client, path)
        assert 'data-ok="0"' in status and message in htmllib.unescape(status), (path, status)

    status, selector = load(client, str(adapters_dir / "judge"), "judge_again")
    assert 'data-ok="1"' in status and "aLoRA" in status
    assert ["judge_again · aLoRA (rank 4)", "judge_again"] in [list(c) for c in selector["choices"]]
    _, _, _, raw = invoke(client, "judge_again")
    assert raw["call"]["reused_tokens"] > 0

    chat, html, raw, side = client.predict("", api_name="/clear")
    assert chat == [] and side == "" and "cleared" in html
    chat, html, raw, _ = send(client, "Hi again.", max_tokens=2)
    assert raw["call"]["finish_reason"] == "length" and 'data-cut="1"' in html  # a cut reply says so
    # nothing of the cleared history is reused: at most the template's opening, which every chat shares
    assert [r for r, _ in chat] == ["user", "assistant"] and raw["call"]["reused_tokens"] <= template_opening


def test_sessions_have_their_own_conversations(server):
    clients = [_client(server) for _ in range(2)]
    results: dict[int, tuple] = {}

    def chat(i):
        results[i] = send(clients[i], f"My name is user{i}.", max_tokens=4)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        history = results[i][0]
        assert [m for m in history if m[0] == "user"] == [("user", f"My name is user{i}.")], history
    # the first session goes on with its own history cached
    history, _, raw, _ = send(clients[0], "What is my name?", max_tokens=2)
    assert [m for m in history if m[0] == "user"] == [("user", "My name is user0."), ("user", "What is my name?")]
    assert raw["call"]["reused_tokens"] > 0


def test_stop_keeps_the_partial_reply(server):
    client = _client(server)
    job = client.submit("Write a long story about a dragon.", "base", "", 0.0, 400, False, api_name="/send")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        outs = [o for o in job.outputs() if isinstance(o[0], list) and len(o[0]) == 2]
        if len({texts(o[0])[-1][1] for o in outs}) >= 3:
            break
        time.sleep(0.1)
    client.predict(api_name="/stop")
    chat, _, html, raw = final(job)
    assert raw["stopped"] is True and "Stopped" in html
    partial = texts(chat)[-1][1]
    # a stopped call reports what happened: cancelled, with the tokens it streamed counted and timed
    call = raw["call"]
    assert partial and call["finish_reason"] == "cancelled" and call["decode_tokens"] >= 3 and call["ttft_s"] > 0
    assert len(re.findall(r"\S+", partial)) < 300
    history, _, raw, _ = send(client, "Go on.", max_tokens=2)
    assert history[:2] == [("user", "Write a long story about a dragon."), ("assistant", partial)]
    assert raw["call"]["reused_tokens"] > 0


def test_an_io_yaml_intrinsic_shows_its_result_as_likelihood_bars(server, adapters_dir):
    """A folder with an io.yaml loads as an intrinsic; invoking it shows its parsed result, a likelihood as a bar."""
    client = _client(server)
    folder = adapters_dir / "judge_io"
    shutil.copytree(adapters_dir / "judge", folder)
    (folder / "io.yaml").write_text(
        "model: judge_io\n"
        "response_format: '{\"type\": \"string\", \"enum\": [\"yes\", \"no\"]}'\n"
        "transformations:\n"
        "  - {type: likelihood, categories_to_values: {\"yes\": 1.0, \"no\": 0.0}, input_path: []}\n"
        "  - {type: nest, input_path: [], field_name: correct_likelihood}\n"
        "parameters: {max_completion_tokens: 4}\n")
    status, _ = load(client, "judge_io")
    assert 'data-ok="1"' in status, status
    send(client, "Is Paris in France?", max_tokens=4)
    _, side, _, raw = invoke(client, "judge_io")
    assert "error" not in raw and raw["call"]["reused_tokens"] > 0, raw
    assert set(raw["result"]) == {"correct_likelihood"}
    assert 'data-result="1"' in side and 'class="likelihood" data-field="correct_likelihood"' in side, side
    value = float(re.search(r'data-value="([0-9.]+)"', side).group(1))
    assert 0.0 <= value <= 1.0


def test_the_stats_line_says_reused_only_when_something_was():
    """A first reply (nothing cached) is not described as reusing the cached history; a later one is."""
    from alora_app import render

    first, later = alora.CallStats(prefill_tokens=40), alora.CallStats(prefill_tokens=9, reused_tokens=40)
    assert "nothing was cached yet" in render.mode_text(None, None, "send", first)
    assert "reused" not in render.mode_text(None, None, "send", first)
    assert "cached history was reused" in render.mode_text(None, None, "send", later)
    assert "nothing was cached yet" in render.mode_text("judge", "alora", "invoke", first)
    assert "cached base history was reused" in render.mode_text("judge", "alora", "invoke", later)
