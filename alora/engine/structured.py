"""Structured outputs: decoding constrained to a JSON schema, per call, inside the batched step.

Grammars come from llguidance (Microsoft's guidance engine, also a vLLM structured-output backend): it runs on
CPU, compiles a JSON schema lazily (no per-schema warm-up, which matters when every request may bring its own
schema), and fills the token masks of a whole batch in one call on its own threads (~0.1 ms a row here).
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Sequence

import torch

from alora.errors import InvalidSchemaError


def schema_text(schema: dict | str | bool) -> str:
    """The canonical JSON text of a schema (a dict, a JSON string, or ``True`` for "any JSON object")."""
    if schema is True:
        schema = {"type": "object"}
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidSchemaError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise InvalidSchemaError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    return json.dumps(schema, sort_keys=True)


class StructuredOutputs:
    """JSON-schema grammars for one tokenizer: a matcher per call, masks for a batch of them."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_id)
        self._executor = llguidance.LLExecutor()
        self._lock = threading.Lock()
        self._grammar = lru_cache(maxsize=256)(self._compile)
        self._bits = torch.arange(32, dtype=torch.int32)

    def _compile(self, kind: str, text: str) -> str:
        ll = self._ll.LLMatcher
        if kind == "choice":  # one of the strings, verbatim (vLLM's guided_choice): a grammar of literals
            grammar = ll.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
        else:
            try:
                # compact JSON as json.dumps writes it (", " and ": "): what intrinsics are trained on; a
                # schema's own "x-guidance" options still apply
                grammar = ll.grammar_from_json_schema(text, defaults={"whitespace_flexible": False,
                                                                      "item_separator": ", ", "key_separator": ": "})
            except ValueError as e:
                raise InvalidSchemaError(f"the JSON schema could not be compiled: {e}") from e
        error = ll.validate_grammar(grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidSchemaError(f"the {'choice' if kind == 'choice' else 'JSON schema'} could not be "
                                     f"compiled: {error}")
        return grammar

    def matcher(self, json_schema: dict | str | bool | None = None, choice: Sequence[str] | None = None):
        """A fresh matcher for a JSON schema or for a choice among strings; raises ``InvalidSchemaError`` for
        one that does not compile."""
        if choice is not None:
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise InvalidSchemaError("a choice needs one or more non-empty strings")
            key = ("choice", json.dumps(list(choice)))
        else:
            key = ("json", schema_text(json_schema))
        with self._lock:
            grammar = self._grammar(*key)
        m = self._ll.LLMatcher(self._tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidSchemaError(f"the structured output could not be compiled: {m.get_error()}")
        return m

    def allowed(self, matchers: list) -> torch.Tensor:
        """Bool mask [len(matchers), vocab_size] of the tokens each matcher accepts next (EOS once complete)."""
        words = (self.vocab_size + 31) // 32
        packed = torch.empty((len(matchers), words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], packed.data_ptr(),
                                               words * 4, len(matchers))
        return ((packed.unsqueeze(-1) >> self._bits) & 1).view(len(matchers), -1)[:, :self.vocab_size].bool()
