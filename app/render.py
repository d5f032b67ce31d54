"""What the UI shows, as plain functions of engine facts: adapter labels, the chat view, the stats panel
(HTML with ``data-stat`` cells a test or script can read) and its JSON twin, the intrinsic side panel."""

from __future__ import annotations

import dataclasses
from html import escape

import alora

from .session import Baseline

BASE = "base"
KIND = {"alora": "aLoRA", "lora": "LoRA"}
SEP = " · "  # between an adapter's name and its kind in button labels

COLUMNS = (  # (CallStats field, column title)
    ("reused_tokens", "reused from cache"),
    ("prefill_tokens", "prefilled"),
    ("recomputed_tokens", "recomputed"),
    ("ttft_s", "time to first token"),
    ("decode_tokens_per_s", "tokens/s"),
    ("decode_tokens", "tokens out"),
    ("total_s", "total"),
)

CSS = """
.alora-stats table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
.alora-stats th, .alora-stats td { border: 1px solid var(--border-color-primary); padding: 3px 6px; text-align: right; }
.alora-stats th:first-child { text-align: left; }
.alora-stats .mode, .alora-stats .speedup, .alora-stats .error { margin: 4px 0; }
.alora-stats .error, .side-panel .error { color: var(--error-text-color, #b91c1c); }
.side-panel pre { white-space: pre-wrap; margin: 4px 0; }
#load-status .error { color: var(--error-text-color, #b91c1c); }
"""


def kind_of(engine: alora.Engine, name: str | None) -> str | None:
    """'alora' | 'lora' for a loaded adapter, None for the base model or a name no longer loaded."""
    if not name or name == BASE:
        return None
    info = engine.adapters.get(name)
    return info.kind if info is not None else None


def adapter_label(info: alora.AdapterInfo) -> str:
    return f"{info.name}{SEP}{KIND[info.kind]}"


def adapter_choices(engine: alora.Engine) -> list[tuple[str, str]]:
    """Selector choices (label, value): the base model, then every loaded adapter with its kind and rank."""
    return [("base model", BASE)] + [(f"{adapter_label(info)} (rank {info.rank})", name)
                                     for name, info in engine.adapters.items()]


def name_from_label(engine: alora.Engine, label: str) -> str:
    """The adapter a button label (``NAME · aLoRA``) or a bare name stands for."""
    label = (label or "").strip()
    if label in engine.adapters or SEP not in label:
        return label
    return label.rsplit(SEP, 1)[0]


def adapter_note(engine: alora.Engine, choice: str | None) -> str:
    """What sending with ``choice`` will do, in one sentence (Markdown)."""
    kind = kind_of(engine, choice)
    if kind == "alora":
        info = engine.adapters[choice]
        invocation = (info.invocation_text or "").replace("`", "'").replace("\n", "\\n")
        return (f"**{choice}** is an aLoRA: it is invoked after your message (invocation `{invocation}`), "
                "reusing the conversation's cached history.")
    if kind == "lora":
        return (f"**{choice}** is a standard LoRA: the whole history is **recomputed** under its weights "
                "for this reply (it cannot reuse the base model's cache).")
    if choice and choice != BASE:
        return f"**{choice}** is no longer loaded; sending with it would fail. Pick another."
    return "The base model answers; the conversation's cached history is reused."


def chat_view(engine: alora.Engine, messages: list[dict]) -> list[dict]:
    """Chatbot messages for a conversation's history: no system prompt; adapter replies labelled."""
    out = []
    for m in messages:
        if m["role"] == "system":
            continue
        out.append({"role": m["role"], "content": reply_prefix(engine, m.get("adapter")) + m["content"]})
    return out


def reply_prefix(engine: alora.Engine, adapter: str | None) -> str:
    if not adapter:
        return ""
    kind = kind_of(engine, adapter)
    return f"`[{adapter}{SEP + KIND[kind] if kind else ''}]` "


def mode_text(adapter: str | None, kind: str | None, action: str, stats: alora.CallStats | None,
              keep: bool = False) -> str:
    """One sentence on how the call used the cache (on a first reply, nothing was cached to reuse)."""
    cold = stats is not None and stats.reused_tokens == 0
    if adapter is None:
        return ("Base model: nothing was cached yet, so the whole prompt was computed." if cold
                else "Base model: the cached history was reused.")
    if kind == "lora":
        n = stats.recomputed_tokens if stats else 0
        return (f"LoRA <b>{escape(adapter)}</b>: the whole history was recomputed under its weights "
                f"({n} tokens recomputed).")
    where = "after your message" if action == "send" else "on the conversation"
    tail = " Its output was kept in the chat." if action == "invoke" and keep else (
        " The chat history is unchanged." if action == "invoke" else "")
    reuse = "nothing was cached yet, so the history was computed" if cold else "the cached base history was reused"
    return f"aLoRA <b>{escape(adapter)}</b> invoked {where}: {reuse}.{tail}"


def _cell(field: str, stats: alora.CallStats | None) -> str:
    if stats is None:
        return "–"
    value = getattr(stats, field)
    if field == "decode_tokens_per_s":
        return f"{value:.1f}"
    if field.endswith("_s"):
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return str(value)


def _row(kind: str, title: str, stats: alora.CallStats | None) -> str:
    cells = "".join(f'<td data-stat="{f}">{escape(_cell(f, stats))}</td>' for f, _ in COLUMNS)
    return f'<tr data-row="{kind}"><th>{escape(title)}</th>{cells}</tr>'


