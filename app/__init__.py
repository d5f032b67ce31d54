"""The alora chat UI (Gradio). Start it with ``python -m app`` or ``make demo``.

- ``app.ui``: the Blocks layout and its handlers (``ChatUI``, ``launch``).
- ``app.session``: per-browser-session conversations (``ChatSession``) and the adapter-folder allow-list.
- ``app.render``: what the panels show (chat view, stats table, side panel), as plain functions.
"""
