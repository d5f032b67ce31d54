"""Loading PEFT adapter folders (aLoRA and LoRA) and stacking them into per-projection slot tensors.

Formats:
- PEFT (>= 0.18): ``adapter_config.json`` + ``adapter_model.safetensors``; an aLoRA has
  ``alora_invocation_tokens`` and adapts every token from the start of the last occurrence of that sequence.
- IBM's ``alora`` package: the config has ``invocation_string`` (tokenized here without special tokens) and
  its weights start one token later: the invocation's first token stays base.
- Anything else is a plain LoRA, adapting every token.

A loaded adapter owns a *slot*; every adapted projection holds ``A [S, R, in]`` and ``B [S, out, R]`` for
all slots (ranks zero-padded, LoRA scaling folded into B), so a forward can mix slots per token.
"""

from __future__ import annotations

import json
import math
import re
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from alora.errors import AloraError, UnknownAdapterError
from alora.models import PROJECTION_OF
from alora.models.llama import LlamaModel
from alora.models.layers import LoraStack
from alora.safetensors_io import CheckpointError, SafetensorsIndex, refuse_pickles

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RUNTIME_FILE = "alora_runtime.json"  # optional: {"invocation": "..."} for a LoRA trained with a prompt suffix
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp|shared_mlp)\.(\w+_proj|input_linear|output_linear)"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "input_linear", "output_linear")


_uids = itertools.count(1)


class AdapterError(AloraError, ValueError):
    """An adapter folder cannot be loaded; the message names the file and, where it applies, the tensor."""


@dataclass(frozen=True)
class AdapterInfo:
    """What ``Engine.adapters`` reports about one loaded adapter (also readable as ``info["kind"]``)."""

    name: str
    kind: str  # "alora" or "lora"
    rank: int  # the largest rank over its projections
    invocation_tokens: tuple[int, ...] | None  # aLoRA: the activation sequence; LoRA: an optional prompt suffix
    invocation_text: str | None
    path: Path
    format: str  # "peft" or "ibm"
    targets: tuple[str, ...]  # HF projection names it adapts, e.g. ("q_proj", "v_proj")
    uid: int = 0  # unique per load: a name loaded again with other weights gets a new uid (prefix-cache key)

    @property
    def activation_offset(self) -> int:
        """Tokens after the invocation start where adaptation begins (IBM's format starts one later)."""
        return 1 if self.format == "ibm" else 0

    def __getitem__(self, key: str):
        return getattr(self, key)


@dataclass
class ParsedAdapter:
    """An adapter folder read and checked against the model, not yet in a slot."""

    info: AdapterInfo
    # our module name (e.g. "layers.3.self_attn.qkv_proj") -> {part index: (A [r, in], B*scale [out_part, r])}
    weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


