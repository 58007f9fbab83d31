"""One-pass sampling: a token and its logprob per row, greedy or random, in one kernel.

Random rows use the Gumbel-max trick: argmax(x / T + g), g = -log(-log u), u ~ U[0, 1), is an
exact draw from softmax(x / T). It is the same law as vLLM's argmax(probs / q), q ~ Exp(1)
(take logs: q = -log u), without ever forming probs: each program streams its row once,
keeping a running maximum and sum of exp for the log-sum-exp (the sampled token's logprob)
and the running best noisy score. The uniform numbers come from Philox inside the kernel
(`tl.rand4x`: four numbers per call), so no [rows, vocab] random tensor is written and read back.
On the GPU the noise's outer log runs on lg2.approx (`fast_log`): the same argmax in base 2,
a fifth fewer instructions per entry; the inner log, which shapes the noise's large tail, stays exact.
Greedy rows (temperature 0) take the first maximal logit, as torch.argmax does.

In PyTorch the same step is ~8 passes over [rows, vocab] float32 (scale, max, exp, sum, a
random tensor, log, divide, argmax): 1.5 ms per decode step at 256 rows x 151,936 entries
on an H200; this reads the logits once.

Grid (num_samples, splits): each sample (a row may be sampled several times, e.g. best_of at
the prompt step) is drawn by `splits` programs, each walking its share of the row in
BLOCK_V-entry chunks; with more than one split, `_sample_merge_kernel` combines their maxima,
sums and best scores. A small batch gets several splits so that its programs fill the GPU
(one program per row left most of an H200 idle at batch 32); the token never depends on it.

The seed of sample s is seeds[s] when given (a seeded request draws its own, so its tokens
do not depend on the rest of the batch), else base_seed + s. The random stream differs from
the PyTorch sampler's (same law, different numbers).

`sampling_probs_ref` below gives the distribution each sample is drawn from; the tests
compare empirical frequencies with it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # the GPU's fast log2 (lg2.approx) for the Gumbel noise's outer log
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: the kernel reads it


# base_seed changes every step: without do_not_specialize Triton would compile a variant the
# first time it is divisible by 16 (or equals 1), a ~0.5 s stall in the middle of a run
@triton.jit(do_not_specialize=["base_seed"])
def _sample_kernel(
    Logits,  # [R, V] processed logits (any float dtype), last dim contiguous
    Rows,  # [S] int64 row of Logits that sample s draws from
    Temps,  # [S] fp32 temperature of sample s; 0 = greedy (argmax of the unscaled logits)
    Seeds,  # [S] int64 Philox seed of sample s (read only when HAS_SEEDS)
    Tokens,  # [S] int64 out: the sampled token (SPLITS == 1)
    Logprobs,  # [S] fp32 out: its log-probability under softmax(logits / T) (T = 1 when greedy)
    Part,  # [S, SPLITS, 4] fp32 out (SPLITS > 1): each split's max and sum of exp of x / T, best score, its x
    Part_idx,  # [S, SPLITS] int32 out (SPLITS > 1): the index of each split's best score
    stride_l,
    V,
    split_len,  # vocabulary entries per split, a multiple of BLOCK_V
    splits,  # programs per sample (the grid's second dimension)
    base_seed,  # seed of sample s = base_seed + s when there are no Seeds
    HAS_SEEDS: tl.constexpr,
    BLOCK_V: tl.constexpr,  # vocabulary entries per chunk, as a [BLOCK_V // 4, 4] tile
    SPLIT: tl.constexpr,  # more than one program per sample: write partials for the merge
    FAST_LOG: tl.constexpr,  # the noise's outer log by the GPU's lg2.approx (scores in base 2)
):
    Q: tl.constexpr = BLOCK_V // 4
    NEG_INF: tl.constexpr = float("-inf")
    s = tl.program_id(0)
    split = tl.program_id(1)
    v_lo = split * split_len
    v_hi = tl.minimum(V, v_lo + split_len)
    row = tl.load(Rows + s)
    temp = tl.load(Temps + s)
    greedy = temp == 0.0
    temp = tl.where(greedy, 1.0, temp)
    if HAS_SEEDS:
        seed = tl.load(Seeds + s)
    else:
        seed = base_seed + s
    ptr = Logits + row * stride_l
    # Every lane keeps its own running state over the entries it sees (no cross-thread
    # reduction inside the loop; one at the end): max and sum of exp for the log-sum-exp,
    # and the best score with its x and index. Entry (i, k) of a chunk is column v0 + 4i + k.
    offs_i = tl.arange(0, Q)
    tile = offs_i[:, None] * 4 + tl.arange(0, 4)[None, :]
    m = tl.full([Q, 4], NEG_INF, tl.float32)
    total = tl.zeros([Q, 4], tl.float32)
    best = tl.full([Q, 4], NEG_INF, tl.float32)
    best_x = tl.full([Q, 4], NEG_INF, tl.float32)
    best_i = tl.zeros([Q, 4], tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tile
        valid = cols < v_hi
        # x / T rounded as torch's division rounds it (a product with 1 / T can differ in
        # the last bit), so scaling here or in the sampler beforehand gives the same samples
        x = tl.math.div_rn(tl.load(ptr + cols, mask=valid, other=NEG_INF).to(tl.float32), temp)
        # sum of exp(x - m) against the lane's running max m, one exp per entry: a new max
        # rescales the old sum by exp(m - x) and adds 1, any other entry adds exp(x - m)
        # (-inf entries add nothing; the first finite one makes the sum 1 whatever e is; the
        # selects keep -inf - -inf, a NaN, out of the exp)
        bigger = x > m
        e = tl.exp(-tl.abs(tl.where(x == NEG_INF, 0.0, x) - tl.where(m == NEG_INF, 0.0, m)))
        e = tl.where(x == NEG_INF, 0.0, e)
        total = tl.where(bigger, total * e + 1.0, total + e)
        m = tl.maximum(m, x)
        if greedy:
            score = x
        else:
            # one Philox call per 4 entries (counter = column // 4), its 4 outputs side by side
            u0, u1, u2, u3 = tl.rand4x(seed, v0 // 4 + offs_i)
            u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [Q, 4])
            if FAST_LOG:
                # argmax(x - ln E) = argmax(x log2(e) - log2 E), E = -ln u ~ Exp(1): the inner log
                # stays exact (E near 0, u near 1, is the noise's large tail); the outer one's
                # error (~2^-22 relative) is below x's own rounding
                score = x * LOG2E - libdevice.fast_log2f(-tl.log(u))
            else:
                score = x - tl.log(-tl.log(u))  # Gumbel noise; u = 0 gives -inf: never chosen
        score = tl.where(valid, score, NEG_INF)
        take = score > best  # strict: within a lane the earlier entry wins ties
        best = tl.where(take, score, best)
        best_x = tl.where(take, x, best_x)
        best_i = tl.where(take, cols, best_i)
    m_all = tl.max(tl.max(m, 1), 0)
    m_all_safe = tl.where(m_all == NEG_INF, 0.0, m_all)
    total_all = tl.sum(tl.sum(total * tl.exp(m - m_all_safe), 1), 0)
    b = tl.max(tl.max(best, 1), 0)
    # the first index holding the best score, as torch.argmax
    idx = tl.min(tl.min(tl.where(best == b, best_i, V), 1), 0)
    x_idx = tl.max(tl.max(tl.where((best == b) & (best_i == idx), best_x, NEG_INF), 1), 0)
    if SPLIT:
        part = Part + (s * splits + split) * 4
        tl.store(part, m_all)
        tl.store(part + 1, total_all)
        tl.store(part + 2, b)
        tl.store(part + 3, x_idx)
        tl.store(Part_idx + s * splits + split, idx)
    else:
        tl.store(Tokens + s, idx.to(tl.int64))
        tl.store(Logprobs + s, x_idx - m_all - tl.log(total_all))


@triton.jit
def _sample_merge_kernel(
    Part,  # [S, splits, 4] fp32 from _sample_kernel
    Part_idx,  # [S, splits] int32
    Tokens,  # [S] int64 out
    Logprobs,  # [S] fp32 out
    V,
    splits,
    SPLITS_PAD: tl.constexpr,  # MAX_SPLITS: one compiled merge for every split count
):
    """One sample's splits into its token (the best score; ties: the lowest index, as in one
    program) and its logprob (x - log-sum-exp, the sums moved to the row's max)."""
    NEG_INF: tl.constexpr = float("-inf")
    s = tl.program_id(0)
    k = tl.arange(0, SPLITS_PAD)
    mask = k < splits
    part = Part + (s * splits + k) * 4
    m = tl.load(part, mask=mask, other=NEG_INF)
    total = tl.load(part + 1, mask=mask, other=0.0)
    best = tl.load(part + 2, mask=mask, other=NEG_INF)
    best_x = tl.load(part + 3, mask=mask, other=NEG_INF)
    best_i = tl.load(Part_idx + s * splits + k, mask=mask, other=V)
    m_all = tl.max(m, 0)
    m_all_safe = tl.where(m_all == NEG_INF, 0.0, m_all)
    total_all = tl.sum(tl.where(m == NEG_INF, 0.0, total * tl.exp(m - m_all_safe)), 0)
    b = tl.max(best, 0)
    idx = tl.min(tl.where(best == b, best_i, V), 0)
    x_idx = tl.max(tl.where((best == b) & (best_i == idx), best_x, NEG_INF), 0)
    tl.store(Tokens + s, idx.to(tl.int64))
    tl.store(Logprobs + s, x_idx - m_all - tl.log(total_all))


TARGET_PROGRAMS_PER_SM = 2  # sampling programs per SM: two 16-warp programs of 2048-entry chunks fit in one
MAX_SPLITS = 64  # programs per sample at most (the merge kernel is compiled for this many)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index) -> int:
    if device_index is None:  # CPU under TRITON_INTERPRET=1: a tiny pretend GPU
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_sample_splits(num_samples: int, vocab: int, block_v: int, sms: int) -> int:
    """Programs per sample: about TARGET_PROGRAMS_PER_SM per SM in all (a batch of 32 rows alone
    would leave 100 of an H200's 132 SMs idle, and one program takes ~0.1 ms to stream its
    600 KB row), at least one, at most one chunk of block_v entries per split. Measured on an
    H200 (benchmarks/exp_sample_splits.py; RESULTS.md, sixth session), against one program per
    row: batch 16 with 16 splits 5.4x faster, 32 with 8 3.3x, 64 with 4 2.0x, 128 with 2 1.1x;
    batch 256: one split, two programs per SM."""
    want = round(TARGET_PROGRAMS_PER_SM * sms / max(1, num_samples))
    return max(1, min(want, -(-vocab // block_v), MAX_SPLITS))


def sample(
    logits: torch.Tensor,  # [R, V] processed logits, last dim contiguous
    temperatures: torch.Tensor,  # [S] fp32, 0 = greedy
    rows: torch.Tensor | None = None,  # [S] int64 row of each sample (None: sample s reads row s)
    seeds: torch.Tensor | None = None,  # [S] int64 per-sample seeds (None: base_seed + s)
    base_seed: int = 0,
    block_v: int = 2048,
    splits: int | None = None,  # programs per sample (None: choose_sample_splits)
    num_warps: int | None = None,  # per program (None: 16 for chunks of 2048 entries or more, else 4)
    fast_log: bool | None = None,  # the noise's outer log by lg2.approx (None: on CUDA devices)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [S] int64 and their logprobs [S] fp32. No host sync: CUDA-graph and async safe.

    Tiling: BLOCK_V = 2048 entries per chunk with 16 warps (4 entries per thread, ~60 registers,
    so two programs share an SM): coalesced 16-byte loads, 75 chunks for a 151,936-entry
    vocabulary. On an H200 (sixth session) this ran 12 % faster at batch 256 than 4096-entry
    chunks (8 entries per thread, ~117 registers, one program per SM). Each thread keeps its own
    running state in registers and the program reduces once at the end, so the loop has no
    cross-warp reductions (a first version reduced every chunk and ran 5x slower than the
    memory allowed). A sample's row is split over several programs when there are too few
    samples to fill the GPU (choose_sample_splits); a second, tiny launch merges the splits.
    Every entry's noise depends on its column only, so the split changes no token.
    """
    R, V = logits.shape
    S = temperatures.shape[0]
    assert logits.stride(-1) == 1 and temperatures.dtype == torch.float32
    device = logits.device
    if rows is None:
        assert S <= R
        rows = torch.arange(S, dtype=torch.int64, device=device)
    tokens = torch.empty(S, dtype=torch.int64, device=device)
    logprobs = torch.empty(S, dtype=torch.float32, device=device)
    if S == 0:
        return tokens, logprobs
    block = max(16, min(block_v, triton.next_power_of_2(V)))
    if splits is None:
        splits = choose_sample_splits(S, V, block, _num_sms(logits.device.index if device.type == "cuda" else None))
    chunks = -(-V // block)
    splits = max(1, min(splits, chunks, MAX_SPLITS))
    split_len = -(-chunks // splits) * block
    splits = -(-V // split_len)  # no empty split
    if splits > 1:
        part = torch.empty((S, splits, 4), dtype=torch.float32, device=device)
        part_idx = torch.empty((S, splits), dtype=torch.int32, device=device)
    else:
        part, part_idx = logprobs, tokens  # unused
    _sample_kernel[(S, splits)](
        logits, rows, temperatures, seeds if seeds is not None else rows, tokens, logprobs, part, part_idx,
        logits.stride(0), V, split_len, splits, int(base_seed) % (2**30),
        HAS_SEEDS=seeds is not None, BLOCK_V=block, SPLIT=splits > 1,
        FAST_LOG=(device.type == "cuda" and libdevice is not None) if fast_log is None else fast_log,
        num_warps=num_warps or (16 if block >= 2048 else 4),
    )
    if splits > 1:
        _sample_merge_kernel[(S,)](part, part_idx, tokens, logprobs, V, splits, SPLITS_PAD=MAX_SPLITS, num_warps=1)
    return tokens, logprobs


def sampling_probs_ref(logits, temperatures, rows=None):
    """The distribution each sample is drawn from [S, V] float64: softmax(logits / T), or
    one-hot at the first argmax when T == 0."""
    rows = torch.arange(temperatures.shape[0]) if rows is None else rows.cpu()
    x = logits.cpu().double()[rows]
    t = temperatures.cpu().double()
    greedy = t == 0
    probs = torch.softmax(x / torch.where(greedy, 1.0, t)[:, None], dim=-1)
    onehot = torch.zeros_like(probs)
    onehot[torch.arange(len(rows)), x.argmax(-1)] = 1.0
    return torch.where(greedy[:, None], onehot, probs)
