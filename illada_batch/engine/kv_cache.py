"""K/V tensors of the paged prefix cache, written and read through page tables.

Storage: ``k``/``v`` shaped [n_layers, num_pages, page_size, n_kv_heads, head_dim]. Which
page holds which tokens is decided by ``pages.PagePool`` (pure Python); this file only
moves tensors. K is stored after RoPE, so a page's contents depend on its absolute
positions, which the chained page hash already pins (a page is only reused at the same
place in the same token sequence).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from illada_batch.engine.pages import PageId
from illada_batch.model.family import FamilyCard
from illada_batch.model.layers import traffic
from illada_batch.model.layers.attention import LayerKV


def bytes_per_page(card: FamilyCard, page_size: int, dtype: torch.dtype) -> int:
    """K and V of ``page_size`` tokens over every layer (the card's KV bytes per token)."""
    return page_size * card.kv_bytes_per_token(torch.finfo(dtype).bits // 8)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pages_for_budget(card: FamilyCard, budget: int | float, page_size: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """Pages that fit ``budget``: bytes when an int, a fraction of free device memory when a float."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"kv_budget={budget}: a float budget is a fraction of free memory in (0, 1]")
        budget = int(budget * free_memory_bytes(device))
    return max(0, int(budget) // bytes_per_page(card, page_size, dtype))


class KVCache:
    def __init__(self, card: FamilyCard, num_pages: int, page_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (card.n_layers, num_pages, page_size, card.n_kv_heads, card.head_dim)
        self.page_size = page_size
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [layers, pages, page_size, Hkv, hd]
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def slots(self, pages: Sequence[PageId], start: int, stop: int) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of token positions [start, stop)."""
        pos = torch.arange(start, stop)
        table = torch.tensor(pages, dtype=torch.long)
        return (table[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.k.device)

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as [layers, pages * page_size, Hkv, hd] views."""
        return (self.k.view(self.k.shape[0], -1, *self.k.shape[3:]), self.v.view(self.v.shape[0], -1, *self.v.shape[3:]))

    def write(self, pages: Sequence[PageId], start: int, kv: list[LayerKV]) -> None:
        """Store per-layer K/V ([T, Hkv, hd] each) of token positions [start, start + T)."""
        slots = self.slots(pages, start, start + kv[0][0].shape[0])
        for layer, (k, v) in enumerate(kv):
            self.write_slots(layer, slots, k, v)

    def write_slots(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's K/V ([N, Hkv, hd] each) at flat ``slots`` [N]."""
        k_flat, v_flat = self._flat()
        k_flat[layer, slots] = k.to(self.k.dtype)
        v_flat[layer, slots] = v.to(self.v.dtype)
        counted = traffic.step()
        if counted is not None:
            counted.kv_written += len(slots)

    def read(self, pages: Sequence[PageId], num_tokens: int) -> list[LayerKV]:
        """Per-layer K/V ([num_tokens, Hkv, hd] each) of the first ``num_tokens`` positions."""
        slots = self.slots(pages, 0, num_tokens)
        k_flat, v_flat = self._flat()
        traffic.copied("gather", num_tokens * self.k.shape[0])
        return [(k_flat[layer, slots], v_flat[layer, slots]) for layer in range(self.k.shape[0])]

    def gather(self, layer: int, tables: torch.Tensor) -> LayerKV:
        """One layer's K/V of whole pages, row by row: tables [B, n] page ids -> ([B, n *
        page_size, Hkv, hd], same), in each row's token order."""
        B, n = tables.shape
        k = self.k[layer][tables]  # [B, n, page_size, Hkv, hd]
        v = self.v[layer][tables]
        traffic.copied("gather", B * n * self.page_size)
        return k.view(B, n * self.page_size, *k.shape[3:]), v.view(B, n * self.page_size, *v.shape[3:])
