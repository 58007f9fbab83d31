"""Sampler: logits -> next tokens + logprobs, for the whole batch at once (vLLM V0).

Order of operations (vLLM v0.5.4, reference section 4), on each row of the batch:

1. ``logits_processors`` (per request, on its sample rows only),
2. the ``min_tokens`` mask (stop ids and EOS set to -inf until min_tokens tokens exist),
3. penalties (sample rows only): repetition over prompt and output (``logit / r`` if
   positive, ``logit * r`` otherwise), then frequency and presence over the output,
4. ``/ temperature`` (greedy and beam use 1),
5. top-k, 6. top-p (vLLM's one-sort semantics; a ``topk`` of candidates replaces the
   full sort when the cut lies among them), 7. min-p,
8. float32 log_softmax: these *processed* logprobs are the ones returned,
9. sample: greedy = argmax; random = ``argmax(probs / Exp(1))`` as vLLM on CUDA, or by
   inverse CDF (one uniform number per row) on CPU, where drawing a random number per
   vocabulary entry would dominate the step, or, on the Triton path, with our one-pass
   sampling kernel (Gumbel-max, the same law; see Sampler's ``sampling_method``); the
   randomness comes from a per-request ``torch.Generator`` for seeded requests (so they do
   not depend on the rest of the batch), from the global RNG otherwise; beam search takes
   the top ``2 * beam_width`` candidates.

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
from labengine.utils import to_device

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
    # chunked prefill: the position of the first prompt_logprob_rows row (row j predicts token j + 1)
    prompt_logprob_start: int = 0

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


def _select_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] as one contiguous copy (index_select is several times faster than advanced
    indexing on CPU); x itself when rows is every row in order."""
    if len(rows) == x.shape[0] and rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, to_device(rows, torch.long, x.device))


def _write_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """x[rows] = values (in place unless rows is every row: then values is the result)."""
    if len(rows) == x.shape[0] and rows == list(range(x.shape[0])):
        return values
    x.index_copy_(0, to_device(rows, torch.long, x.device), values)
    return x


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


# Top-p without top-k first looks for its cut among this many top tokens (one cheap topk);
# only rows whose cut lies further down pay for vLLM's full sort.
TOP_P_CANDIDATES = 256


