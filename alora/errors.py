"""The errors the package raises on purpose: all derive from ``AloraError``."""

from __future__ import annotations


class AloraError(Exception):
    """Base class of every error alora raises on purpose; ``except alora.AloraError`` catches them all."""


class UnknownAdapterError(AloraError, KeyError):
    """No adapter of that name is loaded (or shipped). Also a ``KeyError``, for ``dict``-style callers."""

    def __str__(self) -> str:
        """The plain message: ``KeyError`` alone would print it quoted, as the ``repr`` of a key."""
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ContextOverflowError(AloraError, ValueError):
    """A prompt does not fit in the model's context window or in the engine's KV budget."""


class QueueFullError(AloraError, RuntimeError):
    """The engine's waiting queue is full (``max_queue``); retry later."""


class ConversationBusyError(AloraError, RuntimeError):
    """A conversation serves one call at a time."""


class AdapterInUseError(AloraError, RuntimeError):
    """An adapter cannot be unloaded while a call that uses it is waiting or running."""


class EngineClosedError(AloraError, RuntimeError):
    """The engine has been shut down (``Engine.shutdown``, or the interpreter is exiting)."""


class InvalidSchemaError(AloraError, ValueError):
    """A structured-output JSON schema that is not valid JSON or that the grammar compiler rejects."""
