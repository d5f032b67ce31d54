"""``python -m app`` (``make demo``; ``python -m alora_app`` when installed): serve the chat UI on 127.0.0.1.
The options are ``alora ui``'s (``app/cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