def apply_truncation(logits: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    """top-k then top-p on each row (k = vocab size: no top-k; p = 1: no top-p), with the
    result of vLLM's one-sort ``apply_top_k_top_p`` but without sorting the whole vocabulary
    where a ``topk`` suffices. Modifies ``logits`` in place and returns it.

    * top-k alone: mask the logits below the k-th largest value (ties kept).
    * top-p (with or without top-k): the kept tokens are among the top c candidates
      (c = k with top-k, else TOP_P_CANDIDATES); top-p's ascending cumulative sum is the mass of the
      tokens below the candidates plus the candidates' own ascending cumsum. When the cut is
      not inside the candidates (or ties at the k-th value reach past them) the row falls
      back to the full sort.
    """
    n, vocab = logits.shape
    device = logits.device
    neg_inf = -float("inf")
    k_rows = [i for i in range(n) if ps[i] >= 1.0 and ks[i] < vocab]
    p_rows = [i for i in range(n) if ps[i] < 1.0]
    if k_rows:
        kmax = max(ks[i] for i in k_rows)
        x = _select_rows(logits, k_rows)
        vals = x.topk(kmax, dim=-1).values
        kth = vals.gather(1, to_device([ks[i] - 1 for i in k_rows], torch.long, device).unsqueeze(1))
        logits = _write_rows(logits, k_rows, x.masked_fill_(x < kth, neg_inf))
    if not p_rows:
        return logits
    x = _select_rows(logits, p_rows)
    cs = [ks[i] if ks[i] < vocab else min(TOP_P_CANDIDATES, vocab) for i in p_rows]
    has_k = to_device([ks[i] < vocab for i in p_rows], torch.bool, device)
    cmax = max(cs)
    vals, idx = x.topk(cmax, dim=-1)  # descending
    c_t = to_device(cs, torch.long, device)
    pos = torch.arange(cmax, device=device).unsqueeze(0)
    # top-k: the k-th value (ties kept); with top-k the candidates are the top k, and a row
    # whose ties at the k-th value reach past them takes the full sort.
    kth = torch.where(has_k.unsqueeze(1), vals.gather(1, (c_t - 1).unsqueeze(1)),
                      torch.full((len(p_rows), 1), neg_inf, device=device))
    if any(ks[i] < vocab for i in p_rows):
        x_masked = x.masked_fill(x < kth, neg_inf)
        n_kept_by_k = (x_masked > neg_inf).sum(dim=-1)
    else:
        x_masked, n_kept_by_k = x, c_t
    # candidate probabilities under the top-k-masked distribution
    lse = torch.logsumexp(x_masked, dim=-1, keepdim=True)
    cand = vals.masked_fill(pos >= c_t.unsqueeze(1), neg_inf)
    cand = cand.masked_fill(cand < kth, neg_inf)
    cand_p = (cand - lse).exp()
    rest = (1.0 - cand_p.sum(dim=-1, keepdim=True)).clamp_(min=0.0)
    rest = torch.where(has_k.unsqueeze(1), torch.zeros_like(rest), rest)
    asc_p = cand_p.flip(-1)
    cum_asc = rest + asc_p.cumsum(dim=-1)
    p_t = to_device([ps[i] for i in p_rows], logits.dtype, device)
    mask_asc = cum_asc <= 1 - p_t.unsqueeze(1)
    mask_asc[:, -1] = False
    keep = ~mask_asc.flip(-1) & (cand > neg_inf)  # descending order, like vals
    # Falls back: top-k ties beyond the candidates, or a top-p cut below the candidates.
    lowest = (c_t - 1).unsqueeze(1)
    lowest_kept = keep.gather(1, lowest).squeeze(1)
    needs_full = torch.where(has_k, n_kept_by_k > c_t, lowest_kept & (c_t < vocab))
    result = torch.full_like(x, neg_inf).scatter_(1, idx, torch.where(keep, vals, neg_inf))
    needs_full_list = needs_full.tolist()
    fallback = [j for j, f in enumerate(needs_full_list) if f]
    if fallback:
        sub = _select_rows(x, fallback)
        result.index_copy_(0, to_device(fallback, torch.long, device), apply_top_k_top_p(
            sub, to_device([min(ks[p_rows[j]], vocab) for j in fallback], torch.long, device),
            to_device([ps[p_rows[j]] for j in fallback], logits.dtype, device)))
    return _write_rows(logits, p_rows, result)


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
        sampling_method: how a random row draws its token; both draw exactly from the
            processed distribution and both are reproducible per seed:
            "exponential" is vLLM's ``argmax(probs / q)``, q ~ Exp(1), one random number per
            vocabulary entry (cheap on a GPU); "inverse_cdf" draws one uniform number per
            row and finds it in the cumulative distribution (on CPU the random numbers
            dominate the sampler's time, so this is 3-5x faster there); "auto" (default)
            picks "kernel" when given ``kernels``, else "exponential" on CUDA and
            "inverse_cdf" elsewhere. "kernel" is ``labengine.kernels.sample``: greedy and
            random rows in one pass over the logits (Gumbel-max with in-kernel random
            numbers; temperature applied in the kernel when nothing before it needs the
            scaled logits). The same seed gives different tokens under different methods.
        kernels: ``labengine.kernels`` on the Triton path (the engine passes it), else None.
    """

    SAMPLING_METHODS = ("auto", "exponential", "inverse_cdf", "kernel")

    def __init__(self, vocab_size: int, eos_token_ids=None, sampling_method: str = "auto",
                 kernels=None) -> None:
        if sampling_method not in self.SAMPLING_METHODS:
            raise ValueError(f"sampling_method must be one of {self.SAMPLING_METHODS}, "
                             f"got {sampling_method!r}.")
        if sampling_method == "kernel" and kernels is None:
            raise ValueError("sampling_method='kernel' needs the Triton kernels (kernels=labengine.kernels), "
                             "which the engine passes on the Triton attention backend")
        self.sampling_method = sampling_method
        self.kernels = kernels
        self.vocab_size = vocab_size
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids: set[int] = set(eos_token_ids or ())

    def method_for(self, device: torch.device) -> str:
        if self.sampling_method != "auto":
            return self.sampling_method
        if self.kernels is not None:
            return "kernel"
        return "exponential" if device.type == "cuda" else "inverse_cdf"

    @torch.inference_mode()
    def warm_up(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compile the sampling kernel's common variants now (the model dtype's logits, one
        program per row and split rows, and the merge) rather than in the middle of a user's
        first run, where the batch shrinking below the GPU's size stalled a step on a compile
        (an H200 run of the throughput workload: 5.96 s against 5.3-5.4 s for the runs after it).
        Only on a CUDA device with the kernel method; triton caches the compiled kernels on disk."""
        if device.type != "cuda" or self.method_for(device) != "kernel":
            return
        logits = torch.zeros((1, self.vocab_size), dtype=dtype, device=device)
        temps = torch.ones(1, dtype=torch.float32, device=device)
        for splits in (1, 2):
            self.kernels.sample(logits, temps, splits=splits)
        torch.cuda.synchronize(device)

    # ------------------------------------------------------------------ main entry
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata
                 ) -> list[SequenceGroupOutput]:
        finish, _ = self.launch(logits, metadata)
        return finish()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, metadata: SamplingMetadata):
        """Launch the batch's sampling on the device; returns (finish, tokens): `finish()` waits
        for the results and builds the outputs, `tokens` (one per sample, in order, still on
        the device) can feed the next step before then. Only beam search syncs in here."""
        groups = metadata.groups
        num_rows, vocab = logits.shape
        device = logits.device
        use_kernel = self.method_for(device) == "kernel"
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
        want_log_softmax = False  # some row's logprobs come from the full log_softmax

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
            if params.logprobs is not None or stype == SamplingType.BEAM or g.prompt_logprob_rows:
                want_log_softmax = True
            if g.prompt_logprob_rows:
                prompt_ids = g.seq_group.prompt_token_ids
                n_pr = len(g.prompt_logprob_rows)
                prompt_lp_rows.extend(g.prompt_logprob_rows)
                p0 = g.prompt_logprob_start
                prompt_lp_targets.extend(prompt_ids[1 + p0:1 + p0 + n_pr])
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

        # Everything below computes in float32 (the model's logits may be bf16/fp16); only
        # the sampling kernel, when nothing else touches the logits, reads them as they are.
        if logits.dtype != torch.float32 and (
                proc_work or mask_rows or pen_rows or trunc_rows or min_p_rows or want_log_softmax
                or not use_kernel):
            logits = logits.float()
            owned = True

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
            logits[to_device(mask_rows, torch.long, device),
                   to_device(mask_cols, torch.long, device)] = -float("inf")

        # ---- 4. Penalties (vectorized over the penalized rows).
        if pen_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            logits = _write_rows(logits, pen_rows, apply_penalties(
                _select_rows(logits, pen_rows), pen_prompt, pen_output,
                to_device(pen_p, logits.dtype, device),
                to_device(pen_f, logits.dtype, device),
                to_device(pen_r, logits.dtype, device)))

        # ---- 5. Temperature (left to the sampling kernel when nothing before it needs it).
        kernel_temps = None
        if any_temp:
            if use_kernel and not trunc_rows and not min_p_rows and not want_log_softmax:
                kernel_temps = temps
            else:
                logits = logits / to_device(temps, logits.dtype, device).unsqueeze(1)
                owned = True

        # ---- 6. top-k / top-p, 7. min-p (only on the rows that ask for them).
        if trunc_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            logits = _write_rows(logits, trunc_rows, apply_truncation(
                _select_rows(logits, trunc_rows), [top_ks[r] for r in trunc_rows],
                [top_ps[r] for r in trunc_rows]))
        if min_p_rows:
            if not owned:
                logits = logits.clone()
                owned = True
            logits = _write_rows(logits, min_p_rows, apply_min_p(
                _select_rows(logits, min_p_rows),
                to_device([min_ps[r] for r in min_p_rows], logits.dtype, device)))

        # ---- 8./9. The processed distribution, and the samples.
        return self._sample(groups, logits, prompt_lp_rows, prompt_lp_targets, use_kernel, kernel_temps)

    # ------------------------------------------------------------------ sampling
    def _sample(self, groups: list[SequenceGroupToSample], logits: torch.Tensor,
                prompt_lp_rows: list[int], prompt_lp_targets: list[int], use_kernel: bool,
                kernel_temps: Optional[list[float]] = None):
        """Samples from the processed logits.

        The full float32 log_softmax is computed only for the rows that need it (greedy
        and beam rows, rows whose request asked for logprobs, prompt-logprob rows). A random
        row of a request without logprobs only needs its softmax: the sampled token's
        logprob is log(p) of that token. Which way a row goes depends only on its own
        request, never on the rest of the batch.

        With use_kernel (the "kernel" method) one kernel draws every greedy and random sample
        and gives its logprob; kernel_temps (per row) are temperatures it still has to apply.
        """
        num_rows, vocab = logits.shape
        device = logits.device

        # Plan the non-beam samples: one per sample row, or best_of from the single row at
        # the group's first step. Per sample: group, parent seq id, source row.
        ns_parent: list[int] = []
        ns_src: list[int] = []
        ns_group: list[int] = []
        ns_full: list[bool] = []  # its logprob comes from the full log_softmax
        greedy_pos: list[int] = []
        rand_pos: list[int] = []
        seeded: list[tuple[int, int, SequenceGroup]] = []  # (start, count) in rand order
        beam_groups: list[int] = []
        full_rows: set[int] = set(prompt_lp_rows)
        for gi, g in enumerate(groups):
            if not g.sample_rows:
                continue
            params = g.seq_group.sampling_params
            stype = params.sampling_type
            if stype == SamplingType.BEAM:
                beam_groups.append(gi)
                full_rows.update(g.sample_rows)
                continue
            full = (stype == SamplingType.GREEDY and not use_kernel) or params.logprobs is not None
            if full:
                full_rows.update(g.sample_rows)
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
                    ns_full.append(full)
                    if stype == SamplingType.GREEDY:
                        greedy_pos.append(pos)
                    else:
                        rand_pos.append(pos)
            if stype == SamplingType.RANDOM_SEED:
                seeded.append((start_rand, len(rand_pos) - start_rand, g.seq_group))

        # The full log_softmax, for the rows that need it.
        lsm_index: dict[int, int] = {}
        logprobs = logits[:0]
        if full_rows:
            if len(full_rows) == num_rows:
                logprobs = torch.log_softmax(logits, dim=-1)
                lsm_index = {r: r for r in range(num_rows)}
            else:
                rows_sorted = sorted(full_rows)
                logprobs = torch.log_softmax(_select_rows(logits, rows_sorted), dim=-1)
                lsm_index = {r: i for i, r in enumerate(rows_sorted)}

        n_ns = len(ns_src)
        ns_tokens = torch.empty(n_ns, dtype=torch.long, device=device)
        ns_logprob = torch.empty(n_ns, dtype=torch.float32, device=device)
        if use_kernel and n_ns:
            ns_tokens, ns_logprob = self._kernel_sample(logits, ns_src, greedy_pos, seeded, rand_pos,
                                                        kernel_temps)
        elif rand_pos:
            rsrc = [ns_src[p] for p in rand_pos]
            x = _select_rows(logits, rsrc)
            # Unnormalised probabilities exp(x - max): sampling does not need the softmax's
            # division, and the sampled token's logprob is x - max - log(sum).
            x_max = x.amax(dim=-1, keepdim=True)
            weights = torch.sub(x, x_max).exp_()
            rtok, total = self._random(weights, seeded, device)
            rlp = (x.gather(1, rtok.unsqueeze(1)) - x_max - total.log()).squeeze(1)
            if len(rand_pos) == n_ns:
                ns_tokens = rtok
                ns_logprob = rlp
            else:
                rp = to_device(rand_pos, torch.long, device)
                ns_tokens[rp] = rtok
                ns_logprob[rp] = rlp
        if greedy_pos and not use_kernel:
            gl = _select_rows(logprobs, [lsm_index[ns_src[p]] for p in greedy_pos])
            gtok = gl.argmax(dim=-1)
            if len(greedy_pos) == n_ns:
                ns_tokens = gtok
            else:
                ns_tokens[to_device(greedy_pos, torch.long, device)] = gtok

        # Samples whose logprob (and rank, top-k) come from the full log_softmax.
        full_pos = [i for i in range(n_ns) if ns_full[i]]
        sel_rows: list[int] = [lsm_index[ns_src[i]] for i in full_pos]
        sel_tok_parts = []
        if full_pos:
            sel_tok_parts.append(ns_tokens if len(full_pos) == n_ns
                                 else ns_tokens[to_device(full_pos, torch.long, device)])

        # Beam search: per request, the top 2 * beam_width candidates.
        beam_plan: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for gi in beam_groups:
            g = groups[gi]
            params = g.seq_group.sampling_params
            width = params.best_of
            lrows = [lsm_index[r] for r in g.sample_rows]
            lp = _select_rows(logprobs, lrows)
            first_seq = g.seq_group.seqs_dict[g.seq_ids[0]]
            if (len(g.seq_ids) == 1 and len(g.seq_group.seqs_dict) == 1
                    and first_seq.get_output_len() == 0):
                # Prompt step: the top 2W tokens of the single row.
                _, top_ids = torch.topk(lp[0], min(2 * width, vocab))
                tokens = top_ids.tolist()
                parents = [0] * len(tokens)
            else:
                # Later steps: the top 2W of cumulative + next-token logprob over all beams.
                cum = torch.tensor(
                    [g.seq_group.seqs_dict[s].cumulative_logprob for s in g.seq_ids],
                    dtype=torch.float32, device=device)
                scores = (lp + cum.unsqueeze(1)).flatten()
                _, top_ids = torch.topk(scores, min(2 * width, scores.numel()))
                top_ids = top_ids.tolist()
                parents = [i // vocab for i in top_ids]
                tokens = [i % vocab for i in top_ids]
            beam_plan[gi] = (tokens, parents, [g.sample_rows[p] for p in parents])
            sel_rows.extend(lrows[p] for p in parents)
            sel_tok_parts.append(to_device(tokens, torch.long, device))

        # Logprob of each chosen token from the full log_softmax, and its vocabulary rank
        # (1 + #strictly larger logprobs) where the request asked for logprobs.
        # (Everything up to `finish` only launches GPU work; the host transfers wait there.)
        sel_t = None
        rank_all = rank_some = None
        rank_idx: list[int] = []
        if sel_rows:
            sel_src = _select_rows(logprobs, sel_rows)
            sel_tok = torch.cat(sel_tok_parts) if len(sel_tok_parts) > 1 else sel_tok_parts[0]
            selected = sel_src.gather(1, sel_tok.unsqueeze(1))
            sel_t = selected.squeeze(1)
            want_rank = [groups[ns_group[i]].seq_group.sampling_params.logprobs is not None
                         for i in full_pos]
            for gi in beam_groups:
                want_rank += [groups[gi].seq_group.sampling_params.logprobs is not None] * \
                    len(beam_plan[gi][0])
            if any(want_rank):
                if all(want_rank):
                    rank_all = (sel_src > selected).sum(dim=-1) + 1
                else:
                    rank_idx = [i for i, w in enumerate(want_rank) if w]
                    it = to_device(rank_idx, torch.long, device)
                    rank_some = (sel_src.index_select(0, it) > selected.index_select(0, it)).sum(dim=-1) + 1

        # Prompt logprobs: logprob and rank of each real prompt token.
        if prompt_lp_rows:
            prompt_lp = _select_rows(logprobs, [lsm_index[r] for r in prompt_lp_rows])
            tgt = to_device(prompt_lp_targets, torch.long, device).clamp_(0, vocab - 1)
            p_sel_t = prompt_lp.gather(1, tgt.unsqueeze(1))
            p_rank_t = (prompt_lp > p_sel_t).sum(dim=-1) + 1
            p_index = {r: i for i, r in enumerate(prompt_lp_rows)}
        else:
            p_sel_t = p_rank_t = None
            p_index = {}

        # Top-k logprobs, one topk over every row that asks for them.
        topk_rows: set[int] = set()
        max_k = 0
        for g in groups:
            params = g.seq_group.sampling_params
            if params.logprobs and g.sample_rows:
                topk_rows.update(g.sample_rows)
                max_k = max(max_k, params.logprobs)
            if params.prompt_logprobs and g.prompt_logprob_rows:
                topk_rows.update(g.prompt_logprob_rows)
                max_k = max(max_k, params.prompt_logprobs)
        top_index: dict[int, int] = {}
        tv = ti = None
        if topk_rows:
            rows_sorted = sorted(topk_rows)
            max_k = min(max_k, vocab)
            tv, ti = _select_rows(logprobs, [lsm_index[r] for r in rows_sorted]
                                  ).topk(max_k, dim=-1)
            top_index = {r: i for i, r in enumerate(rows_sorted)}

        # Start the results' copies to the host now, so they are queued on the stream before
        # any later step's work (async scheduling launches the next step before finish()).
        have_light = bool(rand_pos) or (use_kernel and n_ns > 0)  # ns_logprob holds every sample's logprob
        results = [ns_tokens if n_ns else None, ns_logprob if have_light else None, sel_t, rank_all, rank_some,
                   p_sel_t, p_rank_t, tv, ti]
        ready = None
        if device.type == "cuda":
            results = [None if t is None else t.to("cpu", non_blocking=True) for t in results]
            ready = torch.cuda.Event()
            ready.record()

        def finish() -> list[SequenceGroupOutput]:
            """The host half: wait for this step's copies, then build the outputs."""
            if ready is not None:
                ready.synchronize()  # waits for this step only, not for steps launched after it
            h_tokens, h_logprob, h_sel, h_rank_all, h_rank_some, h_p_sel, h_p_rank, h_tv, h_ti = results
            token_list = h_tokens.tolist() if n_ns else []
            light_list = h_logprob.tolist() if have_light else []
            sel_list = h_sel.tolist() if h_sel is not None else []
            rank_list: list[Optional[int]] = [None] * len(sel_rows)
            if h_rank_all is not None:
                rank_list = h_rank_all.tolist()
            elif h_rank_some is not None:
                for i, r in zip(rank_idx, h_rank_some.tolist()):
                    rank_list[i] = r
            p_sel = h_p_sel.squeeze(1).tolist() if h_p_sel is not None else []
            p_rank = h_p_rank.tolist() if h_p_rank is not None else []
            top_vals = h_tv.tolist() if h_tv is not None else []
            top_ids = h_ti.tolist() if h_ti is not None else []

            def make_dict(token: int, lp: float, rank: Optional[int], row: int, k: Optional[int]):
                d = {token: Logprob(lp, rank)}
                if k:
                    i = top_index[row]
                    ids, vals = top_ids[i], top_vals[i]
                    for j in range(k):
                        # (a top-k entry for the sampled token updates it in place, as in vLLM)
                        d[ids[j]] = Logprob(vals[j], j + 1)
                return d

            # ---- Assemble per-group outputs.
            outputs = [SequenceGroupOutput(samples=[]) for _ in groups]
            full_slot = {p: i for i, p in enumerate(full_pos)}
            for pos in range(n_ns):
                gi = ns_group[pos]
                k = groups[gi].seq_group.sampling_params.logprobs
                tok = token_list[pos]
                if ns_full[pos]:
                    i = full_slot[pos]
                    lp, rank = sel_list[i], rank_list[i]
                else:
                    lp, rank = light_list[pos], None
                outputs[gi].samples.append(SequenceOutput(
                    ns_parent[pos], tok, lp, make_dict(tok, lp, rank, ns_src[pos], k)))
            i = len(full_pos)
            for gi in beam_groups:
                g = groups[gi]
                k = g.seq_group.sampling_params.logprobs
                tokens, parents, src_rows = beam_plan[gi]
                for tok, parent, row in zip(tokens, parents, src_rows):
                    lp = sel_list[i]
                    outputs[gi].samples.append(SequenceOutput(
                        g.seq_ids[parent], tok, lp, make_dict(tok, lp, rank_list[i], row, k)))
                    i += 1
            for gi, g in enumerate(groups):
                if g.prompt_logprob_rows:
                    k = g.seq_group.sampling_params.prompt_logprobs
                    plist = []
                    for r in g.prompt_logprob_rows:
                        j = p_index[r]
                        plist.append(make_dict(prompt_lp_targets[j], p_sel[j], p_rank[j], r, k))
                    outputs[gi].prompt_logprobs = plist
            return outputs

        return finish, ns_tokens

    def _kernel_sample(self, logits, ns_src, greedy_pos, seeded, rand_pos, kernel_temps):
        """Every non-beam sample in one launch of labengine.kernels.sample; returns its
        (tokens, logprobs). Seeds are drawn on the host (no device work): a seeded request's
        from its own CPU generator, the others' from the global RNG (torch.manual_seed)."""
        n = len(ns_src)
        device = logits.device
        temps = [1.0] * n if kernel_temps is None else [kernel_temps[r] for r in ns_src]
        for p in greedy_pos:
            temps[p] = 0.0
        base_seed = int(torch.randint(0, 2**30, (1,)))
        seeds = None
        if seeded:
            seeds = [base_seed + p for p in range(n)]
            for start, count, seq_group in seeded:
                draws = torch.randint(0, 2**30, (count,), generator=get_generator(seq_group, "cpu")).tolist()
                for i, d in enumerate(draws):
                    seeds[rand_pos[start + i]] = d
            seeds = to_device(seeds, torch.int64, device)
        rows = None if ns_src == list(range(n)) else to_device(ns_src, torch.int64, device)
        return self.kernels.sample(logits, to_device(temps, torch.float32, device), rows=rows, seeds=seeds,
                                   base_seed=base_seed)

    def _random(self, weights: torch.Tensor, seeded, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws one token per row from ``weights`` (unnormalised probabilities; consumed),
        with the global RNG, or with the request's own generator for the rows of seeded
        requests (a seeded request draws the same amount of randomness every step,
        whatever else is in the batch). Returns (tokens, row sums of the weights)."""
        method = self.method_for(weights.device)
        # (an accurate sum for the logprobs; the running cumsum below accumulates error)
        total = weights.sum(dim=-1, keepdim=True)
        if method == "exponential":
            # vLLM: argmax(probs / q), q ~ Exp(1) (the row's normalisation does not change
            # the argmax). q = -log(U), U ~ Uniform[0, 1), is the same law as
            # Tensor.exponential_ and several times faster on CPU;
            # argmax(w / -log U) = argmin(w / log U) (log U <= 0) saves a pass.
            u = torch.empty_like(weights)
            u.uniform_()
            for start, count, seq_group in seeded:
                if count:
                    u[start:start + count].uniform_(generator=get_generator(seq_group, device))
            u.log_()
            return torch.div(weights, u, out=u).argmin(dim=-1), total
        # Inverse CDF: one uniform number per row instead of one per vocabulary entry.
        u = torch.empty(weights.shape[0], 1, dtype=weights.dtype, device=device)
        u.uniform_()
        for start, count, seq_group in seeded:
            if count:
                u[start:start + count].uniform_(generator=get_generator(seq_group, device))
        cdf = weights.cumsum_(dim=-1)
        last = cdf[:, -1:]
        # target < last strictly, so the first index whose cdf exceeds it exists and has a
        # positive weight (cdf[i] > cdf[i-1]).
        target = torch.minimum(u * last, torch.nextafter(last, torch.zeros_like(last)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1), total
