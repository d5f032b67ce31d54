"""llama.cpp peer worker: runs under the peer venv's Python (benchmarks/peers/.build/venv), never the project's.

Subcommands:
  serve     (the default) answers JSON requests, one per line on stdin, one reply per line on stdout;
            the benchmarks drive it through ``benchmarks/peers/llamacpp.py`` (``Worker``);
  quantize  SRC DST TYPE: write a GGUF of type F32, F16 or Q8_0 from SRC with llama.cpp's llama_model_quantize
            (every weight matrix, the tied token embedding included, in TYPE);
  manifest  print peer.json: the built files, the GGUFs' types, each converted adapter as llama.cpp reads it.

Requests of ``serve`` (each reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``):
  {"op": "load", "key": K, "model": GGUF, "threads": 2, "n_ctx": 8192, "adapters": {NAME: GGUF}}
      load a model (and adapters) under the key K; the reply describes the context (flash attention, KV type).
  {"op": "generate", "key": K, "prompt": [ids], "n": N, "adapter": NAME or null, "fresh": false,
   "activation": "server" | "peft"}
      greedy generation of exactly N tokens (EOS ignored; N = 0: prefill and cache only), timed inside this
      process: ``prefill_s`` to the first sampled token, ``total_s`` to the last.
  {"op": "quit"}

The KV cache of a model is reused across requests as llama-server reuses a slot's: the longest common prefix of
the cached tokens and the prompt is kept (``fresh`` drops it). An aLoRA follows llama-server's rule
(tools/server/server-context.cpp): the last occurrence of its invocation tokens in the prompt is found, the tokens
before the activation point are computed (or reused) without the adapter and the rest with it; llama-server's
activation point is the token *before* the invocation (``activation: "server"``), PEFT's is the invocation's first
token (``"peft"``, for comparison). After the call the KV from the activation point on is dropped, so the cache
holds base-model KV only. A plain LoRA's KV is kept only for the next call of the same LoRA (llama-server clears
a slot's cache when its adapter set changes to or from a plain LoRA). An aLoRA whose invocation is absent runs in
base weights, as in llama-server.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import llama_cpp as L
import numpy as np

GGML_TYPES = {"F32": 0, "F16": 1, "Q8_0": 8}
FTYPES = {"F32": L.LLAMA_FTYPE_ALL_F32, "F16": L.LLAMA_FTYPE_MOSTLY_F16, "Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0}


def _silence_logs() -> None:
    """Keep llama.cpp's own log lines off stdout/stderr unless LLAMACPP_PEER_VERBOSE is set."""
    if os.environ.get("LLAMACPP_PEER_VERBOSE"):
        return

    @L.llama_log_callback
    def drop(level, text, user_data):
        pass

    L.llama_log_set(drop, ctypes.c_void_p(0))
    _silence_logs.keep = drop  # the C side keeps only a pointer: the callback must outlive this call


def _load_model(path: str):
    params = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the GGUF {path}")
    return model


def _ftype_name(model) -> str:
    return (L.llama_ftype_name(L.llama_model_ftype(model)) or b"?").decode()


def _adapter_info(adapter) -> dict:
    n = L.llama_adapter_get_alora_n_invocation_tokens(adapter)
    ptr = L.llama_adapter_get_alora_invocation_tokens(adapter)
    buf = ctypes.create_string_buffer(64)
    alpha = buf.value.decode() if L.llama_adapter_meta_val_str(adapter, b"adapter.lora.alpha", buf, 64) >= 0 else None
    return {"alora_invocation_tokens": [int(ptr[i]) for i in range(n)] or None, "lora_alpha": alpha}