def stats_html(stats: alora.CallStats | None, *, adapter: str | None = None, kind: str | None = None,
               action: str = "send", keep: bool = False, stopped: bool = False, running: bool = False,
               baseline: Baseline | None = None, comparing: bool = False, note: str | None = None,
               error: str | None = None, call: int = 0) -> str:
    """The live stats panel of the last call, with the standard-way run beside it when compared.

    ``data-call`` numbers the call and ``data-state`` (running, comparing, done) says where it is, so a
    script can wait for a given call to finish."""
    state = "running" if running else "comparing" if comparing else "done"
    parts = [f'<div class="alora-stats" data-call="{call}" data-state="{state}">']
    if error:
        parts.append(f'<div class="error" data-error="1">⚠ {escape(error)}</div>')
    if stats is not None:
        parts.append(f'<div class="mode">{mode_text(adapter, kind, action, stats, keep)}</div>')
        head = "".join(f"<th>{escape(t)}</th>" for _, t in COLUMNS)
        who = f"{adapter} ({KIND.get(kind, '?')})" if adapter else "base model"
        rows = [_row("call", f"this call: {who}" + (" (running…)" if running else ""), stats)]
        if baseline is not None:
            rows.append(_row("baseline", baseline.label, baseline.stats))
        parts.append(f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        if stats.dropped_turns:
            parts.append(f'<div class="mode" data-dropped="{stats.dropped_turns}">The chat outgrew the model\'s '
                         f'context: its {stats.dropped_turns} oldest exchange(s) were dropped.</div>')
        if stopped:
            parts.append('<div class="mode">Stopped: the partial reply was kept in the conversation.</div>')
        elif not running and stats.finish_reason == "length":
            parts.append(f'<div class="mode" data-cut="1">Cut at the limit of {stats.decode_tokens} new tokens: raise '
                         '"Max new tokens" for longer replies.</div>')
    if comparing:
        parts.append('<div class="speedup">Running the same request the standard way for comparison…</div>')
    if baseline is not None:
        parts.append(f'<div class="speedup" data-compare="1">{compare_text(stats, baseline)}</div>')
    if note:
        parts.append(f'<div class="mode">{escape(note)}</div>')
    parts.append("</div>")
    return "".join(parts)


def compare_text(stats: alora.CallStats | None, baseline: Baseline) -> str:
    if baseline.error or baseline.stats is None or stats is None:
        return f"Comparison not available: {escape(baseline.error or 'no result')}."
    a, b = stats, baseline.stats
    ratio = f" ({b.ttft_s / a.ttft_s:.1f}× faster to first token)" if a.ttft_s > 0 and b.ttft_s > 0 else ""
    return (f"Time to first token: <b>{a.ttft_s * 1000:.0f} ms</b> with the aLoRA reusing the cache "
            f"({a.prefill_tokens} tokens prefilled) vs <b>{b.ttft_s * 1000:.0f} ms</b> the standard way "
            f"({b.prefill_tokens} prefilled){ratio}; total {a.total_s:.2f} s for {a.decode_tokens} tokens vs "
            f"{b.total_s:.2f} s for {b.decode_tokens}"
            + (" (different lengths: the totals are not comparable)." if a.decode_tokens != b.decode_tokens else "."))


def stats_json(stats: alora.CallStats | None, *, adapter: str | None = None, kind: str | None = None,
               action: str = "send", stopped: bool = False, baseline: Baseline | None = None,
               error: str | None = None, call: int = 0, result=None) -> dict:
    """The same facts as the panel, for the raw view and API clients (``result``: an intrinsic's)."""
    out: dict = {"call_id": call, "action": action, "adapter": adapter, "kind": kind, "stopped": stopped}
    if stats is not None:
        out["call"] = dataclasses.asdict(stats)
    if baseline is not None:
        out["baseline"] = {"label": baseline.label, "adapter": baseline.adapter, "error": baseline.error,
                           "stats": dataclasses.asdict(baseline.stats) if baseline.stats else None}
    if result is not None:
        out["result"] = result
    if error:
        out["error"] = error
    return out


def side_html(name: str, kind: str | None, text: str, *, running: bool = False, keep: bool = False,
              error: str | None = None, result=None) -> str:
    """The intrinsic side panel: which adapter ran, what it said and, for an io.yaml intrinsic, its result
    (likelihoods as bars)."""
    head = escape(name + (SEP + KIND[kind] if kind else ""))
    state = " (running…)" if running else (" (kept in chat)" if keep else " (chat history unchanged)")
    body = f'<div class="error" data-error="1">⚠ {escape(error)}</div>' if error else ""
    return (f'<div class="side-panel" data-adapter="{escape(name)}" data-running="{int(running)}">'
            f"<b>{head}</b>{escape(state)}{result_html(result)}<pre data-output=\"1\">{escape(text)}</pre>"
            f"{body}</div>")


def result_html(result) -> str:
    """An intrinsic's result: each number in [0, 1] (a likelihood) as a labelled bar, other fields as text."""
    if result is None:
        return ""
    rows = []
    for path, value in _leaves(result, ()):
        label = escape(".".join(map(str, path)) or "result")
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            rows.append(f'<div class="likelihood" data-field="{label}" data-value="{value:.4f}">{label}: '
                        f'<span class="bar" style="display:inline-block;width:120px;background:#ddd">'
                        f'<span style="display:block;width:{100 * value:.1f}%;background:#3b82f6">&nbsp;</span>'
                        f"</span> {100 * value:.0f}%</div>")
        else:
            rows.append(f'<div class="field" data-field="{label}">{label}: {escape(str(value))}</div>')
    return f'<div class="result" data-result="1">{"".join(rows)}</div>'


def _leaves(value, path: tuple):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path, value


def load_status_html(message: str, ok: bool) -> str:
    cls = "ok" if ok else "error"
    mark = "✓" if ok else "⚠"
    return f'<div class="{cls}" data-ok="{int(ok)}">{mark} {escape(message)}</div>'
