"""What goes into an engine and what comes out: the request/result types every engine (the
diffusion ``Engine``, ``VLLMEngine``) shares, a sample's seed, and the check a request must
pass before it runs."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from illada_batch.decoding.params import SamplingParams
from illada_batch.decoding.template import TokenTemplate


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    sample_index: int = 0
    seed: int = 0
    template: TokenTemplate | None = None  # a response template (fixed text and slots); None: all masked


@dataclass
class Result:
    request_id: str
    sample_index: int
    text: str | None
    token_ids: list[int]  # the response up to (not including) the first EOS
    steps: int  # forward passes this sample cost
    finish_reason: str  # "eos" | "length" | "error"
    error: str | None = None
    seed: int = 0
    slots: list[str] | None = None  # with a response template: each slot's text (``text`` is the whole response)


@dataclass
class Counters:
    forward_passes: int = 0
    samples: int = 0  # samples generated (errors excluded)
    tokens: int = 0  # generated text tokens (before the first EOS)
    prefix_pages_hit: int = 0
    prefix_pages_missed: int = 0
    prefix_pages_read: int = 0  # full prefix pages read by rows (rows x pages): hit rate = 1 - missed / read
    prefix_fallbacks: int = 0  # groups whose prefix did not fit the pages (cache off, or a block cache's prefix per group)
    query_tokens: int = 0  # query positions the model ran, padding included (work per generated token)
    row_waits: int = 0  # times a row waited for a finishing row's pages (block cache)
    pages_in_use_peak: int = 0  # most KV pages held at once (rows and prefixes) since a reader last reset it
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # wall time per phase

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["seconds"] = dict(self.seconds)
        return d


def sample_seed(seed: int, request_id: str, sample_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{request_id}\x00{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def request_problem(r: Request, max_len: int, mask_id: int | None = None) -> str | None:
    """Why a request cannot run on a model of context ``max_len`` (its result's error), or None.
    ``mask_id``: a response template's fixed text must not hold it (the loop would fill it)."""
    total = len(r.prefix_ids) + len(r.prompt_ids) + r.params.gen_length
    if total > max_len:
        return (f"too long: prefix {len(r.prefix_ids)} + prompt {len(r.prompt_ids)} + gen_length "
                f"{r.params.gen_length} = {total} tokens > the model's {max_len}")
    if not r.prompt_ids and not r.prefix_ids:
        return "empty prompt"
    if r.template is not None and r.template.length > r.params.gen_length:
        return (f"response template: {r.template.length} tokens ({sum(map(len, r.template.fixed))} fixed + "
                f"{sum(r.template.slots)} in slots) > gen_length {r.params.gen_length}")
    if r.template is not None and mask_id is not None and any(mask_id in f for f in r.template.fixed):
        return "response template: its fixed text holds the mask token (special token text in a value?)"
    return None
