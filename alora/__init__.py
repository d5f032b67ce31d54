"""alora: a chat runtime for Activated-LoRA adapters that reuse the conversation's base-model KV cache."""

from alora.adapters import AdapterError, AdapterInfo
from alora.conversation import Conversation
from alora.demo import demo_adapters, load_demo_adapters
from alora.engine import Call, CallStats, Engine, Event, SamplingParams, TokenLogprob
from alora.errors import (AdapterInUseError, AloraError, ContextOverflowError, ConversationBusyError,
                          InvalidSchemaError, QueueFullError, UnknownAdapterError)
from alora.intrinsics import Intrinsic, IntrinsicError
from alora.models import QuantizationError, UnsupportedModelError
from alora.safetensors_io import CheckpointError

__all__ = [
    "Engine", "Conversation", "Call", "CallStats", "Event", "TokenLogprob", "SamplingParams", "AdapterInfo",
    "demo_adapters", "load_demo_adapters", "AloraError", "UnknownAdapterError", "AdapterError", "AdapterInUseError",
    "CheckpointError", "ContextOverflowError", "ConversationBusyError", "QueueFullError", "UnsupportedModelError",
    "InvalidSchemaError", "Intrinsic", "IntrinsicError", "QuantizationError",
]
__version__ = "0.1.0"
