"""What the UI keeps per browser session, and where adapters may be loaded from. No Gradio in here.

``ChatSession`` wraps one ``alora.Conversation``. Every touch of the conversation happens under the
session's lock, so a Stop click, a Clear or a second Send from the same browser never races a generation still
in flight: each call takes a ticket, and a call whose ticket is no longer current is cancelled (the engine's
scheduler ends it at its next step; the conversation keeps what it generated). Calls of different sessions
run batched together in the engine's scheduler.

``AdapterFolders`` is the allow-list for loading adapters from the UI: a path typed in the browser is
resolved (symlinks and ``..`` included) and must lie under one of the directories the server was started
with; nothing is uploaded, and the engine refuses pickles on its own.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import alora

CONFIG_FILE = "adapter_config.json"
_baselines = itertools.count()
ENGINE_ERRORS = (alora.AdapterError, alora.CheckpointError, ValueError, KeyError, OSError)


class LoadRefused(ValueError):
    """A path typed in the UI is not one the server may load an adapter from."""


def twin_lora(engine: alora.Engine, name: str) -> str | None:
    """The standard-LoRA version of aLoRA ``name`` when one is loaded (``NAME_lora`` or ``NAME-lora``)."""
    adapters = engine.adapters
    for candidate in (f"{name}_lora", f"{name}-lora"):
        info = adapters.get(candidate)
        if info is not None and info.kind == "lora":
            return candidate
    return None


class ChatSession:
    """One browser session's conversation on the shared engine."""

    def __init__(self, engine: alora.Engine, system: str | None = None, overflow: str = "drop_oldest"):
        self.engine = engine
        self.overflow = overflow  # what a call that outgrows the context does (see ``alora.Conversation``)
        self.lock = threading.RLock()
        self._ticket_lock = threading.Lock()
        self._ticket = 0
        self.stopped_ticket = -1  # the ticket the Stop button ended last
        self.system = (system or "").strip() or None
        self.conv = engine.conversation(system=self.system, overflow=overflow)
        self.call: alora.Call | None = None  # the call in flight, if any

    def __deepcopy__(self, memo):  # a session is never copied (Gradio deep-copies some state values)
        return self

    # ---- tickets ----------------------------------------------------------------------------------

    def begin(self) -> int:
        """A new ticket: the call holding the previous one stops at its next step."""
        with self._ticket_lock:
            self._ticket += 1
            return self._ticket

    def stop(self) -> None:
        """End the call in flight at its next step (``stopped_ticket`` tells its handler it was Stop)."""
        with self._ticket_lock:
            self.stopped_ticket = self._ticket
            self._ticket += 1
        call = self.call
        if call is not None:
            call.cancel()

    def current(self, ticket: int) -> bool:
        return self._ticket == ticket

    # ---- calls ------------------------------------------------------------------------------------

    def start(self, system: str | None, prepare: Callable[[alora.Conversation], alora.Call]
              ) -> tuple[alora.Call, int, list[dict]]:
        """Start a call: take a ticket, stop the call before it (its output kept), apply the system prompt,
        then ``prepare(conversation)`` (``start_send``/``start_invoke``). Returns the call, its ticket and
        the messages before it. Engine errors propagate; the conversation is then unchanged."""
        with self.lock:
            ticket = self.begin()
            self._end_call()
            self.use_system(system)
            before = self.conv.messages
            self.call = prepare(self.conv)
            return self.call, ticket, before

    def drain(self, call: alora.Call, ticket: int) -> Iterator[str]:
        """Yield ``call``'s text deltas while ``ticket`` is current; a superseded or stopped call is cancelled
        (the engine ends it at its next step, and the conversation keeps what it generated). An engine
        error raises here, and the conversation takes the call back."""
        try:
            for event in call:
                if not self.current(ticket):
                    call.cancel()
                    return
                if event.text:
                    yield event.text
        finally:
            if not call.finished:  # superseded, stopped, or the handler was abandoned (browser closed)
                call.cancel()
                call.wait()  # the next scheduler step: then its stats are final
            with self.lock:
                if self.call is call:
                    self.call = None

    def _end_call(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None

    def use_system(self, system: str | None) -> None:
        """Apply the system-prompt box: a changed prompt gives a conversation with the same turns (kept
        adapter outputs included, token for token) under the new system prompt; the KV the turns share with
        the old rendering is reused by the next call. Call with the lock held."""
        system = (system or "").strip() or None
        if system == self.system:
            return
        state = self.conv.to_dict()
        turns = [t for t in state["turns"] if t["message"]["role"] != "system"]
        if system is not None:
            turns.insert(0, {"message": {"role": "system", "content": system}})
        self.conv = self.engine.conversation_from({**state, "turns": turns})
        self.system = system

    def clear(self, system: str | None = None) -> None:
        """A fresh conversation (same engine) with ``system``; any call in flight stops."""
        self.begin()
        with self.lock:
            self._end_call()
            self.system = (system or "").strip() or None
            self.conv = self.engine.conversation(system=self.system, overflow=self.overflow)

    def messages(self) -> list[dict]:
        with self.lock:
            return self.conv.messages


@dataclass
class Baseline:
    """The same request run the standard way, for the "compare with LoRA swapping" toggle."""

    label: str
    adapter: str
    stats: alora.CallStats | None
    text: str
    error: str | None = None


def run_baseline(session: ChatSession, ticket: int, before: list[dict], alora_name: str, text: str | None,
                 **sampling) -> Baseline:
    """Run what the aLoRA call cost the standard way, in a scratch conversation holding ``before``: its
    LoRA twin when one is loaded, else the same aLoRA weights with the whole history prefilled again.
    ``text`` is the user message of a send (None for an invoke)."""
    engine = session.engine
    twin = twin_lora(engine, alora_name)
    adapter = twin or alora_name
    label = (f"LoRA swapping ({twin}: history recomputed)" if twin
             else "standard way (same weights, history re-prefilled)")
    # a salt of its own: the baseline computes everything afresh, as a switch would, and its KV is
    # never found by the session's later calls
    scratch = engine.conversation(messages=before, cache_salt=f"baseline-{next(_baselines)}")
    try:
        gen = scratch.send(text, adapter=adapter, **sampling) if text is not None \
            else scratch.invoke(adapter, **sampling)
        out = ""
        for delta in gen:
            if not session.current(ticket):
                gen.close()
                return Baseline(label, adapter, None, out, "stopped")
            out += delta
    except ENGINE_ERRORS as e:
        return Baseline(label, adapter, None, "", str(e))
    return Baseline(label, adapter, scratch.stats, out)


class AdapterFolders:
    """The directories adapters may be loaded from, and the folders found in them."""

    def __init__(self, roots: list[str | Path]):
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def __bool__(self) -> bool:
        return bool(self.roots)

    def discover(self) -> list[tuple[str, Path]]:
        """(name, folder) of every adapter folder: a root that is one, or its direct subfolders that are."""
        found = []
        for root in self.roots:
            if (root / CONFIG_FILE).is_file():
                found.append((root.name, root))
            elif root.is_dir():
                found.extend((sub.name, sub) for sub in sorted(root.iterdir())
                             if sub.is_dir() and (sub / CONFIG_FILE).is_file())
        return found

    def resolve(self, text: str) -> Path:
        """The folder a typed path names, if it lies under an allowed directory; relative paths are taken
        relative to each allowed directory in turn. Raises LoadRefused otherwise (before looking at what
        exists outside, so the UI reveals nothing about the rest of the server's disk)."""
        if not self.roots:
            raise LoadRefused("loading adapters from the UI is off: start the app with --adapters DIR to allow "
                              "folders under DIR")
        text = (text or "").strip()
        if not text:
            raise LoadRefused("enter the path of an adapter folder on the server")
        path = Path(text).expanduser()
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        inside = [c.resolve() for c in candidates if self._allowed(c.resolve())]
        if not inside:
            raise LoadRefused(f"{text}: not under the adapter directories this server allows "
                              f"({', '.join(map(str, self.roots))})")
        return next((p for p in inside if p.exists()), inside[0])

    def _allowed(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)

    def load(self, engine: alora.Engine, text: str, name: str | None = None) -> alora.AdapterInfo:
        """Resolve ``text`` and load it under ``name`` (default: the folder's name); errors raise with the
        engine's message."""
        folder = self.resolve(text)
        name = (name or "").strip() or folder.name
        if name == "base":
            raise LoadRefused("'base' names the base model; choose another adapter name")
        return engine.load_adapter(name, folder)
