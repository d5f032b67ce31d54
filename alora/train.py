"""Train an aLoRA (or a standard LoRA) with transformers + PEFT on a JSONL of chat examples.

Two row forms, one per file:

- invocation form: ``{"messages": [{"role": ..., "content": ...}, ...], "invocation": "<|im_start|>title\\n",
  "target": "..."}``. The tokens are exactly what the engine sees on ``conv.invoke(name)``::

      chat_template(messages) + invocation_ids + target_ids + [eos]          (loss on target_ids + eos only)

- instruction form (IBM's intrinsics, called with an ``io.yaml``): ``{"messages": [...], "instruction":
  "<answerability> Can ...", "invocation": "<|im_start|>user\\n<answerability>", "target": "\\"answerable\\""}``.
  The instruction is appended as a user message, as granite-common's ``IntrinsicsRewriter`` and
  ``conv.run_intrinsic`` do::

      chat_template(messages + [user: instruction], add_generation_prompt=True) + target_ids + [eos]

  The invocation's token ids must occur in that prompt, at or after the start of the instruction's turn (its
  rendered start, e.g. ``<|im_start|>user\\n<tag>``); a LoRA twin needs no invocation. ``io_yaml`` copies the
  intrinsic's definition into the adapter folder.

An aLoRA gets ``LoraConfig(alora_invocation_tokens=invocation_ids)``: PEFT adapts tokens from the invocation on,
so the history keeps base weights and its KV cache is reused. With ``lora=True`` the same prompt trains a
standard LoRA (every token adapted); in the invocation form the invocation is written to ``alora_runtime.json``
so the engine appends it on ``invoke``. The output folder (adapter_config.json + adapter_model.safetensors)
loads in PEFT, vLLM and ``Engine.load_adapter``.

    alora train data.jsonl out/ --val heldout.jsonl --epochs 3 --rank 8 --lr 1e-3
    alora train answerability_train.jsonl out/answerability --io-yaml answerability_io.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from alora.errors import AloraError
from alora.intrinsics import IO_FILE, Intrinsic, IntrinsicError

ROLES = ("system", "user", "assistant")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAIN_LOG = "alora_train.json"  # written next to the adapter: arguments and metrics
DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class DataError(AloraError, ValueError):
    """A malformed training file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training row: the chat, the adapter's invocation (None: a LoRA twin in the instruction form), the
    target, and in the instruction form the instruction appended as the last user message."""
    messages: list[dict]
    invocation: str | None
    target: str
    instruction: str | None = None


@dataclass
class TrainResult:
    output_dir: Path
    kind: str  # "alora" or "lora"
    invocation_tokens: list[int]
    train_examples: int
    val_examples: int
    steps: int
    seconds: float
    train_loss: float  # mean over the last epoch's steps
    val_loss: float | None = None
    val_token_accuracy: float | None = None
    val_exact_match: float | None = None  # greedy decoding reproduces target+eos exactly (teacher-forced argmax)
    history: list[dict] = field(default_factory=list)


# ---- data -------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL file of examples; raise ``DataError('file:line: ...')`` on a bad row."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            messages = row.get("messages")
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{where}: 'messages' must be a non-empty list of chat messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise DataError(f"{where}: messages[{i}] must be {{'role': one of {', '.join(ROLES)}, "
                                    f"'content': str}}, got {m!r:.80}")
            instruction = row.get("instruction")
            if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
                raise DataError(f"{where}: 'instruction' must be a non-empty string when present")
            keys = ("target",) if instruction is not None and row.get("invocation") is None else ("invocation",
                                                                                                "target")
            for key in keys:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{where}: {key!r} must be a non-empty string")
            out.append(Example([{"role": m["role"], "content": m["content"]} for m in messages],
                               row.get("invocation"), row["target"], instruction))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The token ids of ``messages`` rendered by the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids(tokenizer, ex: Example) -> list[int]:
    """The prompt the target follows: the history and the invocation, or (instruction form) the chat with the
    instruction as the last user message, rendered with the generation prompt."""
    if ex.instruction is not None:
        return chat_ids(tokenizer, ex.messages + [{"role": "user", "content": ex.instruction}], True)
    return chat_ids(tokenizer, ex.messages) + tokenizer(ex.invocation, add_special_tokens=False)["input_ids"]


def encode(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; labels are -100 outside target + eos."""
    prompt = prompt_ids(tokenizer, ex)
    tgt = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + tgt, [-100] * len(prompt) + tgt


