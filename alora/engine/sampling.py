"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (dividing by them would overflow), as vLLM does
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings; the reply ends before the first one
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (benchmarks: fixed lengths)
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the k most likely tokens
    logits_processors: tuple[LogitsProcessor, ...] = ()  # (generated ids, logits [vocab]) -> logits

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    def generator(self) -> torch.Generator | None:
        if self.temperature < GREEDY_BELOW:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           generated: Sequence[int] = ()) -> tuple[int, tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Pick the next token from one row of float32 logits [vocab], after the request's logits processors.

    Returns the token and, when ``params.logprobs`` is set, its log-probability and the top alternatives under
    the distribution the token was drawn from (temperature, top-k and top-p applied; greedy: the model's).
    """
    for process in params.logits_processors:
        logits = process(generated, logits)
    if params.temperature < GREEDY_BELOW:
        token = int(torch.argmax(logits))
        return token, _logprobs(logits, token, params.logprobs)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[0] = False  # even a top_p that rounds to 0 keeps the top token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, _logprobs(logits, token, params.logprobs)


def _logprobs(logits: torch.Tensor, token: int, top: int | None):
    if top is None:
        return None
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    alternatives = tuple((i, max(v, -9999.0)) for i, v in zip(best.indices.tolist(), best.values.tolist())) if top else ()
    return float(logp[token]), alternatives  # -9999.0 stands for -inf, as OpenAI's API reports it
