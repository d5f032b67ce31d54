"""The alora chat UI (Gradio). Start it with ``alora ui``, ``python -m app`` or ``make demo``; installed, this
folder is the package ``alora_app``.

- ``app.cli``: the command line (``alora ui`` and ``python -m app`` share it).
- ``app.ui``: the Blocks layout and its handlers (``ChatUI``, ``launch``).
- ``app.session``: per-browser-session conversations (``ChatSession``) and the adapter-folder allow-list.
- ``app.render``: what the panels show (chat view, stats table, side panel), as plain functions.
"""