class AdapterRegistry:
    """The engine's adapters: names, slots, and the stacked tensors every projection reads."""

    def __init__(self, model: LlamaModel, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._slots: list[ParsedAdapter | None] = []  # a freed slot stays None, so live adapters keep their slot
        self._modules = model.projections()

    @property
    def infos(self) -> dict[str, AdapterInfo]:
        return {e.info.name: e.info for e in self._slots if e is not None}

    def get(self, name: str) -> AdapterInfo:
        return self._entry(name)[1].info

    def slot(self, name: str) -> int:
        return self._entry(name)[0]

    def _entry(self, name: str) -> tuple[int, ParsedAdapter]:
        for i, e in enumerate(self._slots):
            if e is not None and e.info.name == name:
                return i, e
        loaded = ", ".join(self.infos) or "none"
        raise UnknownAdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})")

    def load(self, name: str, path: Path) -> AdapterInfo:
        if not name or not isinstance(name, str):
            raise ValueError("an adapter needs a non-empty name")
        if name in self.infos:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        entry = self.read(name, Path(path))
        entry.info = replace(entry.info, uid=next(_uids))
        free = next((i for i, e in enumerate(self._slots) if e is None), len(self._slots))
        slots = list(self._slots)
        if free == len(slots):
            slots.append(None)
        slots[free] = entry
        stacks = self._stack(slots)  # built completely before anything changes
        self._slots = slots
        self._install(stacks)
        return entry.info

    def unload(self, name: str) -> None:
        i, _ = self._entry(name)
        slots = list(self._slots)
        slots[i] = None
        while slots and slots[-1] is None:
            slots.pop()
        stacks = self._stack(slots)
        self._slots = slots
        self._install(stacks)

    def slots_for(self, name: str, ids: Sequence[int]) -> list[int]:
        """Adapter slot of every token of ``ids`` when ``name`` runs on them (-1 = base), by its activation rule."""
        slot, entry = self._entry(name)
        info = entry.info
        if info.kind == "lora":
            return [slot] * len(ids)
        start = last_occurrence(ids, info.invocation_tokens)
        if start is None:
            return [-1] * len(ids)
        begin = min(start + info.activation_offset, len(ids))
        return [-1] * begin + [slot] * (len(ids) - begin)

    # ---- reading a folder ---------------------------------------------------------------------------

    def read(self, name: str, folder: Path) -> ParsedAdapter:
        """Read and validate the adapter folder ``folder`` for this model without loading it: its info and
        per-projection weights, with the config's rank/alpha patterns and scaling applied."""
        if not folder.is_dir():
            raise AdapterError(f"adapter folder not found: {folder}")
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.is_file():
            raise AdapterError(f"{folder}: no {CONFIG_FILE}; not a PEFT adapter folder")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from e
        weights_path = folder / WEIGHTS_FILE
        try:
            if not weights_path.is_file():
                refuse_pickles(folder, "the adapter folder")
                raise AdapterError(f"{folder}: no {WEIGHTS_FILE}")
            self._check_config(cfg, cfg_path)
            fmt, kind, invocation, text = self._activation(cfg, folder)
            index = SafetensorsIndex([weights_path])
        except CheckpointError as e:
            raise AdapterError(str(e)) from e
        weights, ranks = self._read_weights(cfg, index, weights_path)
        info = AdapterInfo(name, kind, max(ranks.values()), invocation, text, folder, fmt,
                           tuple(sorted({proj for proj, _ in ranks})))
        return ParsedAdapter(info, weights)

    def _check_config(self, cfg: dict, path: Path) -> None:
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type not in ("LORA", "ALORA"):
            raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported (LoRA and aLoRA only)")
        if cfg.get("use_dora"):
            raise AdapterError(f"{path}: DoRA adapters (use_dora=true) are not supported")
        if cfg.get("bias", "none") != "none":
            raise AdapterError(f"{path}: trained biases (bias={cfg['bias']!r}) are not supported")
        if cfg.get("modules_to_save"):
            raise AdapterError(f"{path}: modules_to_save {cfg['modules_to_save']} (fully trained modules) "
                               "are not supported")
        if cfg.get("trainable_token_indices"):
            raise AdapterError(f"{path}: trainable token embeddings are not supported")
        targets = cfg.get("target_modules")
        if isinstance(targets, (list, tuple)):
            unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in PROJECTION_OF]
            if unknown:
                raise AdapterError(f"{path}: target_modules {unknown} are not supported "
                                   f"(supported: {', '.join(PROJECTION_OF)})")

    def _activation(self, cfg: dict, folder: Path) -> tuple[str, str, tuple[int, ...] | None, str | None]:
        """(format, kind, invocation token ids, invocation text) of a config."""
        decode = self.tokenizer.decode
        tokens = cfg.get("alora_invocation_tokens")
        if tokens:
            if not all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in tokens):
                raise AdapterError(f"{folder / CONFIG_FILE}: alora_invocation_tokens must be token ids of "
                                   f"this model's vocabulary (size {self.model.config.vocab_size})")
            return "peft", "alora", tuple(tokens), decode(tokens)
        text = cfg.get("invocation_string")
        if text:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise AdapterError(f"{folder / CONFIG_FILE}: invocation_string tokenizes to nothing")
            return "ibm", "alora", ids, text
        runtime = folder / RUNTIME_FILE
        if runtime.is_file():
            prompt = json.loads(runtime.read_text()).get("invocation")
            if prompt:
                return "peft", "lora", tuple(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]), prompt
        return "peft", "lora", None, None

    def _read_weights(self, cfg: dict, index: SafetensorsIndex, path: Path):
        """Validate every tensor against the model; return stacked-ready weights and ranks per projection."""
        mcfg = self.model.config
        r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key in index.keys():
            m = _KEY.match(key)
            if m is None or m.group(2) not in PROJECTION_OF:
                raise AdapterError(f"{path}: tensor {key!r} is not a LoRA weight of a supported projection "
                                   f"({', '.join(PROJECTION_OF)}); embeddings, lm_head, biases and DoRA "
                                   "magnitudes are not supported")
            layer = int(m.group(1))
            if layer >= mcfg.num_layers:
                raise AdapterError(f"{path}: tensor {key!r} is for layer {layer}, the model has {mcfg.num_layers}")
            pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = index.get(key)
        if not pairs:
            raise AdapterError(f"{path}: holds no LoRA weights")
        weights: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        ranks: dict[tuple[str, int], int] = {}
        for (layer, proj), ab in sorted(pairs.items()):
            where = f"layers.{layer}.{'mlp' if proj in _MLP_PROJECTIONS else 'self_attn'}"
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{path}: {where}.{proj} has lora_{''.join(ab)} without its pair")
            module_name, part = PROJECTION_OF[proj]
            module = self._modules[f"{where}.{module_name}"]
            if part >= len(module.parts) or (proj in ("input_linear", "output_linear")) != self.model.config.fused_gate_up \
                    and module_name == "gate_up_proj":
                raise AdapterError(f"{path}: {where}.{proj}: this model has no such projection "
                                   "(an adapter of another architecture?)")
            in_f, out_f = module.in_features, module.parts[part]
            A, B = ab["A"], ab["B"]
            r = A.shape[0] if A.dim() == 2 else -1
            if A.dim() != 2 or A.shape[1] != in_f or B.dim() != 2 or tuple(B.shape) != (out_f, r):
                raise AdapterError(
                    f"{path}: {where}.{proj}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit this "
                    f"model (expected lora_A (r, {in_f}) and lora_B ({out_f}, r)); was it trained on another base model?")
            module_key = f"model.{where}.{proj}"
            r_cfg = rank_pattern[_pattern_key(rank_pattern, module_key)] if _pattern_key(rank_pattern, module_key) else r_default
            if r_cfg != r:
                raise AdapterError(f"{path}: {where}.{proj} has rank {r} but the config says {r_cfg}")
            ak = _pattern_key(alpha_pattern, module_key)
            alpha = alpha_pattern[ak] if ak else alpha_default
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            weights.setdefault(f"{where}.{module_name}", {})[part] = (A.float(), B.float() * scale)
            ranks[(proj, layer)] = r
        return weights, ranks

    # ---- stacking -----------------------------------------------------------------------------------

    def _stack(self, slots: list[ParsedAdapter | None]) -> dict[str, LoraStack | None]:
        """Per-projection stacks over ``slots``: parts of a fused projection get a block-diagonal B."""
        stacks: dict[str, LoraStack | None] = {}
        for mod_name, module in self._modules.items():
            per_slot = [e.weights.get(mod_name, {}) if e is not None else {} for e in slots]
            if not any(per_slot):
                stacks[mod_name] = None
                continue
            offsets = [sum(module.parts[:i]) for i in range(len(module.parts))]
            R = max(sum(A.shape[0] for A, _ in parts.values()) for parts in per_slot)
            S = len(slots)
            A_all = torch.zeros(S, R, module.in_features)
            B_all = torch.zeros(S, module.out_features, R)
            for s, parts in enumerate(per_slot):
                r0 = 0
                for part, (A, B) in sorted(parts.items()):
                    r = A.shape[0]
                    A_all[s, r0:r0 + r] = A
                    B_all[s, offsets[part]:offsets[part] + module.parts[part], r0:r0 + r] = B
                    r0 += r
            w = self.model.embed_tokens.weight  # the model's dtype: a quantized projection holds int8
            stacks[mod_name] = LoraStack(A_all.to(w.device, w.dtype).contiguous(),
                                         B_all.to(w.device, w.dtype).contiguous())
        return stacks

    def _install(self, stacks: dict[str, LoraStack | None]) -> None:
        for name, stack in stacks.items():
            self._modules[name].lora = stack


def _pattern_key(patterns: dict, module_key: str) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern: a key matches a module name's dotted suffix (regex allowed)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return key
    return None


def last_occurrence(ids: Sequence[int], pattern: Sequence[int] | None) -> int | None:
    """Start index of the last occurrence of ``pattern`` in ``ids``, or None."""
    if not pattern:
        return None
    n, m = len(ids), len(pattern)
    first = pattern[0]
    for i in range(n - m, -1, -1):
        if ids[i] == first and list(ids[i:i + m]) == list(pattern):
            return i
    return None