def check_activation(tokenizer, ex: Example, prompt: list[int], inv_ids: list[int], where: str) -> None:
    """Raise ``DataError`` unless the invocation's ids occur in ``prompt``, in the instruction form at or after
    the start of the instruction's turn (the history would otherwise be adapted and its cache not reused)."""
    from alora.adapters import last_occurrence

    at = last_occurrence(prompt, inv_ids)
    if at is None:
        raise DataError(f"{where}: invocation tokens {inv_ids} ({ex.invocation!r}) do not occur in the "
                        f"tokenized prompt")
    if ex.instruction is not None and at < len(chat_ids(tokenizer, ex.messages)):
        raise DataError(f"{where}: the invocation {ex.invocation!r} last occurs before the instruction's turn")


def write_io_yaml(src: str | Path, out_dir: Path, name: str) -> Path:
    """Copy ``src`` to ``out_dir/io.yaml`` with its ``model`` (the name clients call the intrinsic by) set to
    ``name``; the rest of the file is kept as written."""
    text = Path(src).read_text(encoding="utf-8")
    text, n = re.subn(r"^model:.*$", lambda _: f"model: {name}", text, count=1, flags=re.M)
    if n != 1:
        raise DataError(f"{src}: no top-level 'model:' line to name the intrinsic")
    out = out_dir / IO_FILE
    out.write_text(text, encoding="utf-8")
    return out


def _batches(items: list, size: int, rng: random.Random | None):
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        yield [items[j] for j in order[i:i + size]]


def _collate(batch, pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for r, (x, y) in enumerate(batch):  # right padding: positions stay 0..len-1, as in the engine
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, :len(y)] = torch.tensor(y)
        mask[r, :len(x)] = 1
    return ids, labels, mask


# ---- training ---------------------------------------------------------------------------------------

