"""The `alora` command: help text and a piped terminal chat."""

import subprocess
import sys


def _run(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "alora.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_commands():
    out = _run(["--help"])
    assert out.returncode == 0 and "chat" in out.stdout and "train" in out.stdout
    chat = _run(["chat", "--help"])
    assert chat.returncode == 0 and "--model" in chat.stdout and "--adapter" in chat.stdout


def test_piped_chat_streams_a_reply_and_stats(default_dir):
    out = _run(["chat", "--model", str(default_dir), "--temperature", "0", "--max-new-tokens", "8"],
               stdin="What is the capital of France?\n/stats\n/invoke nope\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert "assistant> " in out.stdout and "Paris" in out.stdout
    assert "prefill_tokens=" in out.stdout
    assert "no adapter named 'nope'" in out.stderr


def test_bad_model_path_is_a_clear_error():
    out = _run(["chat", "--model", "/no/such/dir"])
    assert out.returncode == 1 and "alora: error: model folder not found: /no/such/dir" in out.stderr
    assert "Traceback" not in out.stderr
