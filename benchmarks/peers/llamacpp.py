"""llama.cpp as a benchmark peer, seen from the project's Python: find the build, drive its worker, start its server.

``benchmarks/peers/llamacpp.sh`` (``make peers``) builds it into ``benchmarks/peers/.build/`` and writes
``peer.json`` there; ``manifest()`` returns that (None when the peer is not built, and the benchmarks print
``NOT_BUILT``). llama_cpp is importable only from the peer's own venv, so the benchmarks time llama.cpp through
``Worker``, a subprocess running ``llamacpp_worker.py`` under that venv (JSON lines; see its docstring), and
serve it with ``llama-server`` (``server_command``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD = Path(__file__).resolve().parent / ".build"
MANIFEST = BUILD / "peer.json"
NOT_BUILT = "llama.cpp peer not built: run `make peers` to add llama.cpp"
TYPES = ("F32", "F16", "Q8_0", "Q4_1")


def manifest() -> dict | None:
    """``peer.json`` of a finished build whose files are all still there, else None."""
    try:
        m = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None
    needed = [m["python"], m["worker"], m["llama_server"]] + [x["path"] for x in m["models"].values()]
    return m if all(Path(p).exists() for p in needed) else None


def converted_adapters(m: dict) -> dict[str, dict]:
    """The demo adapters that converted to GGUF: ``{name: manifest entry}`` (``read_as``: "alora" or "lora")."""
    return {name: a for name, a in m["adapters"].items() if a.get("converted")}


class PeerError(RuntimeError):
    pass


class Worker:
    """The llama.cpp worker process (``pid`` for the CPU guard); ``with Worker(m) as w: w.load(...)``."""

    def __init__(self, m: dict):
        self._log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the worker's imports come from the peer venv only
        self.proc = subprocess.Popen([m["python"], m["worker"], "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.pid = self.proc.pid

    def request(self, **req) -> dict:
        """Send one request, return its reply; a failed request or a dead worker raises ``PeerError``."""
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._log.seek(0)
            raise PeerError(f"the llama.cpp worker died (exit {self.proc.poll()}):\n{self._log.read()[-3000:]}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise PeerError(f"llama.cpp worker, {req.get('op')}: {reply['error']}")
        return reply

    def load(self, key: str, model: str, threads: int, n_ctx: int = 8192,
             adapters: dict[str, str] | None = None) -> dict:
        """Load the GGUF ``model`` (and adapter GGUFs) under ``key``; returns its context's description."""
        return self.request(op="load", key=key, model=model, threads=threads, n_ctx=n_ctx,
                            adapters=adapters or {})["info"]

    def generate(self, key: str, prompt: list[int], n: int, adapter: str | None = None, fresh: bool = False,
                 activation: str = "server") -> dict:
        """Greedy, exactly ``n`` tokens; see the worker's docstring for the cache and the aLoRA rule."""
        return self.request(op="generate", key=key, prompt=list(prompt), n=n, adapter=adapter, fresh=fresh,
                            activation=activation)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def convert_adapter(m: dict, folder: Path, out: Path) -> Path:
    """``folder`` (a PEFT adapter) to the F32 GGUF ``out`` with the vendored ``convert_lora_to_gguf.py``, run by
    this Python (it has torch and transformers) with the vendored gguf-py; ``--base``: our safetensors folder
    with ``architectures`` in its config.json (``convert_base`` in peer.json; the converter needs that field)."""
    src = Path(m["llama_cpp_source"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
    cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--outtype", "f32", "--base", m["convert_base"],
           "--outfile", str(out), str(folder)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode or not out.is_file():
        raise PeerError(f"convert_lora_to_gguf.py failed on {folder}:\n{(done.stdout + done.stderr)[-3000:]}")
    return out


def server_command(m: dict, port: int, slots: int, slot_ctx: int, threads: int,
                   adapters: list[str] | None = None, model: str = "F32", cache_reuse: int = 256) -> list[str]:
    """llama-server on 127.0.0.1:``port`` at its best for multi-turn chat: ``slots`` parallel slots of
    ``slot_ctx`` tokens each, prompt cache (per request, on by default) with its RAM cache and ``--cache-reuse``,
    ``threads`` threads; the adapter GGUFs loaded at scale 0, so that each request picks its own with ``lora``."""
    cmd = [m["llama_server"], "-m", m["models"][model]["path"], "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * slot_ctx),
           "--cache-reuse", str(cache_reuse), "--metrics", "--no-webui"]
    for path in adapters or []:
        cmd += ["--lora", path]
    return cmd + (["--lora-init-without-apply"] if adapters else [])
