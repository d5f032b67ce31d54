"""The `alora` command: help text, `alora ui`'s options, and the terminal chat driven through stdin."""

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "alora.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=ENV)


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z-]*)", help_text)) - {"--help"}


def test_help_lists_commands_flags_and_slash_commands():
    out = _run(["--help"])
    assert out.returncode == 0 and all(c in out.stdout for c in ("chat", "ui", "train"))
    chat = _run(["chat", "--help"])
    assert chat.returncode == 0
    assert {"--model", "--adapter", "--device", "--dtype", "--seed"} <= _options(chat.stdout)
    assert "float32,bfloat16,float16" in chat.stdout
    for command in ("/invoke NAME", "/keep NAME", "/send NAME TEXT", "/clear", "/stats", "/help", "/quit"):
        assert command in chat.stdout, command


def test_ui_command_has_the_options_of_python_m_app():
    ui = _run(["ui", "--help"])
    app = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert ui.returncode == 0 and app.returncode == 0, ui.stderr + app.stderr
    assert ui.stdout.startswith("usage: alora ui")
    assert _options(ui.stdout) == _options(app.stdout) >= {"--model", "--adapters", "--host", "--port", "--share"}


def test_bad_options_are_one_line_errors():
    out = _run(["chat", "--model", "/no/such/dir"])
    assert out.returncode == 1 and "alora: error: model folder not found: /no/such/dir" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run(["chat", "--dtype", "float64"])
    assert out.returncode == 2 and "invalid choice: 'float64'" in out.stderr


def test_bad_adapter_folder_is_a_one_line_error(default_dir, tmp_path):
    out = _run(["chat", "--model", str(default_dir), "--adapter", f"x={tmp_path / 'missing'}"], stdin="/quit\n")
    assert out.returncode == 1, out.stderr
    assert f"alora: error: adapter folder not found: {tmp_path / 'missing'}" in out.stderr
    assert "Traceback" not in out.stderr


def test_piped_chat_commands_replies_and_stats(default_dir):
    import alora

    title = alora.demo_adapters()["title"]
    script = ["/stats", "/help", "/invoke", "/keep", "/send nope", "/bogus",  # nothing here reaches the model
              "What is the capital of France?", "/stats", "/invoke title", "/invoke nope", "/send nope hi",
              "/clear", "/quit", "never read"]
    out = _run(["chat", "--model", str(default_dir), "--adapter", f"title={title}", "--temperature", "0",
                "--max-new-tokens", "8", "--seed", "3", "--dtype", "float32", "--device", "cpu"],
               stdin="\n".join(script) + "\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "no call yet" in out.stdout  # /stats before any call
    assert "/keep NAME" in out.stdout and "/send NAME TEXT" in out.stdout  # /help
    for usage in ("usage: /invoke NAME", "usage: /keep NAME", "usage: /send NAME TEXT",
                  "unknown command /bogus; /help lists the commands"):
        assert usage in out.stderr, usage
    assert out.stdout.count("assistant> ") == 1 and "Paris" in out.stdout
    assert re.search(r"^  prefill_tokens: +\d+$", out.stdout, re.M) and "CallStats(" not in out.stdout
    assert re.search(r"^  reused_tokens: +0$", out.stdout, re.M)  # the first message reuses nothing
    assert "[title]> " in out.stdout
    # unknown adapters: the message itself, not a KeyError's quoted repr
    assert "\nerror: no adapter named 'nope' is loaded (loaded: title)" in "\n" + out.stderr
    assert out.stderr.count("error: no adapter named 'nope'") == 2
    assert "(conversation cleared)" in out.stdout


def test_chat_dispatches_commands_to_the_conversation():
    """/invoke runs without keeping, /keep keeps, /send picks the adapter; sampling options go with every call."""
    from alora.cli import chat_call

    class Recorder:
        def __init__(self):
            self.calls = []

        def invoke(self, name, keep=False, **sampling):
            self.calls.append(("invoke", name, keep, sampling))
            return iter(())

        def send(self, text, adapter=None, **sampling):
            self.calls.append(("send", text, adapter, sampling))
            return iter(())

    conv, sampling = Recorder(), {"seed": 1}
    labels = [chat_call(conv, line, sampling)[0] for line in
              ("/invoke title", "/keep title", "/send title hello  there", "hello")]
    assert labels == ["[title]", "[title]", "assistant [title]", "assistant"]
    assert conv.calls == [("invoke", "title", False, sampling), ("invoke", "title", True, sampling),
                          ("send", "hello  there", "title", sampling), ("send", "hello", None, sampling)]


def _read_until(proc, pattern: str, timeout: float, text: str = "") -> str:
    """Read the child's stdout onto ``text`` until ``pattern`` (a regex) matches it; the text read so far."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text):
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {pattern!r} in {text!r}"
        if select.select([proc.stdout], [], [], left)[0]:
            text += os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
    return text


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_stops_a_streaming_reply_and_the_chat_goes_on(default_dir):
    proc = subprocess.Popen([sys.executable, "-m", "alora.cli", "chat", "--model", str(default_dir),
                             "--temperature", "0", "--max-new-tokens", "500"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        proc.stdin.write(b"Count from one to two hundred, one number per line.\n")
        proc.stdin.flush()
        text = _read_until(proc, r"assistant> (?:.|\n){10}", 240)  # a few deltas have streamed
        proc.send_signal(signal.SIGINT)
        text = _read_until(proc, r"\(stopped by Ctrl-C\)", 60, text)  # said only when a reply is interrupted
        out, err = proc.communicate(b"/stats\n/quit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert "decode_tokens:" in out.decode()  # the chat went on: /stats answered after the stop