def train(data: str | Path | Sequence[Example], output_dir: str | Path, *, model: str | Path | None = None,
          val: str | Path | Sequence[Example] | None = None, val_fraction: float = 0.1, lora: bool = False,
          rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
          target_modules: Sequence[str] = DEFAULT_TARGETS, top_layers: int | None = None, epochs: int = 3,
          max_steps: int | None = None,
          lr: float = 1e-3, batch_size: int = 8, warmup: float = 0.1, max_length: int = 512, seed: int = 0,
          save_dtype: str = "float32", threads: int | None = None, io_yaml: str | Path | None = None,
          name: str | None = None, val_each_epoch: bool = True, progress: bool = True) -> TrainResult:
    """Train an aLoRA (``lora=False``) or a LoRA on ``data`` and save a PEFT folder to ``output_dir``.

    ``model``: an HF folder (default: the embedded SmolLM2-135M-Instruct). ``val``: a held-out file or
    examples; without it ``val_fraction`` of ``data`` is split off (0 = no validation). ``top_layers``: adapt only
    the last N decoder layers (backward stops there: faster on CPU, smaller file). All examples must
    share one invocation string and one row form. ``io_yaml``: an intrinsic's definition to validate and copy to
    ``output_dir/io.yaml``, its ``model`` set to ``name`` (default: the output folder's name); a placeholder-free
    instruction in it must equal the rows'. ``val_each_epoch=False`` validates after the last epoch only.
    An aLoRA trains one row at a time: the history before the invocation runs in base weights without
    gradients and only the adapted tokens are backpropagated (2-3x faster than PEFT's full forward, same loss).
    Returns the metrics (also written to
    ``output_dir/alora_train.json``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alora.adapters import last_occurrence
    from alora.default_model import default_model_dir

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    examples = list(read_jsonl(data)) if isinstance(data, (str, Path)) else list(data)
    val_examples = list(read_jsonl(val)) if isinstance(val, (str, Path)) else list(val or [])
    rng = random.Random(seed)
    if val is None and val_fraction > 0 and len(examples) > 1:
        order = list(range(len(examples)))
        rng.shuffle(order)
        n_val = max(1, int(round(len(examples) * val_fraction)))
        val_examples = [examples[i] for i in order[:n_val]]
        examples = [examples[i] for i in sorted(order[n_val:])]
    if not examples:
        raise DataError("no training examples")
    invocations = {e.invocation for e in examples + val_examples}
    if len(invocations) != 1:
        raise DataError(f"all examples must share one invocation, found {sorted(invocations, key=str)}")
    invocation = invocations.pop()
    forms = {e.instruction is not None for e in examples + val_examples}
    if len(forms) != 1:
        raise DataError("all examples must share one form: every row has an 'instruction' or none does")
    instruction_form = forms.pop()
    if invocation is None and not lora:
        raise DataError("an aLoRA needs an 'invocation' in every row (the rendered start of the instruction's "
                        "turn, e.g. '<|im_start|>user\\n<answerability>')")
    if io_yaml is not None:
        try:
            template = Intrinsic.from_file(io_yaml).instruction
        except IntrinsicError as e:
            raise DataError(str(e)) from None
        if isinstance(template, str) and "{" not in template and instruction_form:
            stray = next((e for e in examples + val_examples if e.instruction != template), None)
            if stray is not None:
                raise DataError(f"{io_yaml}: its instruction {template!r} differs from a row's "
                                f"{stray.instruction!r}")

    model_dir = Path(model) if model is not None else default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no eos token")
    inv_ids = tokenizer(invocation, add_special_tokens=False)["input_ids"] if invocation is not None else []
    if invocation is not None and not inv_ids:
        raise DataError(f"invocation {invocation!r} tokenizes to nothing")
    encoded_all = [encode(tokenizer, e) for e in examples]
    val_encoded = [encode(tokenizer, e) for e in val_examples]
    too_long = sum(len(x) > max_length for x, _ in encoded_all)
    encoded = [xy for xy in encoded_all if len(xy[0]) <= max_length]
    if too_long:
        print(f"skipped {too_long} training examples longer than max_length={max_length}")
    if not encoded:
        raise DataError(f"every training example is longer than max_length={max_length}")
    if not lora:
        for split, exs, enc in (("training", examples, encoded_all), ("validation", val_examples, val_encoded)):
            for i, (ex, (x, y)) in enumerate(zip(exs, enc)):
                n_prompt = len(y) - sum(t != -100 for t in y)
                check_activation(tokenizer, ex, x[:n_prompt], inv_ids, f"{split} example {i + 1}")

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = dict(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
               target_modules=list(target_modules), task_type="CAUSAL_LM", bias="none")
    if top_layers:
        n_layers = base.config.num_hidden_layers
        cfg["layers_to_transform"] = list(range(max(0, n_layers - top_layers), n_layers))
    if not lora:
        cfg["alora_invocation_tokens"] = list(inv_ids)
    peft_model = get_peft_model(base, LoraConfig(**cfg))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    n_warm = int(total * warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, n_warm) if s < n_warm else max(0.0, (total - s) / max(1, total - n_warm)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    history, step, epoch_losses = [], 0, []
    bar = tqdm(total=total, desc=f"train {'lora' if lora else 'alora'}", unit="step", disable=not progress)
    for epoch in range(epochs):
        if step >= total:
            break
        peft_model.train()
        epoch_losses = []
        for batch in _batches(encoded, batch_size, rng):
            if step >= total:
                break
            n_target = sum(sum(t != -100 for t in y[1:]) for _, y in batch)
            if lora:
                ids, labels, mask = _collate(batch, pad)
                logits, y = _target_logits(peft_model, ids, mask, labels)
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100,
                                                         reduction="sum") / n_target
                loss.backward()
            else:  # one row at a time: its history in base weights without gradients, then the adapted rest
                total_nll = 0.0
                for x, y in batch:
                    row_nll = alora_row_nll(peft_model, x, y, last_occurrence(x, inv_ids))
                    (row_nll / n_target).backward()
                    total_nll += row_nll.item()
                loss = torch.tensor(total_nll / n_target)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            epoch_losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        entry = {"epoch": epoch + 1, "step": step, "train_loss": sum(epoch_losses) / len(epoch_losses)}
        if val_encoded and (val_each_epoch or epoch == epochs - 1 or step >= total):
            entry.update(evaluate(peft_model, val_encoded, pad, batch_size))
            bar.write(f"epoch {epoch + 1}: train loss {entry['train_loss']:.3f}, val loss {entry['val_loss']:.3f}, "
                      f"val token acc {entry['val_token_accuracy']:.3f}, val exact match "
                      f"{entry['val_exact_match']:.3f}")
        history.append(entry)
    bar.close()

    out = Path(output_dir)
    save_adapter(peft_model, out, save_dtype, model_dir, invocation if lora and not instruction_form else None)
    stale = out / IO_FILE
    if io_yaml is not None:
        write_io_yaml(io_yaml, out, name or out.resolve().name)
    elif stale.exists():
        stale.unlink()
    last = history[-1] if history else {}
    result = TrainResult(out, "lora" if lora else "alora", list(inv_ids), len(encoded), len(val_encoded), step,
                         time.time() - t0, last.get("train_loss", float("nan")), last.get("val_loss"),
                         last.get("val_token_accuracy"), last.get("val_exact_match"), history)
    args = dict(model=str(model) if model else None, lora=lora, rank=rank, alpha=cfg["lora_alpha"],
                dropout=dropout, target_modules=list(target_modules), top_layers=top_layers, epochs=epochs,
                max_steps=max_steps, lr=lr,
                batch_size=batch_size, warmup=warmup, seed=seed, invocation=invocation,
                instruction_form=instruction_form, io_yaml=str(io_yaml) if io_yaml is not None else None)
    (out / TRAIN_LOG).write_text(json.dumps({"args": args, **{k: v for k, v in asdict(result).items()
                                                              if k != "output_dir"}}, indent=1) + "\n")
    return result


def _target_logits(peft_model, ids, mask, labels):
    """(logits, labels) at the positions that predict a target token in some row: the LM head runs only there
    (its 49k-wide output over every position would cost a fifth of the step)."""
    y = labels[:, 1:]
    keep = (y != -100).any(0).nonzero().flatten()
    logits = peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
    return logits, y[:, keep]


def alora_row_nll(peft_model, ids: list[int], labels: list[int], start: int | None):
    """Summed target NLL of one aLoRA example, computed as the engine runs it: the tokens before the
    invocation (``start``) in base weights with no gradient, as a KV cache; the invocation and the rest adapted
    on top of it. Equal to PEFT's full forward (its aLoRA keeps those tokens base too), at a fraction of the
    backward's cost."""
    import torch

    x = torch.tensor([ids])
    past = None
    if start:
        with torch.no_grad(), peft_model.disable_adapter():
            past = peft_model(input_ids=x[:, :start], use_cache=True, logits_to_keep=1).cache
    start = start or 0
    suffix = x[:, start:]
    y = torch.tensor([labels[start + 1:]])
    keep = (y[0] != -100).nonzero().flatten()
    logits = peft_model(input_ids=suffix, cache=past, use_cache=past is not None,
                        alora_offsets=[suffix.shape[1]], logits_to_keep=keep).logits.float()
    return torch.nn.functional.cross_entropy(logits[0], y[0, keep], reduction="sum")


