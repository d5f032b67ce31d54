"""alora: a chat runtime for Activated-LoRA adapters that reuse the conversation's base-model KV cache."""

from alora.adapters import AdapterError, AdapterInfo
from alora.demo import demo_adapters, load_demo_adapters
from alora.conversation import Conversation, ConversationBusyError, Job
from alora.engine import CallStats, ContextOverflowError, Engine
from alora.models import UnsupportedModelError
from alora.safetensors_io import CheckpointError
from alora.sampling import SamplingParams

__all__ = [
    "Engine", "Conversation", "ConversationBusyError", "Job", "CallStats", "SamplingParams", "AdapterInfo",
    "demo_adapters", "load_demo_adapters", "AdapterError", "CheckpointError", "ContextOverflowError", "UnsupportedModelError",
]
__version__ = "0.1.0"
