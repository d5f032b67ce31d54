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
    json_schema: dict | str | bool | None = None  # structured output: the reply follows it (True: any JSON object)
    choice: tuple[str, ...] | None = None  # structured output: the reply is one of these strings, verbatim

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
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.choice is not None and self.json_schema is not None:
            raise ValueError("give json_schema or choice, not both")
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
           generated: Sequence[int] = (), allowed: torch.Tensor | None = None
           ) -> tuple[int, tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Pick the next token from one row of float32 logits [vocab], after the request's logits processors,
    among the ``allowed`` tokens (bool [vocab], a structured output's grammar) when given.

    Returns the token and, when ``params.logprobs`` is set, its log-probability and the top alternatives under
    the distribution the token was drawn from (temperature, top-k and top-p applied; greedy: the model's),
    before the grammar's mask, as vLLM reports them: an intrinsic's likelihoods are the model's beliefs.
    """
    for process in params.logits_processors:
        logits = process(generated, logits)
    masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    if params.temperature < GREEDY_BELOW:
        token = int(torch.argmax(masked))
        return token, _logprobs(logits, token, params.logprobs)
    token = int(torch.multinomial(torch.softmax(_shape(masked, params), dim=-1), 1, generator=generator))
    shaped = None if params.logprobs is None else _shape(logits, params)
    return token, _logprobs(shaped, token, params.logprobs)


def _shape(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The logits the sampler draws from: temperature, then top-k and top-p."""
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
    return logits


def _logprobs(logits: torch.Tensor, token: int, top: int | None):
    if top is None:
        return None
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    alternatives = tuple((i, max(v, -9999.0)) for i, v in zip(best.indices.tolist(), best.values.tolist())) if top else ()
    return max(float(logp[token]), -9999.0), alternatives  # -9999.0 stands for -inf, as OpenAI's API reports it
