"""The demo adapters shipped inside the package, trained on the default model (SmolLM2-135M-Instruct).

- ``hallucination`` and ``query_rewrite``: aLoRA intrinsics in IBM's layout (adapter + ``io.yaml``; call them with
  ``Conversation.run_intrinsic``), trained on data whose labels come from how it is built
  (``benchmarks/make_intrinsics_data.py``);
- ``title``, ``summary`` and ``followup``: aLoRAs made by context distillation from the base model itself
  (``benchmarks/make_distill_data.py``), invoked after the history with the cache reused; ``title_lora`` is a
  standard LoRA trained on the same data, for comparison (it recomputes the history).
"""

from __future__ import annotations

from pathlib import Path

from alora.errors import UnknownAdapterError

DEMO_DIR = Path(__file__).resolve().parent / "demo_adapters"


def demo_adapters() -> dict[str, Path]:
    """``{name: folder}`` of every shipped adapter (PEFT folders for the default model), sorted by name."""
    if not DEMO_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(DEMO_DIR.iterdir())
            if (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()}


def load_demo_adapters(engine, names: list[str] | None = None) -> dict:
    """Load the shipped adapters (all, or ``names``) into ``engine``; returns ``{name: AdapterInfo}``.

    They are trained for the default model: load them into ``Engine.from_pretrained()`` only. Those with an
    io.yaml are intrinsics too (``Conversation.run_intrinsic``).
    """
    folders = demo_adapters()
    unknown = sorted(set(names or []) - set(folders))
    if unknown:
        raise UnknownAdapterError(f"no demo adapter named {unknown} (shipped: {', '.join(folders)})")
    return {n: engine.load_adapter(n, p) for n, p in folders.items() if names is None or n in names}
