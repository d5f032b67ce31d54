"""The Gradio chat UI: one shared engine, one conversation per browser session, adapters switched per message.

Layout: the chat (streaming), its controls and the live stats on the left; on the right the adapter selector,
the "compare with LoRA swapping" toggle, one-click intrinsic buttons with their side panel, the sampling
settings and the adapter loader. Named API endpoints (``/send``, ``/invoke``, ``/stop``, ``/clear``,
``/load_adapter``) make the same flow scriptable with ``gradio_client``.
"""

from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace

import gradio as gr

import alora
from . import render
from .render import BASE
from .session import ENGINE_ERRORS, AdapterFolders, ChatSession, run_baseline

log = logging.getLogger("app")

MAX_BUTTONS = 12  # intrinsic buttons shown; more adapters stay reachable from the selector
INTRINSIC_TEMPERATURE = 0.0  # intrinsics answer a question about the chat: decode them greedily


class ChatUI:
    """Builds the Blocks app around one engine; every handler works on the caller's ``ChatSession``."""

    def __init__(self, engine: alora.Engine, folders: AdapterFolders | None = None, *, system: str | None = None,
                 temperature: float = 0.7, max_new_tokens: int = 256, concurrency: int = 4,
                 overflow: str = "drop_oldest"):
        self.engine = engine
        self.overflow = overflow
        self.folders = folders or AdapterFolders([])
        self.system = system or ""
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.c = SimpleNamespace()  # the components, once built
        self._calls = itertools.count(1)  # numbers the calls shown in the stats panel

    # ---- layout -------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        c, engine = self.c, self.engine
        with gr.Blocks(title="alora chat", analytics_enabled=False) as demo:
            c.state = gr.State(None)
            gr.Markdown(f"## alora chat · `{engine.model_path.name}`\n"
                        "Switch skills mid-conversation: aLoRA adapters reuse the conversation's KV cache, "
                        "standard LoRAs recompute it. Stats below every reply show the difference.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    c.chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=460, feedback_options=None,
                                           buttons=["copy", "copy_all"],
                                           group_consecutive_messages=False)  # a kept intrinsic: its own bubble
                    with gr.Row():
                        c.msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                           elem_id="msg", scale=6, autofocus=True)
                        c.send_btn = gr.Button("Send", variant="primary", elem_id="send-btn", scale=1)
                    with gr.Row():
                        c.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", size="sm")
                        c.clear_btn = gr.Button("Clear", elem_id="clear-btn", size="sm")
                    c.stats = gr.HTML(render.stats_html(None, note="Stats of each reply appear here."),
                                      elem_id="stats")
                    with gr.Accordion("Raw stats (JSON)", open=False):
                        c.raw = gr.JSON(elem_id="raw-stats")
                with gr.Column(scale=2):
                    # a Dropdown accepting any value: adapters loaded by another session after this one's
                    # page load stay selectable through the API (the engine names unknown ones)
                    c.adapter = gr.Dropdown(render.adapter_choices(engine), value=BASE, elem_id="adapter",
                                            label="Adapter for the next message", allow_custom_value=True)
                    c.note = gr.Markdown(render.adapter_note(engine, BASE), elem_id="adapter-note")
                    c.compare = gr.Checkbox(False, label="Compare with LoRA swapping", elem_id="compare",
                                            info="After an aLoRA call, also run it the standard way (its LoRA "
                                                 "twin, or the history prefilled again) and show both times.")
                    gr.Markdown("### Intrinsics\nRun an adapter on the conversation now; its output shows "
                                "here, the chat is left as it is unless you keep it.")
                    with gr.Row(elem_id="intrinsics"):
                        c.buttons = [gr.Button(**self._button(i), size="sm", elem_classes=["intrinsic"],
                                               elem_id=f"intrinsic-{i}") for i in range(MAX_BUTTONS)]
                    c.no_adapters = gr.Markdown(self._no_adapters_text(), elem_id="no-adapters")
                    c.keep = gr.Checkbox(False, label="Keep in chat", elem_id="keep")
                    c.side = gr.HTML("", elem_id="side-panel", label="Intrinsic output", show_label=True,
                                     container=True, padding=True, min_height=60)
                    with gr.Accordion("Settings", open=True):
                        c.system = gr.Textbox(self.system, label="System prompt", elem_id="system", lines=2,
                                              placeholder="(the model's default)",
                                              info="Changing it restarts the cache: the next reply recomputes "
                                                   "the history.")
                        c.temperature = gr.Slider(0.0, 1.5, value=self.temperature, step=0.05,
                                                  label="Temperature (0 = greedy)", elem_id="temperature")
                        c.max_tokens = gr.Slider(1, 1024, value=self.max_new_tokens, step=1,
                                                 label="Max new tokens", elem_id="max-tokens")
                    with gr.Accordion("Load an adapter", open=False, elem_id="load-accordion"):
                        c.path = gr.Textbox(label="Adapter folder on the server", elem_id="adapter-path",
                                            info=self._folders_text())
                        c.name = gr.Textbox(label="Name (default: the folder's name)", elem_id="adapter-name")
                        c.load_btn = gr.Button("Load adapter", elem_id="load-btn")
                        c.load_status = gr.HTML("", elem_id="load-status")
            # API-only trigger for invoking an adapter by name (the buttons above pass their label)
            c.invoke_name = gr.Textbox(visible=False)
            c.invoke_btn = gr.Button(visible=False)
            self._wire(demo)
        return demo

    def _wire(self, demo: gr.Blocks) -> None:
        c = self.c
        generate = dict(concurrency_id="generate", concurrency_limit=self.concurrency, show_progress="hidden")
        chat_out = [c.state, c.chatbot, c.msg, c.stats, c.raw]
        gr.on([c.msg.submit, c.send_btn.click], self.send, api_name="send", outputs=chat_out,
              inputs=[c.state, c.msg, c.adapter, c.system, c.temperature, c.max_tokens, c.compare], **generate)
        invoke_in = [c.keep, c.compare, c.max_tokens, c.system]
        invoke_out = [c.state, c.chatbot, c.side, c.stats, c.raw]
        c.invoke_btn.click(self.invoke, [c.state, c.invoke_name] + invoke_in, invoke_out, api_name="invoke",
                           **generate)
        for b in c.buttons:
            b.click(self.invoke, [c.state, b] + invoke_in, invoke_out, api_visibility="private", **generate)
        c.stop_btn.click(self.stop, [c.state], None, api_name="stop", concurrency_limit=None, queue=False)
        clear_out = [c.state, c.chatbot, c.stats, c.raw, c.side]
        c.clear_btn.click(self.clear, [c.state, c.system], clear_out, api_name="clear", concurrency_limit=None)
        c.chatbot.clear(self.clear, [c.state, c.system], clear_out, api_visibility="private", concurrency_limit=None)
        c.adapter.change(self.describe, [c.adapter], [c.note], api_visibility="private", queue=False)
        refresh_out = [c.adapter, c.note, c.no_adapters] + c.buttons
        c.load_btn.click(self.load_adapter, [c.path, c.name, c.adapter], [c.load_status] + refresh_out,
                         api_name="load_adapter")
        demo.load(self.refresh, [c.adapter], refresh_out, api_visibility="private", queue=False)

    def _button(self, i: int) -> dict:
        infos = list(self.engine.adapters.values())
        if i < len(infos):
            return dict(value=render.adapter_label(infos[i]), visible=True)
        return dict(value="", visible=False)

    def _no_adapters_text(self) -> str:
        return "" if self.engine.adapters else "*No adapters loaded: load one below.*"

    def _folders_text(self) -> str:
        if not self.folders:
            return "Off: start the app with --adapters DIR to allow loading folders under DIR."
        return "Allowed under: " + ", ".join(map(str, self.folders.roots)) + " (relative paths are looked up there)."

    # ---- handlers -----------------------------------------------------------------------------------

    def _session(self, sess: ChatSession | None, system: str | None) -> ChatSession:
        return sess if isinstance(sess, ChatSession) else ChatSession(self.engine, system, self.overflow)

    def send(self, sess, text, choice, system, temperature, max_tokens, compare):
        """Send a message (with the selected adapter) and stream the reply into the chat."""
        c, engine = self.c, self.engine
        sess = self._session(sess, system)
        text = (text or "").strip()
        if not text:
            yield {c.state: sess}
            return
        adapter = None if choice in (None, "", BASE) else choice
        kind = render.kind_of(engine, adapter)
        live = dict(adapter=adapter, kind=kind, action="send", call=next(self._calls))
        sampling = dict(max_new_tokens=int(max_tokens), temperature=float(temperature))
        try:
            call, ticket, before = sess.start(system, lambda conv: conv.start_send(text, adapter, **sampling))
        except ENGINE_ERRORS as e:
            msg = _message(e)
            yield {c.state: sess, c.chatbot: render.chat_view(engine, sess.messages()),
                   c.stats: render.stats_html(None, error=msg, **live),
                   c.raw: render.stats_json(None, error=msg, **live)}
            return
        stats = call.stats
        shown = render.chat_view(engine, before) + [{"role": "user", "content": text}]
        prefix = render.reply_prefix(engine, adapter)
        yield {c.state: sess, c.msg: "", c.chatbot: shown + [{"role": "assistant", "content": prefix + "…"}],
               c.stats: render.stats_html(stats, running=True, **live), c.raw: render.stats_json(stats, **live)}
        reply, error = "", None
        try:
            for delta in sess.drain(call, ticket):
                reply += delta
                yield {c.chatbot: shown + [{"role": "assistant", "content": prefix + reply}]}
        except Exception as e:  # an engine failure mid-stream: the conversation already dropped the turn
            log.exception("send failed")
            error = f"generation failed: {e}"
        final = self._final(sess, ticket)
        if final is None:
            return  # superseded by a newer call or Clear in this session: that one updates the view
        stopped = final == "stopped"
        view = render.chat_view(engine, sess.messages())
        result = {c.state: sess, c.chatbot: view,
                  c.stats: render.stats_html(stats, stopped=stopped, error=error, **live),
                  c.raw: render.stats_json(stats, stopped=stopped, error=error, **live)}
        yield result
        if compare and not stopped and not error:
            yield from self._compare(sess, ticket, before + [{"role": "user", "content": text}], adapter, kind,
                                     stats, None, live, sampling)

    def invoke(self, sess, adapter, keep, compare, max_tokens, system=None):
        """Run an adapter on the conversation now; its output goes to the side panel (and the chat if kept)."""
        c, engine = self.c, self.engine
        sess = self._session(sess, system)
        name = render.name_from_label(engine, adapter)
        kind = render.kind_of(engine, name)
        keep = bool(keep)
        live = dict(adapter=name, kind=kind, action="invoke", call=next(self._calls))
        sampling = dict(max_new_tokens=int(max_tokens), temperature=INTRINSIC_TEMPERATURE)
        spec = engine.intrinsics.get(name)  # an io.yaml intrinsic: run as its clients do, its result shown
        keep = keep and spec is None
        start = (lambda conv: conv.start_intrinsic(name)) if spec is not None else \
            (lambda conv: conv.start_invoke(name, keep, **sampling))
        try:
            call, ticket, before = sess.start(system, start)
        except ENGINE_ERRORS as e:
            msg = _message(e)
            yield {c.state: sess, c.side: render.side_html(name, kind, "", error=msg),
                   c.stats: render.stats_html(None, error=msg, **live),
                   c.raw: render.stats_json(None, error=msg, **live)}
            return
        stats = call.stats
        yield {c.state: sess, c.side: render.side_html(name, kind, "", running=True, keep=keep),
               c.stats: render.stats_html(stats, running=True, keep=keep, **live),
               c.raw: render.stats_json(stats, **live)}
        out, error = "", None
        try:
            for delta in sess.drain(call, ticket):
                out += delta
                yield {c.side: render.side_html(name, kind, out, running=True, keep=keep)}
        except Exception as e:
            log.exception("invoke failed")
            error = f"generation failed: {e}"
        final = self._final(sess, ticket)
        if final is None:
            return
        stopped = final == "stopped"
        result = None
        if spec is not None and not stopped and error is None:
            try:
                result = spec.result(call, engine.token_text)
            except Exception as e:  # an output its rules cannot read
                error = f"the intrinsic's result could not be read: {e}"
        view = render.chat_view(engine, sess.messages())
        yield {c.state: sess, c.chatbot: view,
               c.side: render.side_html(name, kind, out, keep=keep, error=error, result=result),
               c.stats: render.stats_html(stats, stopped=stopped, keep=keep, error=error, **live),
               c.raw: render.stats_json(stats, stopped=stopped, error=error, result=result, **live)}
        if compare and not stopped and not error and spec is None:
            yield from self._compare(sess, ticket, before, name, kind, stats, keep, live, sampling)

    def _final(self, sess: ChatSession, ticket: int) -> str | None:
        """'done', 'stopped' (by Stop), or None when a newer call of this session took over."""
        if sess.current(ticket):
            return "done"
        return "stopped" if sess.stopped_ticket == ticket else None

    def _compare(self, sess, ticket, before, adapter, kind, stats, keep, live, sampling):
        """Run the same request the standard way and show both stats side by side (aLoRA calls only)."""
        c = self.c
        if kind != "alora":
            note = ("Comparison: this call already ran the standard way (a LoRA recomputes the history)."
                    if kind == "lora" else "Comparison applies to aLoRA calls; pick an aLoRA adapter.")
            yield {c.stats: render.stats_html(stats, keep=bool(keep), note=note, **live),
                   c.raw: render.stats_json(stats, **live)}
            return
        yield {c.stats: render.stats_html(stats, keep=bool(keep), comparing=True, **live),
               c.raw: render.stats_json(stats, **live)}
        text = before[-1]["content"] if live["action"] == "send" else None
        history = before[:-1] if text is not None else before
        base = run_baseline(sess, ticket, history, adapter, text, **sampling)
        if not sess.current(ticket):
            return
        yield {c.stats: render.stats_html(stats, keep=bool(keep), baseline=base, **live),
               c.raw: render.stats_json(stats, baseline=base, **live)}

    def stop(self, sess):
        """Stop this session's generation at its next step; the partial reply stays in the chat."""
        if isinstance(sess, ChatSession):
            sess.stop()

    def clear(self, sess, system):
        c = self.c
        sess = self._session(sess, system)
        sess.clear(system)
        return {c.state: sess, c.chatbot: [], c.side: "",
                c.stats: render.stats_html(None, note="Conversation cleared.", call=next(self._calls)), c.raw: None}

    def describe(self, choice):
        return render.adapter_note(self.engine, choice)

    def refresh(self, choice):
        """Selector, note and intrinsic buttons for the adapters loaded now (another session may have loaded some)."""
        c = self.c
        choices = render.adapter_choices(self.engine)
        value = choice if choice in [v for _, v in choices] else BASE
        out = {c.adapter: gr.Dropdown(choices=choices, value=value),
               c.note: render.adapter_note(self.engine, value),
               c.no_adapters: self._no_adapters_text()}
        for i, b in enumerate(c.buttons):
            out[b] = gr.Button(**self._button(i))
        return out

    def load_adapter(self, path, name, choice):
        """Load an adapter folder from an allowed directory; errors are shown, not raised."""
        c = self.c
        try:
            info = self.folders.load(self.engine, path, name)
        except ENGINE_ERRORS as e:
            msg = _message(e)
            return {c.load_status: render.load_status_html(msg, ok=False), **self.refresh(choice)}
        except Exception as e:  # anything else: show it, keep serving
            log.exception("loading an adapter failed")
            return {c.load_status: render.load_status_html(f"unexpected error: {e}", ok=False),
                    **self.refresh(choice)}
        msg = f"loaded {info.name}: {render.KIND[info.kind]}, rank {info.rank}, from {info.path}"
        return {c.load_status: render.load_status_html(msg, ok=True), **self.refresh(choice)}


def _message(e: Exception) -> str:
    """An engine error as one line (a KeyError's str() would add quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def launch(ui: ChatUI, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **kwargs):
    """Build and serve the app (blocking unless ``prevent_thread_lock=True``)."""
    demo = ui.build()
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, css=render.CSS, show_error=True,
                       ssr_mode=False, **kwargs)
