"""Sampler: logits -> next tokens + logprobs, for the whole batch at once (vLLM V0).

Order of operations (vLLM v0.5.4, reference section 4), on each row of the batch:

1. ``logits_processors`` (per request, on its sample rows only),
2. the ``min_tokens`` mask (stop ids and EOS set to -inf until min_tokens tokens exist),
3. penalties (sample rows only): repetition over prompt and output (``logit / r`` if
   positive, ``logit * r`` otherwise), then frequency and presence over the output,
4. ``/ temperature`` (greedy and beam use 1),
5. top-k, 6. top-p (one sort, as vLLM), 7. min-p,
8. float32 log_softmax: these *processed* logprobs are the ones returned,
9. sample: greedy = argmax; random = ``argmax(probs / Exp(1))``, the exponential noise
   drawn from a per-request ``torch.Generator`` for seeded requests (so they do not depend
   on the rest of the batch), from the global RNG otherwise; beam search takes the top
   ``2 * beam_width`` candidates.

Prompt-logprob rows get temperature, top-k/top-p and min-p, but no processors, no
min_tokens mask and no penalties. Every step is a few tensor operations over the batch;
only the logits processors and beam search loop in Python (per request), and the chosen
tokens come back to the host once.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch

from labengine.sampling_params import _SAMPLING_EPS, SamplingParams, SamplingType
from labengine.sequence import Logprob, SequenceGroup

__all__ = ["SequenceGroupToSample", "SamplingMetadata", "SequenceOutput",
           "SequenceGroupOutput", "Sampler"]


@dataclass
class SequenceGroupToSample:
    """One request's share of the batch this step.

    Attributes:
        seq_group: The request.
        seq_ids: Running sequences of the group in this step, in row order.
        is_prompt: This step is the group's prefill (first time, or a recompute).
        prompt_logprob_rows: Rows of ``logits`` for prompt positions 0..P-2 (row j predicts
            prompt token j+1); empty unless prompt logprobs are wanted and not yet known.
        sample_rows: One row per seq id: the row that predicts that sequence's next token.
    """

    seq_group: SequenceGroup
    seq_ids: list[int]
    is_prompt: bool
    prompt_logprob_rows: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)

    @property
    def sampling_params(self) -> SamplingParams:
        return self.seq_group.sampling_params


@dataclass
class SamplingMetadata:
    """Everything the sampler needs to know about the batch: one entry per request."""

    groups: list[SequenceGroupToSample]


@dataclass
class SequenceOutput:
    """One sampled token: the sequence it continues, the token and its logprobs.

    ``logprob`` is the processed logprob of the token; ``logprobs`` maps token id ->
    Logprob, the sampled token first (with its rank), then the top-k (ranks 1..k).
    """

    parent_seq_id: int
    output_token: int
    logprob: float
    logprobs: dict[int, Logprob]


@dataclass
class SequenceGroupOutput:
    """The sampler's output for one request (aligned with SamplingMetadata.groups).

    ``prompt_logprobs`` (when computed this step) has one dict per prompt position
    1..P-1, without the leading None (the output processor adds it).
    """

    samples: list[SequenceOutput]
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None


_NUM_PARAMS_CACHE: dict[int, tuple[object, int]] = {}


def _num_params(fn) -> int:
    entry = _NUM_PARAMS_CACHE.get(id(fn))
    if entry is not None and entry[0] is fn:
        return entry[1]
    try:
        n = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n = 2
    if len(_NUM_PARAMS_CACHE) > 4096:
        _NUM_PARAMS_CACHE.clear()
    _NUM_PARAMS_CACHE[id(fn)] = (fn, n)
    return n


def get_generator(seq_group: SequenceGroup, device) -> torch.Generator:
    """The seeded request's own generator, created on first use from params.seed."""
    gen = getattr(seq_group, "sampling_generator", None)
    if gen is None or gen.device != torch.device(device):
        gen = torch.Generator(device=device)
        gen.manual_seed(seq_group.sampling_params.seed)
        seq_group.sampling_generator = gen
    return gen


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM's _apply_top_k_top_p: one ascending sort, mask below the k-th largest (ties
    kept), then drop tokens whose ascending cumulative probability is <= 1 - p (the top
    token is always kept)."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    # top-k: the k-th largest value of each row; everything strictly below it goes.
    top_k_index = logits_sort.size(1) - k.to(torch.long)
    kth = logits_sort.gather(1, top_k_index.unsqueeze(dim=1))
    logits_sort.masked_fill_(logits_sort < kth, -float("inf"))
    # top-p
    probs_sort = logits_sort.softmax(dim=-1)
    probs_sum = probs_sort.cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return torch.empty_like(logits_sort).scatter_(dim=-1, index=logits_idx, src=logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * max_prob``."""
    probs = torch.softmax(logits, dim=-1)
    top_probs, _ = probs.max(dim=-1, keepdim=True)
    tokens_to_remove = probs < min_p.unsqueeze(dim=1) * top_probs
    return logits.masked_fill_(tokens_to_remove, -float("inf"))


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]],
                    output_ids: list[list[int]], presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, vectorized.

    Rows of ``logits`` pair with the token lists; counts are built with one scatter.
    """
    num_rows, vocab_size = logits.shape
    device = logits.device

    def padded(lists: list[list[int]]) -> torch.Tensor:
        width = max((len(x) for x in lists), default=0)
        width = max(width, 1)
        t = torch.full((num_rows, width), vocab_size, dtype=torch.long)
        for i, x in enumerate(lists):
            if x:
                t[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        return t.clamp_(0, vocab_size).to(device)

    out_t = padded(output_ids)
    out_counts = torch.zeros(num_rows, vocab_size + 1, dtype=logits.dtype, device=device)
    out_counts.scatter_add_(1, out_t, torch.ones_like(out_t, dtype=logits.dtype))
    out_counts = out_counts[:, :vocab_size]
    out_mask = out_counts > 0
    prompt_mask = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)
    prompt_mask.scatter_(1, padded(prompt_ids), True)
    prompt_mask = prompt_mask[:, :vocab_size]

    rep = repetition.unsqueeze(1).expand(num_rows, vocab_size)
    rep = torch.where(prompt_mask | out_mask, rep, torch.ones_like(rep))
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency.unsqueeze(1) * out_counts
    logits = logits - presence.unsqueeze(1) * out_mask.to(logits.dtype)
    return logits


class Sampler:
    """Turns the batch's logits into one SequenceGroupOutput per request.

    Args:
        vocab_size: The model's vocabulary size (the logits' last dimension).
        eos_token_ids: EOS id(s) masked by ``min_tokens`` along with
            ``params.all_stop_token_ids`` (the tokenizer's EOS and generation_config's).
    """

    def __init__(self, vocab_size: int, eos_token_ids=None) -> None:
        self.vocab_size = vocab_size
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids: set[int] = set(eos_token_ids or ())

    # ------------------------------------------------------------------ main entry
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata
                 ) -> list[SequenceGroupOutput]:
        groups = metadata.groups
        if logits.dtype != torch.float32:
            logits = logits.float()
        num_rows, vocab = logits.shape
        device = logits.device
        owned = False  # whether `logits` is our own copy (safe to modify in place)

        # ---- 1. Per-row parameters (one Python pass over the groups, no tensors yet).
        temps: list[float] = [1.0] * num_rows
        top_ks: list[int] = [vocab] * num_rows
        top_ps: list[float] = [1.0] * num_rows
        min_ps: list[float] = [0.0] * num_rows
        trunc_rows: list[int] = []
        min_p_rows: list[int] = []
        any_temp = False
        proc_work = []  # (row, processors, prompt_ids, output_ids)
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        pen_rows: list[int] = []
        pen_prompt: list[list[int]] = []
        pen_output: list[list[int]] = []
        pen_p: list[float] = []
        pen_f: list[float] = []
        pen_r: list[float] = []
        prompt_lp_rows: list[int] = []
        prompt_lp_targets: list[int] = []

        for g in groups:
            params = g.seq_group.sampling_params
            stype = params.sampling_type
            rows = list(g.sample_rows) + list(g.prompt_logprob_rows)
            if not rows:
                continue
            t = params.temperature
            if stype in (SamplingType.RANDOM, SamplingType.RANDOM_SEED) and t != 1.0:
                any_temp = True
                for r in rows:
                    temps[r] = t
            k = params.top_k
            if params.top_p < 1.0 - _SAMPLING_EPS or k != -1:
                kk = vocab if k == -1 else min(k, vocab)
                for r in rows:
                    top_ks[r] = kk
                    top_ps[r] = params.top_p
                trunc_rows.extend(rows)
            if params.min_p > _SAMPLING_EPS:
                for r in rows:
                    min_ps[r] = params.min_p
                min_p_rows.extend(rows)
            if g.prompt_logprob_rows:
                prompt_ids = g.seq_group.prompt_token_ids
                n_pr = len(g.prompt_logprob_rows)
                prompt_lp_rows.extend(g.prompt_logprob_rows)
                prompt_lp_targets.extend(prompt_ids[1:1 + n_pr])
            if not g.sample_rows:
                continue
            seqs = [g.seq_group.seqs_dict[sid] for sid in g.seq_ids]
            if params.logits_processors:
                for r, seq in zip(g.sample_rows, seqs):
                    proc_work.append((r, params.logits_processors, seq))
            if params.min_tokens > 0:
                stop_ids = params.all_stop_token_ids | self.eos_token_ids
                stop_ids = [i for i in stop_ids if 0 <= i < vocab]
                if stop_ids:
                    for r, seq in zip(g.sample_rows, seqs):
                        if seq.get_output_len() < params.min_tokens:
                            mask_rows.extend([r] * len(stop_ids))
                            mask_cols.extend(stop_ids)
            if (abs(params.presence_penalty) >= _SAMPLING_EPS
                    or abs(params.frequency_penalty) >= _SAMPLING_EPS
                    or abs(params.repetition_penalty - 1.0) >= _SAMPLING_EPS):
                for r, seq in zip(g.sample_rows, seqs):
                    pen_rows.append(r)
                    pen_prompt.append(seq.prompt_token_ids)
                    pen_output.append(seq.output_token_ids)
                    pen_p.append(params.presence_penalty)
                    pen_f.append(params.frequency_penalty)
                    pen_r.append(params.repetition_penalty)

        # ---- 2. Logits processors (per request, per row: they are arbitrary Python).
        if proc_work:
            logits = logits.clone()
            owned = True
            for r, processors, seq in proc_work:
                row = logits[r]
                prompt_ids = list(seq.prompt_token_ids)
                output_ids = list(seq.output_token_ids)
                for fn in processors:
                    if _num_params(fn) == 3:
                        row = fn(prompt_ids, output_ids, row)
                    else:
                        row = fn(output_ids, row)
                logits[r] = row

        # ---- 3. min_tokens mask.
        if mask_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            logits[torch.tensor(mask_rows, device=device),
                   torch.tensor(mask_cols, device=device)] = -float("inf")

        # ---- 4. Penalties (vectorized over the penalized rows).
        if pen_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            idx = torch.tensor(pen_rows, device=device)
            logits[idx] = apply_penalties(
                logits[idx], pen_prompt, pen_output,
                torch.tensor(pen_p, dtype=logits.dtype, device=device),
                torch.tensor(pen_f, dtype=logits.dtype, device=device),
                torch.tensor(pen_r, dtype=logits.dtype, device=device))

        # ---- 5. Temperature.
        if any_temp:
            logits = logits / torch.tensor(temps, dtype=logits.dtype, device=device).unsqueeze(1)
            owned = True

        # ---- 6. top-k / top-p, 7. min-p (only on the rows that ask for them).
        if trunc_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            idx = torch.tensor(trunc_rows, device=device)
            logits[idx] = apply_top_k_top_p(
                logits[idx], torch.tensor([top_ks[r] for r in trunc_rows], device=device),
                torch.tensor([top_ps[r] for r in trunc_rows], dtype=logits.dtype, device=device))
        if min_p_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            idx = torch.tensor(min_p_rows, device=device)
            logits[idx] = apply_min_p(
                logits[idx],
                torch.tensor([min_ps[r] for r in min_p_rows], dtype=logits.dtype, device=device))

        # ---- 8. The processed distribution.
        logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)

        # ---- 9. Sample.
        return self._sample(groups, logprobs, prompt_lp_rows, prompt_lp_targets)

    # ------------------------------------------------------------------ sampling
    def _sample(self, groups: list[SequenceGroupToSample], logprobs: torch.Tensor,
                prompt_lp_rows: list[int], prompt_lp_targets: list[int]
                ) -> list[SequenceGroupOutput]:
        num_rows, vocab = logprobs.shape
        device = logprobs.device

        # Plan the non-beam samples: one per sample row, or best_of from the single row at
        # the group's first step. Each entry: (group index, parent seq id, source row).
        ns_parent: list[int] = []
        ns_src: list[int] = []
        ns_group: list[int] = []
        greedy_pos: list[int] = []
        rand_pos: list[int] = []
        seeded: list[tuple[int, int, SequenceGroup]] = []  # (start, count) in rand order
        beam_groups: list[int] = []
        for gi, g in enumerate(groups):
            if not g.sample_rows:
                continue
            params = g.seq_group.sampling_params
            stype = params.sampling_type
            if stype == SamplingType.BEAM:
                beam_groups.append(gi)
                continue
            if (stype != SamplingType.GREEDY and g.is_prompt and params.best_of > 1
                    and len(g.seq_ids) == 1 and len(g.seq_group.seqs_dict) == 1):
                count = params.best_of  # the prompt step: best_of independent samples
            else:
                count = 1
            start_rand = len(rand_pos)
            for sid, r in zip(g.seq_ids, g.sample_rows):
                for _ in range(count):
                    pos = len(ns_src)
                    ns_parent.append(sid)
                    ns_src.append(r)
                    ns_group.append(gi)
                    if stype == SamplingType.GREEDY:
                        greedy_pos.append(pos)
                    else:
                        rand_pos.append(pos)
            if stype == SamplingType.RANDOM_SEED:
                seeded.append((start_rand, len(rand_pos) - start_rand, g.seq_group))

        n_ns = len(ns_src)
        identity = n_ns == num_rows and ns_src == list(range(num_rows))
        if n_ns:
            src_lp = logprobs if identity else logprobs[torch.tensor(ns_src, device=device)]
            if not greedy_pos:
                ns_tokens = self._random(src_lp, seeded, device)
            elif not rand_pos:
                ns_tokens = src_lp.argmax(dim=-1)
            else:
                ns_tokens = torch.empty(n_ns, dtype=torch.long, device=device)
                gp = torch.tensor(greedy_pos, device=device)
                rp = torch.tensor(rand_pos, device=device)
                ns_tokens[gp] = src_lp[gp].argmax(dim=-1)
                ns_tokens[rp] = self._random(src_lp[rp], seeded, device)
        else:
            src_lp = logprobs[:0]
            ns_tokens = torch.empty(0, dtype=torch.long, device=device)

        # Beam search: per request, the top 2 * beam_width candidates.
        beam_plan: dict[int, tuple[list[int], list[int], list[int]]] = {}
        if beam_groups:
            all_src = list(ns_src)
            tok_parts = [ns_tokens]
            for gi in beam_groups:
                g = groups[gi]
                params = g.seq_group.sampling_params
                width = params.best_of
                rows = torch.tensor(g.sample_rows, device=device)
                lp = logprobs[rows]
                first_seq = g.seq_group.seqs_dict[g.seq_ids[0]]
                if (len(g.seq_ids) == 1 and len(g.seq_group.seqs_dict) == 1
                        and first_seq.get_output_len() == 0):
                    # Prompt step: the top 2W tokens of the single row.
                    _, top_ids = torch.topk(lp[0], 2 * width)
                    tokens = top_ids.tolist()
                    parents = [0] * len(tokens)
                else:
                    cum = torch.tensor(
                        [g.seq_group.seqs_dict[s].cumulative_logprob for s in g.seq_ids],
                        dtype=torch.float32, device=device)
                    scores = (lp + cum.unsqueeze(1)).flatten()
                    _, top_ids = torch.topk(scores, min(2 * width, scores.numel()))
                    top_ids = top_ids.tolist()
                    parents = [i // vocab for i in top_ids]
                    tokens = [i % vocab for i in top_ids]
                beam_plan[gi] = (tokens, parents, [g.sample_rows[p] for p in parents])
                all_src.extend(g.sample_rows[p] for p in parents)
                tok_parts.append(torch.tensor(tokens, dtype=torch.long, device=device))
            all_tokens = torch.cat(tok_parts)
            sel_src = logprobs[torch.tensor(all_src, dtype=torch.long, device=device)]
        else:
            all_src = ns_src
            all_tokens = ns_tokens
            sel_src = src_lp

        # Logprob of every chosen token; its vocabulary rank (1 + #strictly larger
        # logprobs) only where logprobs were requested (otherwise it is never shown).
        if all_tokens.numel():
            selected = sel_src.gather(1, all_tokens.unsqueeze(1))
            token_list = all_tokens.tolist()
            selected_list = selected.squeeze(1).tolist()
            rank_pos = [i for i, gi in enumerate(ns_group)
                        if groups[gi].seq_group.sampling_params.logprobs is not None]
            for gi in beam_groups:
                if groups[gi].seq_group.sampling_params.logprobs is not None:
                    start = n_ns + sum(len(beam_plan[b][0]) for b in beam_groups if b < gi)
                    rank_pos.extend(range(start, start + len(beam_plan[gi][0])))
            rank_list: list[Optional[int]] = [None] * len(token_list)
            if rank_pos:
                if len(rank_pos) == len(token_list):
                    ranks = (sel_src > selected).sum(dim=-1) + 1
                else:
                    rp = torch.tensor(rank_pos, device=device)
                    ranks = (sel_src[rp] > selected[rp]).sum(dim=-1) + 1
                for i, r in zip(rank_pos, ranks.tolist()):
                    rank_list[i] = r
        else:
            token_list, selected_list, rank_list = [], [], []

        # Prompt logprobs: logprob and rank of each real prompt token.
        if prompt_lp_rows:
            pr = torch.tensor(prompt_lp_rows, device=device)
            prompt_lp = logprobs[pr]
            tgt = torch.tensor(prompt_lp_targets, dtype=torch.long, device=device).clamp_(0, vocab - 1)
            p_sel = prompt_lp.gather(1, tgt.unsqueeze(1))
            p_rank = ((prompt_lp > p_sel).sum(dim=-1) + 1).tolist()
            p_sel = p_sel.squeeze(1).tolist()
            p_index = {r: i for i, r in enumerate(prompt_lp_rows)}
        else:
            p_sel, p_rank, p_index = [], [], {}

        # Top-k logprobs, one topk over every row that asks for them.
        topk_rows: list[int] = []
        max_k = 0
        for gi, g in enumerate(groups):
            params = g.seq_group.sampling_params
            if params.logprobs and g.sample_rows:
                topk_rows.extend(g.sample_rows)
                max_k = max(max_k, params.logprobs)
            if params.prompt_logprobs and g.prompt_logprob_rows:
                topk_rows.extend(g.prompt_logprob_rows)
                max_k = max(max_k, params.prompt_logprobs)
        top_index: dict[int, int] = {}
        if topk_rows:
            topk_rows = sorted(set(topk_rows))
            max_k = min(max_k, vocab)
            top_vals, top_ids = logprobs[torch.tensor(topk_rows, device=device)].topk(max_k, dim=-1)
            top_vals = top_vals.tolist()
            top_ids = top_ids.tolist()
            top_index = {r: i for i, r in enumerate(topk_rows)}

        def make_dict(token: int, lp: float, rank: int, row: int, k: Optional[int]):
            d = {token: Logprob(lp, rank)}
            if k:
                i = top_index[row]
                ids, vals = top_ids[i], top_vals[i]
                for j in range(k):
                    d[ids[j]] = Logprob(vals[j], j + 1)
            return d

        # ---- Assemble per-group outputs.
        outputs = [SequenceGroupOutput(samples=[]) for _ in groups]
        for pos in range(n_ns):
            gi = ns_group[pos]
            k = groups[gi].seq_group.sampling_params.logprobs
            tok = token_list[pos]
            lp = selected_list[pos]
            outputs[gi].samples.append(SequenceOutput(
                ns_parent[pos], tok, lp, make_dict(tok, lp, rank_list[pos], ns_src[pos], k)))
        pos = n_ns
        for gi in beam_groups:
            g = groups[gi]
            k = g.seq_group.sampling_params.logprobs
            tokens, parents, src_rows = beam_plan[gi]
            for tok, parent, row in zip(tokens, parents, src_rows):
                lp = selected_list[pos]
                outputs[gi].samples.append(SequenceOutput(
                    g.seq_ids[parent], tok, lp, make_dict(tok, lp, rank_list[pos], row, k)))
                pos += 1
        for gi, g in enumerate(groups):
            if g.prompt_logprob_rows:
                k = g.seq_group.sampling_params.prompt_logprobs
                plist = []
                for r in g.prompt_logprob_rows:
                    i = p_index[r]
                    plist.append(make_dict(prompt_lp_targets[i], p_sel[i], p_rank[i], r, k))
                outputs[gi].prompt_logprobs = plist
        return outputs

    @staticmethod
    def _random(lp: torch.Tensor, seeded, device) -> torch.Tensor:
        """argmax(probs / q), q ~ Exp(1) drawn from the global RNG, or from the request's
        own generator for seeded requests (a seeded request draws [its rows, V] numbers
        every step, whatever else is in the batch).

        q is made as -log(U), U ~ Uniform[0, 1): the same Exp(1) law as
        Tensor.exponential_, but several times faster on CPU.
        """
        probs = lp.exp()
        q = torch.empty_like(probs)
        q.uniform_()
        for start, count, seq_group in seeded:
            if count:
                q[start:start + count].uniform_(generator=get_generator(seq_group, device))
        q.log_().neg_()
        return probs.div_(q).argmax(dim=-1)