def evaluate(peft_model, encoded, pad_id: int, batch_size: int = 8) -> dict:
    """Validation loss (per target token), token accuracy, and exact match: the teacher-forced argmax equals
    every target token and the eos, which is exactly when greedy decoding reproduces the target."""
    import torch

    peft_model.eval()
    nll, tokens, correct, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in _batches(encoded, batch_size, None):
            ids, labels, mask = _collate(batch, pad_id)
            logits, y = _target_logits(peft_model, ids, mask, labels)
            valid = y != -100
            nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100,
                                                     reduction="sum").item()
            hit = (logits.argmax(-1) == y) & valid
            tokens += int(valid.sum())
            correct += int(hit.sum())
            exact += int(((hit | ~valid).all(dim=1)).sum())
    peft_model.train()
    return {"val_loss": nll / max(1, tokens), "val_token_accuracy": correct / max(1, tokens),
            "val_exact_match": exact / max(1, len(encoded))}


def save_adapter(peft_model, out: Path, save_dtype: str, model_dir: Path, lora_invocation: str | None) -> None:
    """Save the PEFT folder (safetensors, weights in ``save_dtype``) plus the LoRA's runtime invocation."""
    import torch
    from safetensors.torch import load_file, save_file

    from alora.adapters import CONFIG_FILE, RUNTIME_FILE, WEIGHTS_FILE
    from alora.default_model import cache_root

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[save_dtype]
    if dtype != torch.float32:
        path = out / WEIGHTS_FILE
        state = {k: v.to(dtype).contiguous() for k, v in load_file(path).items()}
        save_file(state, path, metadata={"format": "pt"})
    (out / WEIGHTS_FILE).chmod(0o644)  # package data: readable by everyone
    cfg_path = out / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    try:  # the embedded default model: name its hub id, not this machine's cache path
        if Path(model_dir).resolve().is_relative_to(cache_root().resolve()):
            cfg["base_model_name_or_path"] = DEFAULT_HUB_NAME
    except OSError:
        pass
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    runtime = out / RUNTIME_FILE
    if lora_invocation is not None:
        runtime.write_text(json.dumps({"invocation": lora_invocation}) + "\n")
    elif runtime.exists():
        runtime.unlink()
    readme = out / "README.md"  # PEFT writes a model card template; the folder stays minimal
    if readme.exists():
        readme.unlink()


