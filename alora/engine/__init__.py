"""The engine: requests (``request``), the scheduler that batches them (``scheduler``), the model runner
(``runner``), all KV memory and the prefix cache (``kv_pool``), sampling and streaming detokenization."""

from alora.engine.engine import Engine, default_kv_cache_gb
from alora.engine.request import Call, CallStats, Event, TokenLogprob
from alora.engine.sampling import SamplingParams

__all__ = ["Engine", "Call", "CallStats", "Event", "TokenLogprob", "SamplingParams", "default_kv_cache_gb"]