class Model:
    """A loaded GGUF, one context (sequence 0), its adapters and the tokens its KV cache holds."""

    def __init__(self, path: str, threads: int, n_ctx: int, adapters: dict[str, str]):
        self.model = _load_model(path)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_threads, cp.n_threads_batch = n_ctx, threads, threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_ctx, self.n_batch = L.llama_n_ctx(self.ctx), L.llama_n_batch(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.adapters, self.invocations = {}, {}
        for name, file in adapters.items():
            ptr = L.llama_adapter_lora_init(self.model, file.encode())
            if not ptr:
                raise RuntimeError(f"llama.cpp could not load the adapter {file} onto {path}")
            self.adapters[name] = ptr
            self.invocations[name] = _adapter_info(ptr)["alora_invocation_tokens"]
        self.active = None  # adapter set on the context
        self.cached: list[int] = []  # tokens whose KV sits at positions 0.. of sequence 0
        self.cached_adapter = None  # None: base-model KV; else the plain LoRA it was computed with
        self.info = {"model": path, "ftype": _ftype_name(self.model), "size_bytes": L.llama_model_size(self.model),
                     "n_ctx": self.n_ctx, "n_batch": self.n_batch, "n_ubatch": L.llama_n_ubatch(self.ctx),
                     "threads": threads, "flash_attn_type": cp.flash_attn_type, "type_k": cp.type_k,
                     "type_v": cp.type_v, "adapters": {n: _adapter_info(p) for n, p in self.adapters.items()}}

    def _set_adapter(self, name: str | None) -> None:
        if name == self.active:
            return
        if name is None:
            rc = L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            ptrs = (L.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            rc = L.llama_set_adapters_lora(self.ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
        if rc:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")
        self.active = name

    def _truncate(self, n: int) -> None:
        L.llama_memory_seq_rm(self.mem, 0, n, -1)
        del self.cached[n:]

    def _decode(self, tokens: list[int], want_logits: bool) -> None:
        """Append ``tokens`` to the cache in chunks of n_batch; logits of the last one if ``want_logits``."""
        b = self.batch
        for off in range(0, len(tokens), self.n_batch):
            chunk = tokens[off:off + self.n_batch]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, len(self.cached) + i, 1, 0
                b.logits[i] = False
            last = off + len(chunk) == len(tokens)
            b.logits[len(chunk) - 1] = want_logits and last
            rc = L.llama_decode(self.ctx, b)
            if rc:
                raise RuntimeError(f"llama_decode failed ({rc}) at {len(self.cached)} cached tokens")
            self.cached.extend(chunk)

    def _argmax(self) -> int:
        """Greedy: the first token of highest logit at the last decoded position (as torch.argmax)."""
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))))

    def generate(self, prompt: list[int], n: int, adapter: str | None, fresh: bool, activation: str) -> dict:
        t0 = time.perf_counter()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + n > self.n_ctx:
            raise ValueError(f"{len(prompt)} + {n} tokens exceed the context of {self.n_ctx}")
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r} (loaded: {sorted(self.adapters)})")
        inv = self.invocations.get(adapter) if adapter else None
        start = _last_occurrence(prompt, inv) if inv else None
        if inv and start is None:
            adapter = None  # llama-server: "alora requested, but not found. deactivating"
        kv_owner = adapter if adapter and not inv else None  # whose weights the cached KV may come from
        if fresh or kv_owner != self.cached_adapter:
            self._truncate(0)
            self.cached_adapter = kv_owner
        keep = _common_prefix(self.cached, prompt)
        act = None
        if inv and start is not None:
            act = max(0, start - 1 if activation == "server" else start)
            keep = min(keep, act)
        keep = min(keep, len(prompt) - 1)  # the last prompt token is always decoded, for its logits
        reused = keep
        self._truncate(keep)
        if act is not None and act > keep:
            self._set_adapter(None)
            self._decode(prompt[keep:act], want_logits=False)
        self._set_adapter(adapter)
        self._decode(prompt[len(self.cached):], want_logits=n > 0)
        prefill_tokens = len(prompt) - reused
        out, first = [], None
        if n > 0:
            out.append(self._argmax())
            first = time.perf_counter()
            for _ in range(n - 1):
                self._decode([out[-1]], want_logits=True)
                out.append(self._argmax())
        end = time.perf_counter()
        if act is not None:
            self._truncate(act)  # only base-model KV stays cached
        return {"tokens": out, "prefill_s": (first or end) - t0, "total_s": end - t0,
                "decode_tok_s": (n - 1) / (end - first) if n > 1 and end > first else None,
                "reused_tokens": reused, "prefill_tokens": prefill_tokens,
                "adapter_used": adapter, "activation_index": act}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _last_occurrence(ids: list[int], pattern: list[int]) -> int | None:
    k = len(pattern)
    for i in range(len(ids) - k, -1, -1):
        if ids[i:i + k] == pattern:
            return i
    return None


