"""The PyTorch reference attention over the paged KV cache.

Readable rather than fast: it gathers each sequence's keys and values through its block
table and runs ordinary causal attention. It is the CPU path of the lab and the reference
the Triton kernels are checked against.
"""
from __future__ import annotations

import torch

from labengine.attention import AttentionBackend, AttentionMetadata


def store_kv(key, value, k_cache, v_cache, slot_mapping):
    """Write key/value [T, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_slots(block_tables, seq_lens_list, block_size, device):
    """Slot index of every cached token, padded: [num_seqs, max_seq_len] int64 and a validity mask."""
    max_len = max(seq_lens_list)
    pos = torch.arange(max_len, device=device)
    blocks = block_tables[:, (pos // block_size)].long()  # [B, max_len]
    slots = blocks * block_size + (pos % block_size)
    valid = pos[None, :] < torch.tensor(seq_lens_list, device=device)[:, None]
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def paged_attention_ref(query, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """Causal attention of query [T, Hq, D] over the paged cache; returns [T, Hq, D]."""
    block_size = k_cache.shape[1]
    num_kv_heads, head_size = k_cache.shape[2], k_cache.shape[3]
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    device = query.device
    slots, valid = gather_slots(meta.block_tables, meta.seq_lens_list, block_size, device)
    k = k_cache.view(-1, num_kv_heads, head_size)[slots]  # [B, L, Hkv, D]
    v = v_cache.view(-1, num_kv_heads, head_size)[slots]
    compute_dtype = torch.float32
    out = torch.empty_like(query)
    if not meta.is_prefill:
        # decode: one query per sequence, all sequences at once
        q = query.to(compute_dtype).view(-1, num_kv_heads, group, head_size)  # [B, Hkv, G, D]
        scores = torch.einsum("bhgd,blhd->bhgl", q, k.to(compute_dtype)) * scale
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("bhgl,blhd->bhgd", probs, v.to(compute_dtype))
        return o.reshape(-1, num_heads, head_size).to(query.dtype)
    starts = meta.query_start_loc.tolist()
    for b, (seq_len, q_len) in enumerate(zip(meta.seq_lens_list, meta.query_lens_list)):
        ctx = seq_len - q_len
        q = query[starts[b] : starts[b] + q_len].to(compute_dtype)  # [q, Hq, D]
        q = q.view(q_len, num_kv_heads, group, head_size)
        kb = k[b, :seq_len].to(compute_dtype)  # [L, Hkv, D]
        vb = v[b, :seq_len].to(compute_dtype)
        scores = torch.einsum("qhgd,lhd->hgql", q, kb) * scale
        qpos = torch.arange(q_len, device=device)[:, None] + ctx
        kpos = torch.arange(seq_len, device=device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgql,lhd->qhgd", probs, vb)
        out[starts[b] : starts[b] + q_len] = o.reshape(q_len, num_heads, head_size).to(query.dtype)
    return out


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, query, key, value, kv_cache, meta: AttentionMetadata, scale: float, kv_stored: bool = False):
        k_cache, v_cache = kv_cache
        if not kv_stored:
            store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(query, k_cache, v_cache, meta, scale)

    def copy_blocks(self, kv_caches, src_to_dst):
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst], device=kv_caches[0][0].device)
        dst = torch.tensor([d for _, d in src_to_dst], device=kv_caches[0][0].device)
        for k_cache, v_cache in kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def swap_blocks(self, src_caches, dst_caches, src_to_dst):
        for (sk, sv), (dk, dv) in zip(src_caches, dst_caches):
            for s, d in src_to_dst:
                dk[d].copy_(sk[s], non_blocking=True)
                dv[d].copy_(sv[s], non_blocking=True)
