"""``DiffusionLM``: the one forward every family shares (gpt-fast's habit: the family file
holds only its modules; this holds the loop over them).

A family subclass builds its modules under its checkpoint's tensor names, sets
``self.config`` and ``self.card`` (``family.FamilyCard``), and provides ``embed(ids)``,
``blocks`` (layers called as ``block(x, cos, sin, mask, prefix, kv_hook)``), ``final_norm``,
``head_weight``, ``rotary_dim`` and ``rope_theta``. The engine, the caches and the sampler
call ``run`` (and read ``card``), never a family's modules.

Beyond a plain forward, two hooks serve the caches without a second code path:
``prefix_kv`` (K/V of a shared prefix that every row's queries also attend to) and
``kv_hook`` (per layer, sees this call's K/V and returns the K/V the queries attend to: the
caller stores them in pages, or returns cached K/V with this call's written in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illada_batch.model.family import FamilyCard
from illada_batch.model.layers import traffic
from illada_batch.model.layers.attention import LayerKV, additive_mask
from illada_batch.model.layers.linear import TPGroup, embedding, head, vocab_parallel_logits
from illada_batch.model.layers.norms import RMSNorm
from illada_batch.model.layers.paged_attention import PagedKV
from illada_batch.model.layers.rope import rope_cos_sin

# (layer, k, v) with this call's k, v [B, Hkv, L, hd] (RoPE applied) -> the K/V the queries
# attend to [B, Hkv, T, hd], T the attention mask's key length; or the rows' pages
# (``PagedKV``, its own mask: then the call passes no attention_mask).
KVHook = Callable[[int, Tensor, Tensor], LayerKV | PagedKV]


@dataclass
class ForwardOut:
    logits: Tensor | None  # [B, L or K, vocab]; None when return_logits=False
    hidden: Tensor | None = None  # [B, L, d] before the final norm, when return_logits=False


class DiffusionLM(nn.Module):
    """``model(input_ids, attention_mask=None) -> logits [B, L, V]``."""

    config: object
    card: FamilyCard
    tokenizer = None  # set by load_model when the checkpoint has one
    tp: TPGroup | None = None  # this rank's place in a tensor-parallel replica (layers/linear.py), if sharded
    rotary_dim: int
    rope_theta: float

    # --- what a family provides -----------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def blocks(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def final_norm(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def head_weight(self) -> Tensor:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.run(input_ids, attention_mask=attention_mask).logits

    def run(self, input_ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None,
            prefix_kv: list[LayerKV] | None = None, logits_index: Tensor | None = None,
            return_logits: bool = True, kv_hook: KVHook | None = None) -> ForwardOut:
        """The one forward.

        input_ids [B, L]. attention_mask: [B, L] key padding (True/1 = real token) or a full
        [B, L, T] boolean mask (True = may attend; T = L, or the key length ``kv_hook``
        returns). positions [B, L]: RoPE positions, default ``arange(L)``. prefix_kv:
        per-layer K/V of a prefix every row also attends to (positions then continue after
        it). logits_index [B, K]: compute logits only at these positions.
        return_logits=False: the hidden states instead of logits. With the card's
        ``logit_shift`` 1, position i's logits come from hidden state i-1 (position 0's from 0).
        """
        B, L = input_ids.shape
        P = 0 if prefix_kv is None else prefix_kv[0][0].shape[0]
        if positions is None:
            positions = torch.arange(P, P + L, device=input_ids.device).expand(B, L)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.rope_theta)
        mask = additive_mask(attention_mask, B, L, self.dtype)
        x = self.embed(input_ids)  # [B, L, d]
        layers = 0
        for i, block in enumerate(self.blocks):
            hook = None if kv_hook is None else (lambda k, v, i=i: kv_hook(i, k, v))
            x = block(x, cos, sin, mask, None if prefix_kv is None else prefix_kv[i], hook)
            layers += 1
        counted = traffic.step()  # the step's forwards, layers and query tokens (model/layers/traffic.py)
        if counted is not None:
            counted.forwards, counted.layers, counted.query_tokens = counted.forwards + 1, layers, \
                counted.query_tokens + B * L
        if not return_logits:
            return ForwardOut(logits=None, hidden=x)
        if self.card.logit_shift:
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # [B, L, d]
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, d]
        if counted is not None:
            counted.logit_positions += x.shape[0] * x.shape[1]
        return ForwardOut(logits=self.logits(x))

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and output head: hidden [..., d] -> logits [..., vocab] (on every rank
        when sharded: each rank's vocabulary rows, gathered)."""
        if self.tp is not None:
            return vocab_parallel_logits(self.final_norm(hidden), self.head_weight, self.card.vocab_size, self.tp)
        return F.linear(self.final_norm(hidden), self.head_weight)


class StackedDecoder(DiffusionLM):
    """The Hugging Face layout LLaDA-MoE, LLaDA 2.x and Dream share: ``model.<EMBEDDING>``,
    ``model.layers``, ``model.norm`` and an ``lm_head`` unless the embeddings are tied (the
    module names are the checkpoint's tensor names). A family sets ``EMBEDDING`` and calls
    ``_stack(config, layers, tp)`` (with ``tp``: embedding and head vocabulary-parallel)."""

    EMBEDDING = "embed_tokens"

    def _stack(self, cfg, layers: Iterable[nn.Module], tp: TPGroup | None = None) -> None:
        self.model = nn.Module()
        setattr(self.model, self.EMBEDDING, embedding(cfg.vocab_size, cfg.hidden_size, tp))
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = head(cfg.hidden_size, cfg.vocab_size, tp)

    def embed(self, input_ids: Tensor) -> Tensor:
        return getattr(self.model, self.EMBEDDING)(input_ids)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.norm(hidden)

    @property
    def head_weight(self) -> Tensor:
        embedding = getattr(self.model, self.EMBEDDING)
        return embedding.weight if self.config.tie_word_embeddings else self.lm_head.weight