# ---- CLI --------------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an aLoRA (or --lora a LoRA) adapter with PEFT",
        description="Train an aLoRA (default) or a standard LoRA with transformers + PEFT on a JSONL of "
                    "{\"messages\", \"invocation\", \"target\"} rows (the target follows the history and the "
                    "invocation), or of {\"messages\", \"instruction\", \"invocation\", \"target\"} rows (an "
                    "intrinsic: the instruction is the last user message, the target is the assistant's reply, "
                    "the invocation must occur in the instruction's rendered turn); loss on the target tokens "
                    "only. Saves a PEFT folder that PEFT, vLLM and `alora chat --adapter` load; with --io-yaml "
                    "also the intrinsic's io.yaml.")
    p.add_argument("data", type=Path, help="training JSONL")
    p.add_argument("output", type=Path, help="adapter folder to write")
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--val", type=Path, help="held-out JSONL (default: split --val-fraction off the data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share when no --val (default 0.1)")
    p.add_argument("--lora", action="store_true", help="train a standard LoRA instead of an aLoRA")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, help="lora_alpha (default 2*rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated projections (default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--top-layers", type=int, help="adapt only the last N layers (default all)")
    p.add_argument("--epochs", type=int, default=3, help="default 3")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="default 8")
    p.add_argument("--max-length", type=int, default=512, help="skip longer examples (default 512 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the saved weights (float16 halves the file)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--io-yaml", type=Path,
                   help="an intrinsic's io.yaml (IBM's layout): checked against the rows and copied into the "
                        "adapter folder, so `run_intrinsic` and granite-common clients can call it")
    p.add_argument("--val-final-only", action="store_true", help="validate after the last epoch only")
    p.add_argument("--name", help="the name clients call the intrinsic by, written as io.yaml's model "
                                  "(default: the output folder's name)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import sys

    try:
        r = train(args.data, args.output, model=args.model, val=args.val, val_fraction=args.val_fraction,
                  lora=args.lora, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                  target_modules=[t for t in args.targets.split(",") if t], top_layers=args.top_layers,
                  epochs=args.epochs,
                  max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                  seed=args.seed, save_dtype=args.save_dtype, threads=args.threads, io_yaml=args.io_yaml,
                  name=args.name, val_each_epoch=not args.val_final_only)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    msg = f"saved {r.kind} to {r.output_dir}: {r.steps} steps in {r.seconds:.0f}s, train loss {r.train_loss:.3f}"
    if r.val_loss is not None:
        msg += (f"; val ({r.val_examples} examples) loss {r.val_loss:.3f}, exact match {r.val_exact_match:.3f}")
    print(msg)
    return 0
