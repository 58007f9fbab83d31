"""The one-pass sampling kernel: greedy rows exactly torch.argmax, random rows drawn from
softmax(logits / T) (empirical frequencies over many seeds vs the reference distribution),
logprobs equal to log_softmax at the sampled token, seeds reproducible."""
from __future__ import annotations

import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, DT_IDS, requires_cuda

from labengine.kernels.sampling import sample, sampling_probs_ref


def check_logprobs(logits, temps, rows, tokens, logprobs, atol=2e-5):
    x = logits.cpu().double()[rows.cpu()]
    t = temps.cpu().double()
    t = torch.where(t == 0, 1.0, t)
    ref = torch.log_softmax(x / t[:, None], dim=-1).gather(1, tokens.cpu()[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.cpu().double(), ref, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("V", [7, 1000, 5000])  # one partial chunk, several chunks (block_v 1024 below)
def test_greedy_is_argmax_with_its_logprob(V, dtype):
    gen = torch.Generator().manual_seed(V)
    logits = (torch.randn(6, V, generator=gen) * 4).to(dtype)
    logits[2, 3] = logits[2, V - 1] = logits[2].max() + 1  # a tie: the first index wins, as torch.argmax
    logits = logits.to(DEVICE)
    temps = torch.zeros(6, device=DEVICE)
    tokens, logprobs = sample(logits, temps, block_v=1024)
    assert tokens.tolist() == logits.float().argmax(-1).tolist()
    assert tokens[2].item() == 3
    check_logprobs(logits, temps, torch.arange(6), tokens, logprobs)


def test_random_rows_follow_softmax_over_temperature():
    gen = torch.Generator().manual_seed(1)
    V, S = 12, 800  # (one program per sample: the interpreter runs ~50 per second)
    logits = (torch.randn(2, V, generator=gen) * 2).to(DEVICE)
    logits[1, 5] = float("-inf")  # a masked entry (top-k/top-p) is never drawn
    rows = torch.arange(S, device=DEVICE) % 2
    temps = torch.where(rows == 0, 0.5, 2.0).float()  # row 0 sharpened, row 1 flattened
    tokens, logprobs = sample(logits, temps, rows=rows, base_seed=123)
    probs = sampling_probs_ref(logits, temps[:2])
    for r in range(2):
        got = torch.bincount(tokens[rows == r].cpu(), minlength=V).double() / (S // 2)
        # 400 draws per row: each frequency within ~4.5 sigma of its probability
        sigma = (probs[r] * (1 - probs[r]) / (S // 2)).sqrt()
        assert ((got - probs[r]).abs() <= 4.5 * sigma + 1e-3).all(), (got, probs[r])
    assert (tokens[rows == 1] != 5).all()
    check_logprobs(logits, temps, rows, tokens, logprobs)


def test_seeds_reproduce_and_differ():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3000, generator=gen).to(DEVICE)
    temps = torch.ones(4, device=DEVICE)
    seeds = torch.tensor([11, 12, 11, 99], device=DEVICE)
    rows = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    draws = [sample(logits, temps, rows=rows, seeds=seeds, block_v=1024)[0].tolist() for _ in range(2)]
    assert draws[0] == draws[1]  # same seeds, same tokens
    assert draws[0][0] == draws[0][2]  # same row, same seed
    many = sample(logits, torch.ones(64, device=DEVICE), rows=torch.zeros(64, dtype=torch.int64, device=DEVICE),
                  seeds=torch.arange(64, device=DEVICE))[0]
    assert len(set(many.tolist())) > 20  # different seeds draw different tokens from a flat-ish row
    a = sample(logits, temps, base_seed=5)[0]
    b = sample(logits, temps, base_seed=5)[0]
    assert torch.equal(a, b)


def test_mixed_greedy_and_random_rows_and_empty():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 500, generator=gen).to(DEVICE)
    temps = torch.tensor([0.0, 0.7, 0.0], device=DEVICE)
    tokens, logprobs = sample(logits, temps, base_seed=9)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    check_logprobs(logits, temps, torch.arange(3), tokens, logprobs)
    t, lp = sample(logits, torch.zeros(0, device=DEVICE))
    assert t.shape == (0,) and lp.shape == (0,)


@requires_cuda
def test_sample_real_vocab():
    """256 rows of Qwen3's 151,936-entry vocabulary: greedy exact, random rows' logprobs exact."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(256, 151936, device=DEVICE, generator=gen) * 3
    temps = torch.where(torch.arange(256, device=DEVICE) % 2 == 0, 0.0, 0.6).float()
    tokens, logprobs = sample(logits, temps, base_seed=1)
    assert torch.equal(tokens[::2], logits[::2].argmax(-1))
    check_logprobs(logits, temps, torch.arange(256), tokens, logprobs, atol=1e-4)


@pytest.mark.parametrize("V", [5000, 4096 * 3])  # a partial last split; whole splits
def test_splits_change_no_token(V):
    """A row split over several programs (a small batch) draws the very tokens of one program
    per row (each entry's noise depends on its column only) with the same logprobs; greedy rows,
    masked entries and a row whose best entries sit in different splits included."""
    gen = torch.Generator().manual_seed(V)
    logits = (torch.randn(5, V, generator=gen) * 3).to(DEVICE)
    logits[1, : V // 2] = float("-inf")  # the first splits of row 1 see only masked entries
    logits[3, 10] = logits[3, V - 5] = logits[3].max() + 2  # greedy tie across splits: the first wins
    temps = torch.tensor([1.0, 0.7, 1.3, 0.0, 0.5], device=DEVICE)
    rows = torch.tensor([0, 1, 2, 3, 4, 0, 2], device=DEVICE)
    temps7 = temps[rows]
    one = sample(logits, temps7, rows=rows, base_seed=11, block_v=1024, splits=1)
    for splits in (2, 3, 5, None):
        got = sample(logits, temps7, rows=rows, base_seed=11, block_v=1024, splits=splits)
        assert got[0].tolist() == one[0].tolist(), splits
        torch.testing.assert_close(got[1], one[1], atol=1e-5, rtol=1e-5)
    assert one[0][3].item() == 10
    check_logprobs(logits, temps7, rows, one[0], one[1])
    # smaller chunks (another tiling, as the launcher may pick) change no token either
    for block_v, warps in ((512, 4), (256, 2)):
        got = sample(logits, temps7, rows=rows, base_seed=11, block_v=block_v, splits=3, num_warps=warps)
        assert got[0].tolist() == one[0].tolist(), block_v
        torch.testing.assert_close(got[1], one[1], atol=1e-5, rtol=1e-5)


@requires_cuda
def test_fast_outer_log_draws_the_exact_logs_tokens():
    """On the GPU the noise's outer log is lg2.approx (fast_log, the default there); its error is
    far below a logit's rounding, so the same seeds draw the same tokens as the exact log but
    for near-ties (at most one row in a thousand here), with the same logprobs."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    logits = torch.randn(256, 151936, device=DEVICE, generator=gen) * 3
    temps = torch.full((256,), 0.6, device=DEVICE)
    same = 0
    for seed in range(4):
        fast = sample(logits, temps, base_seed=seed)
        exact = sample(logits, temps, base_seed=seed, fast_log=False)
        equal = fast[0] == exact[0]
        same += int(equal.sum())
        torch.testing.assert_close(fast[1][equal], exact[1][equal], atol=1e-5, rtol=1e-5)
    assert same >= 1023, same


def test_choose_sample_splits():
    from labengine.kernels.sampling import choose_sample_splits

    # two programs per SM: 264 on an H200's 132 SMs
    assert choose_sample_splits(256, 151936, 2048, 132) == 1
    assert choose_sample_splits(128, 151936, 2048, 132) == 2
    assert choose_sample_splits(64, 151936, 2048, 132) == 4
    assert choose_sample_splits(32, 151936, 2048, 132) == 8
    assert choose_sample_splits(1, 151936, 2048, 132) == 64  # at most MAX_SPLITS
    assert choose_sample_splits(1, 100000, 4096, 132) == 25  # at most one chunk per program
    assert choose_sample_splits(4, 1000, 2048, 132) == 1  # a vocabulary of one chunk
