"""Intrinsics as IBM publishes them: an adapter folder plus an ``io.yaml`` that says how to call it and how to
read its output.

io.yaml fields (those of IBM's granite-common, which validates the same top level):

- ``model``: the name clients put in a chat completion's ``model`` (default name of the intrinsic);
- ``response_format``: a JSON schema (as JSON text) the output is decoded under;
- ``transformations``: rules applied to the parsed output, here ``likelihood`` (a categorical value becomes
  the expected value of ``categories_to_values`` under the model's top logprobs at its first token), ``nest``
  (wrap the value in ``{field_name: value}``) and ``project`` (keep / rename a record's fields);
- ``instruction``: a user message appended to the conversation (``str.format`` placeholders filled from the
  call's fields, ``{last_message}`` from the conversation);
- ``parameters``: chat-completion parameters, e.g. ``max_completion_tokens``, ``temperature``;
- ``sentence_boundaries``, ``docs_as_message``, ``logprobs_workaround``: accepted only when empty (alora does not
  implement the document and citation preprocessing they ask for).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alora.errors import AloraError

IO_FILE = "io.yaml"
TOP_LOGPROBS = 10  # alternatives requested per token when a rule reads logprobs (as granite-common does)
_REQUIRED = ("model", "response_format", "transformations")
_OPTIONAL = ("instruction", "parameters", "sentence_boundaries", "docs_as_message", "logprobs_workaround")
_UNSUPPORTED_WHEN_SET = ("sentence_boundaries", "docs_as_message", "logprobs_workaround")
_RULES = ("likelihood", "nest", "project")


class IntrinsicError(AloraError, ValueError):
    """A malformed io.yaml (the message names the file), or an output its rules cannot read."""


@dataclass
class Intrinsic:
    """One intrinsic's io.yaml, parsed and checked. ``process`` turns an output and its logprobs into the
    result; ``Conversation.run_intrinsic`` does the whole call."""

    name: str
    path: Path
    response_format: dict | None
    transformations: list[dict]
    instruction: str | None = None
    parameters: dict = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, name: str | None = None) -> "Intrinsic":
        """Read ``folder/io.yaml``; ``name`` overrides its ``model`` field."""
        path = Path(folder) / IO_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no io.yaml: an intrinsic folder holds the adapter and its io.yaml")
        return cls.from_file(path, name)

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> "Intrinsic":
        """Read and check an io.yaml at ``path`` (its folder is the intrinsic's); ``name`` overrides ``model``."""
        import yaml

        path = Path(path)
        folder = path.parent
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise IntrinsicError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise IntrinsicError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
        missing = [f for f in _REQUIRED if f not in raw]
        unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
        if missing or unknown:
            raise IntrinsicError(f"{path}: " + "; ".join(
                ([f"missing required field(s) {missing}"] if missing else [])
                + ([f"unknown field(s) {unknown} (known: {sorted(_REQUIRED + _OPTIONAL)})"] if unknown else [])))
        for f in _UNSUPPORTED_WHEN_SET:
            if raw.get(f):
                raise IntrinsicError(f"{path}: '{f}' is not supported by alora (document and citation "
                                     "preprocessing); leave it empty (~)")
        fmt = raw["response_format"]
        if isinstance(fmt, str):
            try:
                fmt = json.loads(fmt)
            except json.JSONDecodeError as e:
                raise IntrinsicError(f"{path}: response_format is not valid JSON: {e}") from e
        if fmt is not None and not isinstance(fmt, dict):
            raise IntrinsicError(f"{path}: response_format must be a JSON schema object")
        rules = raw["transformations"] or []
        for rule in rules:
            if not isinstance(rule, dict) or rule.get("type") not in _RULES or "input_path" not in rule:
                raise IntrinsicError(f"{path}: transformation {rule!r} is not supported: each needs a 'type' "
                                     f"in {list(_RULES)} and an 'input_path'")
            if rule["type"] == "likelihood" and not isinstance(rule.get("categories_to_values"), dict):
                raise IntrinsicError(f"{path}: a likelihood rule needs 'categories_to_values' (a mapping)")
            if rule["type"] == "nest" and not isinstance(rule.get("field_name"), str):
                raise IntrinsicError(f"{path}: a nest rule needs 'field_name' (a string)")
            if rule["type"] == "project" and not isinstance(rule.get("retained_fields"), (list, dict)):
                raise IntrinsicError(f"{path}: a project rule needs 'retained_fields' (a list or a mapping)")
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise IntrinsicError(f"{path}: parameters must be a mapping of chat-completion parameters")
        instruction = raw.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise IntrinsicError(f"{path}: instruction must be a string")
        return cls(name or raw["model"] or _layout_name(Path(folder)), Path(folder), fmt, rules, instruction,
                   dict(params))

    @property
    def needs_logprobs(self) -> bool:
        return any(r["type"] == "likelihood" for r in self.transformations)

    @property
    def max_new_tokens(self) -> int:
        return int(self.parameters.get("max_completion_tokens") or self.parameters.get("max_tokens") or 256)

    def instruction_text(self, last_message: str | None, fields: dict[str, Any]) -> str | None:
        """The instruction with its placeholders filled (``IntrinsicError`` names a missing one)."""
        if self.instruction is None:
            return None
        values = dict(fields)
        if last_message is not None:
            values.setdefault("last_message", last_message)
        try:
            return self.instruction.format(**values)
        except (KeyError, IndexError) as e:
            raise IntrinsicError(f"intrinsic {self.name!r}: its instruction needs the field {e} "
                                 f"(run_intrinsic({self.name!r}, {e.args[0] if e.args else 'field'}=...))") from e

    def result(self, call, token_text) -> Any:
        """The result of a finished intrinsic call (``Conversation.start_intrinsic``); ``token_text`` maps a
        token id to its text (``Engine.token_text``). A failed call raises its error."""
        call.wait()
        if call.error is not None:
            raise call.error
        lps = call.logprobs
        tokens = [(token_text(lp.token_id), lp.logprob, [(token_text(t), v) for t, v in lp.top]) for lp in lps] \
            if lps else None
        return self.process(call.text, tokens)

    def process(self, text: str, tokens: Sequence[tuple[str, float, Sequence[tuple[str, float]]]] | None) -> Any:
        """The result: ``text`` parsed as JSON with the transformations applied. ``tokens`` holds, per output
        token, its text, logprob and top alternatives (text, logprob), as a chat completion's logprobs do."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise IntrinsicError(f"intrinsic {self.name!r}: its output is not JSON ({e}): {text[:200]!r}") from e
        starts = _literal_starts(text)
        for rule in self.transformations:
            for p in _matching_paths(value, rule["input_path"]):
                value = _replace(value, p, self._apply(rule, _fetch(value, p), p, text, starts, tokens))
        return value

    def _apply(self, rule: dict, value: Any, path: tuple, text: str, starts: dict, tokens) -> Any:
        kind = rule["type"]
        if kind == "nest":
            return {rule["field_name"]: value}
        if kind == "project":
            keep = rule["retained_fields"]
            keep = keep if isinstance(keep, dict) else {k: k for k in keep}
            records = value if isinstance(value, list) else [value]
            out = [{keep[k]: r.get(k) for k in keep} for r in records]
            return out if isinstance(value, list) else out[0]
        return _likelihood(rule["categories_to_values"], value, starts.get(path), text, tokens, self.name)


def _layout_name(folder: Path) -> str:
    """The intrinsic's name from IBM's layouts, ``{intrinsic}/{base}/{alora|lora}`` and the older
    ``{intrinsic}/{alora|lora}/{base}``; else the folder's own name."""
    folder = folder.resolve()
    for kind_dir in (folder, folder.parent):
        if kind_dir.name in ("alora", "lora") and len(folder.parents) >= 2:
            return (folder.parent.parent if kind_dir == folder else kind_dir.parent).name
    return folder.name


def _likelihood(categories: dict, value: Any, start: int | None, text: str, tokens, name: str) -> float:
    """The expected value of ``categories`` under the logprobs of the token where ``value`` starts: the sampled
    token counts for its own category, each top alternative for the first category it is a prefix of."""
    if tokens is None:
        raise IntrinsicError(f"intrinsic {name!r}: a likelihood rule needs the output's logprobs")
    if start is None:
        raise IntrinsicError(f"intrinsic {name!r}: cannot locate {value!r} in the output {text[:200]!r}")
    if isinstance(value, str):
        start += 1  # past the opening quote
    offsets, at = {}, 0
    for i, (tok, _, _) in enumerate(tokens):
        offsets[at] = i
        at += len(tok)
    if start not in offsets:  # the value began inside a token: only that token's own category is known
        before = max((o for o in offsets if o < start), default=None)
        if before is not None and tokens[offsets[before]][0].endswith(json.dumps(value)):
            return float(categories[value])
        raise IntrinsicError(f"intrinsic {name!r}: {value!r} does not start on a token boundary of the output")
    i = offsets[start]
    tok, logprob, top = tokens[i]
    values, weights = [], []
    if value in categories:
        values.append(categories[value])
        weights.append(math.exp(logprob))
    for alt, alt_logprob in top:
        if alt == tok:
            continue  # the sampled token, already counted
        match = next((v for c, v in categories.items() if str(c).startswith(alt)), None)
        if match is not None:
            values.append(match)
            weights.append(math.exp(alt_logprob))
    total = sum(weights)
    return sum(w * v for w, v in zip(weights, values)) / total if total > 0 else 0.0


def _matching_paths(value: Any, pattern: Sequence) -> list[tuple]:
    """Paths of ``value`` matching ``pattern`` (strings: object keys, ints: list indices, None: any)."""
    if not pattern:
        return [()]
    head, rest = pattern[0], pattern[1:]
    if isinstance(value, dict):
        keys = list(value) if head is None else [head] if head in value else []
    elif isinstance(value, list):
        keys = list(range(len(value))) if head is None else [head] if isinstance(head, int) and head < len(value) else []
    else:
        keys = []
    return [(k, *p) for k in keys for p in _matching_paths(value[k], rest)]


def _fetch(value: Any, path: tuple) -> Any:
    for k in path:
        value = value[k]
    return value


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


def _literal_starts(text: str) -> dict[tuple, int]:
    """Character offset where each scalar of the JSON ``text`` starts, by its path."""
    out: dict[tuple, int] = {}
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\n\r":
            i += 1
        return i

    def walk(i: int, path: tuple) -> int:
        i = skip(i)
        if text[i] == "{":
            i = skip(i + 1)
            if text[i] == "}":
                return i + 1
            while True:
                key, i = decoder.raw_decode(text, skip(i))
                i = walk(skip(i) + 1, (*path, key))  # past the colon
                i = skip(i)
                if text[i] == "}":
                    return i + 1
                i += 1  # the comma
        if text[i] == "[":
            i, n = skip(i + 1), 0
            if text[i] == "]":
                return i + 1
            while True:
                i = skip(walk(i, (*path, n)))
                n += 1
                if text[i] == "]":
                    return i + 1
                i += 1
        out[path] = i
        _, end = decoder.raw_decode(text, i)
        return end

    walk(0, ())
    return out
