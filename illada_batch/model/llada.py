"""The LLaDA architecture, and nothing else (generation lives in ``decoding/loop.py``).

LLaDA-8B is a Llama-style transformer without a causal mask: RMSNorm in float32, RoPE
(non-interleaved halves, float32), SwiGLU ``ff_out(silu(ff_proj(x)) * up_proj(x))``, no
biases, an untied output head, grouped-query attention when ``n_kv_heads < n_heads``.
Module names reproduce LLaDA's tensor names (``model.transformer.blocks.0.q_proj.weight``)
so ``state_dict()`` is the checkpoint layout.

Beyond a plain forward, two hooks serve the caches without a second code path:
``prefix_kv`` (K/V of a shared prefix that every row's queries also attend to) and
``kv_hook`` (per layer, sees this call's K/V and returns the K/V the queries attend to: the
caller stores them in pages, or returns cached K/V with this call's written in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from illada_batch.model import traffic
from illada_batch.model.attention import cascade_attention
from illada_batch.model.config import LLaDAConfig
from illada_batch.model.paged_attention import PagedKV, paged_attention

# One layer's K/V of a shared prefix: ([P, n_kv_heads, head_dim], same) with RoPE applied.
LayerKV = tuple[Tensor, Tensor]
# (layer, k, v) with this call's k, v [B, Hkv, L, hd] (RoPE applied) -> the K/V the queries
# attend to [B, Hkv, T, hd], T the attention mask's key length; or the rows' pages
# (``PagedKV``, its own mask: then the call passes no attention_mask).
KVHook = Callable[[int, Tensor, Tensor], LayerKV | PagedKV]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin for integer ``positions`` [B, L] -> two [B, 1, L, head_dim] float32 tensors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, hd]; rotate the two halves in float32, return in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                prefix: LayerKV | None, kv_hook: Callable[[Tensor, Tensor], LayerKV] | None) -> Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(h).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(h).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv = (k, v) if kv_hook is None else kv_hook(k, v)  # [B, Hkv, T, hd] each, or the rows' pages
        if isinstance(kv, PagedKV):  # read in place through the page tables (the mask is in it)
            att = paged_attention(q, kv, prefix)  # [B, H, L, hd]
        else:
            att = self._attend(q, *kv, mask, prefix)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, L, cfg.n_heads * cfg.head_dim))
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prefix: LayerKV | None) -> Tensor:
        """q [B, H, L, hd] over k, v [B, Hkv, T, hd] (additive ``mask``) and a shared prefix."""
        cfg = self.cfg
        B, _, L, _ = q.shape
        if mask is not None and mask.dtype != q.dtype:  # under autocast
            mask = mask.to(q.dtype)
        rep = cfg.n_heads // cfg.n_kv_heads
        P = 0 if prefix is None else prefix[0].shape[0]
        _count_attention(B, L, k.shape[2], P)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, T, hd]
            traffic.copied("repeat", B * k.shape[2] * rep)
        if prefix is None:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, hd]
        else:  # a prefix shared by every row: attended once, merged by log-sum-exp
            pk, pv = (t.to(q.dtype).transpose(0, 1).repeat_interleave(rep, dim=0) for t in prefix)  # [H, P, hd]
            traffic.copied("repeat", P * rep)
            att = cascade_attention(q, pk, pv, k, v, mask)  # [B, H, L, hd]
        return att


def _count_attention(B: int, L: int, T: int, P: int) -> None:
    """One layer's attention of B x L queries over T own keys each and a P-token shared prefix."""
    s = traffic.step()
    if s is not None:
        s.attn_pairs += B * L * (T + P)
        s.kv_read += B * (T + P)


@dataclass
class ForwardOut:
    logits: Tensor | None  # [B, L or K, embedding_size]; None when return_logits=False
    hidden: Tensor | None = None  # [B, L, d] before the final norm, when return_logits=False


def isolated_prefix_mask(valid: Tensor, prefix_end: Tensor) -> Tensor:
    """[B, L, L] mask where each row's prefix (columns before ``prefix_end[b]``) attends only
    to itself and everything else attends to every real token (``valid`` [B, L])."""
    col = torch.arange(valid.shape[1], device=valid.device)
    in_prefix = col[None] < prefix_end[:, None]  # [B, L]
    # query i may see key j if j is real and (i is outside the prefix or j is inside it)
    return valid[:, None, :] & (~in_prefix[:, :, None] | in_prefix[:, None, :])


class LLaDA(nn.Module):
    """``model(input_ids, attention_mask=None) -> logits [B, L, V]``."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tokenizer = None  # set by load_model when the checkpoint has one
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
            blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        ))
        if not cfg.weight_tying:
            self.model.transformer.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

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
        return_logits=False: the hidden states instead of logits.
        """
        B, L = input_ids.shape
        P = 0 if prefix_kv is None else prefix_kv[0][0].shape[0]
        if positions is None:
            positions = torch.arange(P, P + L, device=input_ids.device).expand(B, L)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = self._attn_mask(attention_mask, B, L, self.dtype)
        t = self.model.transformer
        x = t.wte(input_ids)  # [B, L, d]
        for i, block in enumerate(t.blocks):
            hook = None if kv_hook is None else (lambda k, v, i=i: kv_hook(i, k, v))
            x = block(x, cos, sin, mask, None if prefix_kv is None else prefix_kv[i], hook)
        counted = traffic.step()
        if counted is not None:
            counted.forwards, counted.layers, counted.query_tokens = counted.forwards + 1, len(t.blocks), \
                counted.query_tokens + B * L
        if not return_logits:
            return ForwardOut(logits=None, hidden=x)
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, d]
        if counted is not None:
            counted.logit_positions += x.shape[0] * x.shape[1]
        return ForwardOut(logits=self.logits(x))

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and output head: hidden [..., d] -> logits [..., embedding_size]."""
        t = self.model.transformer
        head = t.wte.weight if self.config.weight_tying else t.ff_out.weight
        return F.linear(t.ln_f(hidden), head)

    @staticmethod
    def _attn_mask(attention_mask: Tensor | None, B: int, L: int, dtype: torch.dtype) -> Tensor | None:
        """-> additive [B, 1, L, T] (0 = attend, -inf = not) or None when everything may attend.
        A shared prefix is not in it: every query sees all of the prefix."""
        if attention_mask is None:
            return None
        m = attention_mask.bool()
        if m.dim() == 2:
            if bool(m.all()):
                return None
            m = m[:, None, :].expand(B, L, L)  # [B, L(q), L(k)]
        if m.shape[-1] == L:  # a query that may attend to nothing (a padding position) would give NaN: let it see itself
            m = m | torch.eye(L, dtype=torch.bool, device=m.device)[None]
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, -torch.inf)[:, None]
