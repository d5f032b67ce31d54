"""Serving: ``openai_api.create_app`` (the OpenAI-compatible HTTP API over an engine) and ``cli`` (``alora serve``).

Nothing is imported here, so ``alora --help`` works without the ``serve`` extra (FastAPI, uvicorn) installed.
"""