def serve() -> None:
    _silence_logs()
    L.llama_backend_init()
    models: dict[str, Model] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                break
            if op == "load":
                models[req["key"]] = Model(req["model"], req.get("threads", 2), req.get("n_ctx", 8192),
                                           req.get("adapters") or {})
                reply = {"info": models[req["key"]].info}
            elif op == "generate":
                m = models.get(req["key"])
                if m is None:
                    raise ValueError(f"no model loaded under {req['key']!r}")
                reply = m.generate(req["prompt"], int(req.get("n", 0)), req.get("adapter"), bool(req.get("fresh")),
                                   req.get("activation", "server"))
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **reply}
        except Exception as e:  # reported to the caller, which raises it there
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def quantize(src: str, dst: str, type_name: str) -> None:
    """``dst`` = ``src`` with every weight matrix (and the tied token embedding) in ``type_name``."""
    _silence_logs()
    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[type_name]
    params.output_tensor_type = params.token_embedding_type = GGML_TYPES[type_name]
    params.allow_requantize = True  # the source is Q4_1 (and a Q8_0 embedding): dequantized, then written
    params.nthread = os.cpu_count() or 1
    tmp = dst + ".tmp"
    rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc:
        Path(tmp).unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize({src} -> {type_name}) failed ({rc})")
    os.replace(tmp, dst)
    print(f"   wrote {dst}")


def manifest(args) -> None:
    """peer.json: what the benchmarks need to find and describe the peer."""
    _silence_logs()
    L.llama_backend_init()
    build = Path(args.build)
    models = {}
    for path in sorted((build / "models").glob("*.gguf")):
        model = _load_model(str(path))
        models[path.stem.rsplit("-", 1)[1]] = {"path": str(path), "ftype": _ftype_name(model),
                                                "size_bytes": L.llama_model_size(model)}
        L.llama_model_free(model)
    if "F32" not in models:
        raise SystemExit(f"no F32 GGUF in {build / 'models'}")
    base = _load_model(models["F32"]["path"])
    adapters = {}
    for folder in sorted((Path(args.root) / "alora" / "demo_adapters").iterdir()):
        if not (folder / "adapter_config.json").is_file():
            continue
        gguf = build / "adapters" / f"{folder.name}.gguf"
        peft = json.loads((folder / "adapter_config.json").read_text())
        entry = {"folder": str(folder), "gguf": str(gguf) if gguf.is_file() else None, "converted": gguf.is_file(),
                 "log": str(build / "adapters" / f"{folder.name}.log"),
                 "peft_alora_invocation_tokens": peft.get("alora_invocation_tokens")}
        if gguf.is_file():
            ptr = L.llama_adapter_lora_init(base, str(gguf).encode())
            if not ptr:
                entry.update(converted=False, error="llama.cpp could not load the converted GGUF")
            else:
                entry.update(_adapter_info(ptr))
                entry["read_as"] = "alora" if entry["alora_invocation_tokens"] else "lora"
                entry["invocation_matches_peft"] = entry["alora_invocation_tokens"] == entry[
                    "peft_alora_invocation_tokens"]
        adapters[folder.name] = entry
    print(json.dumps({
        "llama_cpp_python": L.__version__, "built_from": f"PyPI sdist llama-cpp-python=={args.version}, "
                                                        "CMAKE_ARGS=-DGGML_NATIVE=ON",
        "system_info": L.llama_print_system_info().decode().strip(), "python": sys.executable,
        "worker": str(Path(__file__).resolve()), "llama_server": args.server,
        "llama_cpp_source": str(build / "src" / f"llama_cpp_python-{args.version}" / "vendor" / "llama.cpp"),
        "base_safetensors": args.base_dir, "convert_base": args.convert_base, "shipped_gguf": args.shipped, "models": models, "adapters": adapters,
    }, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("serve", help="JSON-lines requests on stdin (the default)")
    q = sub.add_parser("quantize", help="requantize a GGUF with llama_model_quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("type", choices=sorted(FTYPES))
    m = sub.add_parser("manifest", help="print peer.json")
    for flag in ("--root", "--build", "--server", "--base-dir", "--convert-base", "--shipped", "--version"):
        m.add_argument(flag, required=True)
    args = p.parse_args()
    if args.cmd == "quantize":
        quantize(args.src, args.dst, args.type)
    elif args.cmd == "manifest":
        manifest(args)
    else:
        serve()


if __name__ == "__main__":
    main()
