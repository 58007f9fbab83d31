"""Sampler rules, pinned model-independently: every row's logits are forced through a
logits processor (or given directly), and the results are checked against hand-derived
token sequences and against torch.log_softmax of the expected processed logits."""
import math
import os

import pytest
import torch

import labengine.sampler as sampler_mod
from labengine.sampler import (Sampler, SamplingMetadata, SequenceGroupToSample,
                               apply_top_k_top_p, apply_truncation)
from labengine.sampling_params import SamplingParams
from labengine.sequence import Logprob, Sequence, SequenceGroup, SequenceStatus

V = 12
NEG = -float("inf")


def row(values: dict, default: float = -10.0) -> list[float]:
    r = [default] * V
    for k, v in values.items():
        r[k] = v
    return r


def forced(values) -> callable:
    t = torch.tensor(values, dtype=torch.float32)

    def proc(output_ids, logits):
        assert logits.shape == (V,)
        return t.clone()
    return proc


def make_group(params: SamplingParams, prompt=(1, 2, 3), seq_id=0, rid="0", outputs=()):
    seq = Sequence(seq_id, None, list(prompt))
    for tok in outputs:
        seq.append_token_id(tok, {tok: Logprob(0.0)}, 0.0)
    seq.status = SequenceStatus.RUNNING
    return SequenceGroup(rid, [seq], params, 0.0)


def build(groups) -> tuple[SamplingMetadata, int]:
    """One row per running sequence (plus prompt rows where prompt logprobs are due)."""
    to_sample, r = [], 0
    for sg in groups:
        seqs = [s for s in sg.get_seqs() if not s.is_finished()]
        is_prompt = seqs[0].get_output_len() == 0
        prows = []
        if (is_prompt and sg.sampling_params.prompt_logprobs is not None
                and sg.prompt_logprobs is None):
            n = len(sg.prompt_token_ids) - 1
            prows = list(range(r, r + n))
            r += n
        srows = list(range(r, r + len(seqs)))
        r += len(seqs)
        to_sample.append(SequenceGroupToSample(sg, [s.seq_id for s in seqs], is_prompt, prows,
                                               srows))
    return SamplingMetadata(groups=to_sample), r


def sample_once(sg, sampler=None, logits=None):
    meta, n = build([sg])
    sampler = sampler or Sampler(V)
    if logits is None:
        logits = torch.randn(n, V)
    return sampler(logits, meta)[0]


def greedy_tokens(steps, values, prompt=(7, 8), **kw):
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=100,
                            logits_processors=[forced(values)], **kw)
    sg = make_group(params, prompt=prompt)
    seq = sg.first_seq
    sampler = Sampler(V)
    for _ in range(steps):
        s = sample_once(sg, sampler).samples[0]
        seq.append_token_id(s.output_token, s.logprobs, s.logprob)
    return seq.output_token_ids


# ---------------------------------------------------------------- logits processors
def test_processors_get_lists_and_a_row_both_signatures():
    seen = []

    def two(out_ids, logits):
        seen.append(("two", list(out_ids), logits.shape))
        return logits + 0.0

    def three(prompt_ids, out_ids, logits):
        seen.append(("three", list(prompt_ids), list(out_ids), logits.shape))
        logits = logits.clone()
        logits[:] = -5.0
        logits[6] = 5.0
        return logits

    params = SamplingParams(temperature=0, logits_processors=[two, three])
    sg = make_group(params, prompt=[4, 5], outputs=[9])
    out = sample_once(sg)
    assert seen == [("two", [9], (V,)), ("three", [4, 5], [9], (V,))]
    assert out.samples[0].output_token == 6


def test_processors_do_not_touch_prompt_rows_or_the_callers_logits():
    params = SamplingParams(temperature=0, prompt_logprobs=0,
                            logits_processors=[forced(row({3: 9.0}))],
                            repetition_penalty=1.5, presence_penalty=1.0)
    sg = make_group(params, prompt=[1, 2, 3])
    logits = torch.randn(3, V)
    before = logits.clone()
    out = sample_once(sg, logits=logits)
    assert torch.equal(logits, before)
    assert out.samples[0].output_token == 3
    expected = torch.log_softmax(before[:2], dim=-1)
    assert [list(d)[0] for d in out.prompt_logprobs] == [2, 3]
    assert out.prompt_logprobs[0][2].logprob == pytest.approx(expected[0, 2].item(), abs=1e-6)
    assert out.prompt_logprobs[1][3].logprob == pytest.approx(expected[1, 3].item(), abs=1e-6)


def test_inference_tensors_from_the_model_are_accepted():
    with torch.inference_mode():
        logits = torch.randn(1, V)
    params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.3, min_tokens=2,
                            stop_token_ids=[1], logits_processors=[lambda o, r: r * 2])
    out = sample_once(make_group(params), logits=logits)
    assert len(out.samples) == 1


# ---------------------------------------------------------------- penalties
FREQ_ROW = row({0: 5.0, 1: 4.6, 2: 4.1, 3: 1.0})


def test_frequency_penalty_token_sequence():
    # 5.0, 4.6, 4.1 lose 1.0 per occurrence in the output: they take turns.
    assert greedy_tokens(7, FREQ_ROW, frequency_penalty=1.0) == [0, 1, 2, 0, 1, 2, 0]


def test_presence_penalty_token_sequence():
    # Presence costs 1.0 once: after all three appeared, 0 (4.0) wins for ever.
    assert greedy_tokens(7, FREQ_ROW, presence_penalty=1.0) == [0, 1, 2, 0, 0, 0, 0]


def test_frequency_and_presence_ignore_the_prompt():
    assert greedy_tokens(3, FREQ_ROW, prompt=(0, 0, 1), frequency_penalty=1.0,
                         presence_penalty=1.0) == [0, 1, 2]


def test_repetition_penalty_divides_positive_over_prompt_and_output():
    # 0 is in the prompt: 4.0 / 2 = 2.0 < 3.0, so 1 first; then 1 is in the output (1.5).
    r = row({0: 4.0, 1: 3.0, 2: 1.0})
    assert greedy_tokens(4, r, prompt=(0, 5), repetition_penalty=2.0) == [1, 0, 0, 0]
    # 0 not in the prompt: it wins once, then is halved (2.0) and 1 takes over.
    assert greedy_tokens(3, r, prompt=(5,), repetition_penalty=2.0) == [0, 1, 0]


def test_repetition_penalty_multiplies_negative():
    # 0 (-1.0) is in the prompt: -2.0 < -1.5, so 1 first; then 1 becomes -3.0.
    r = row({0: -1.0, 1: -1.5})
    assert greedy_tokens(3, r, prompt=(0,), repetition_penalty=2.0) == [1, 0, 0]


def test_penalty_values_exact():
    base = torch.tensor(row({0: 2.0, 1: -1.0, 2: 0.5, 3: 3.0, 4: -2.0}, default=0.25))
    params = SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.5,
                            presence_penalty=0.25, logprobs=V,
                            logits_processors=[forced(base.tolist())])
    # prompt has 0 and 1; output has 3 (twice), 4 once
    sg = make_group(params, prompt=[0, 1, 1], outputs=[3, 4, 3])
    expected = base.clone()
    expected[0] = 2.0 / 1.5
    expected[1] = -1.0 * 1.5
    expected[3] = 3.0 / 1.5 - 0.5 * 2 - 0.25
    expected[4] = -2.0 * 1.5 - 0.5 * 1 - 0.25
    ref = torch.log_softmax(expected, dim=-1)
    d = sample_once(sg).samples[0].logprobs
    for tok in range(V):
        assert d[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-5), tok


def test_penalties_are_per_sequence_in_a_batch():
    sampler = Sampler(V)
    pen = SamplingParams(temperature=0, frequency_penalty=2.0,
                         logits_processors=[forced(FREQ_ROW)])
    plain = SamplingParams(temperature=0, logits_processors=[forced(FREQ_ROW)])
    g1 = make_group(pen, outputs=[0], seq_id=0, rid="a")
    g2 = make_group(plain, outputs=[0], seq_id=1, rid="b")
    meta, n = build([g1, g2])
    out = sampler(torch.randn(n, V), meta)
    assert [o.samples[0].output_token for o in out] == [1, 0]


# ---------------------------------------------------------------- truncation
def run_processed(values, **kw) -> dict[int, Logprob]:
    params = SamplingParams(logprobs=V, logits_processors=[forced(values)], **kw)
    return sample_once(make_group(params)).samples[0].logprobs


def survivors(d: dict[int, Logprob]) -> set[int]:
    return {t for t, lp in d.items() if lp.logprob > NEG}


def log(p):
    return math.log(p) if p > 0 else NEG


PROBS = [0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4)
LOGP = [log(p) for p in PROBS]


@pytest.mark.parametrize("kw,expected", [
    (dict(top_k=2), {0, 1, 2}),                     # ties at the k-th value are kept
    (dict(top_k=1), {0}),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_k=1000), set(range(V))),              # clamped to the vocabulary
])
def test_top_k_survivors(kw, expected):
    assert survivors(run_processed(row({0: 5.0, 1: 4.0, 2: 4.0, 3: 1.0}, default=0.0), **kw)) \
        == expected


@pytest.fixture(params=[256, 2], ids=["candidates256", "candidates2"])
def candidates(request, monkeypatch):
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", request.param)
    return request.param


@pytest.mark.parametrize("top_p,expected", [
    (1.0, {0, 1, 2, 3}), (0.9, {0, 1, 2}), (0.6, {0, 1}), (0.45, {0}), (0.01, {0}),
])
def test_top_p_survivors(top_p, expected, candidates):
    assert survivors(run_processed(LOGP, top_p=top_p)) == expected


@pytest.mark.parametrize("min_p,expected", [
    (0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.35, {0, 1}), (0.9, {0}), (1.0, {0}),
])
def test_min_p_survivors(min_p, expected):
    assert survivors(run_processed(LOGP, min_p=min_p)) == expected


def test_top_p_is_applied_after_temperature():
    # T=2 flattens [0.5, 0.3, 0.15, 0.05] to [.379, .294, .208, .120]: the bottom two no
    # longer fit under 1 - 0.75.
    assert survivors(run_processed(LOGP, top_p=0.75)) == {0, 1}
    assert survivors(run_processed(LOGP, top_p=0.75, temperature=2.0)) == {0, 1, 2}


def test_min_p_is_relative_to_the_top_probability():
    # 0.3 / 0.5 = 0.6: kept for min_p just below, dropped just above; top-k does not change
    # the ratio (min_p runs after it on the renormalised distribution).
    assert survivors(run_processed(LOGP, min_p=0.59)) == {0, 1}
    assert survivors(run_processed(LOGP, min_p=0.61)) == {0}
    assert survivors(run_processed(LOGP, min_p=0.59, top_k=3)) == {0, 1}
    assert survivors(run_processed(LOGP, min_p=0.61, top_k=3)) == {0}


def reference_processed(values, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """Pure-Python float64 reference of temperature -> top-k -> top-p -> min-p."""
    x = [v / temperature for v in values]

    def softmax(z):
        m = max(z)
        e = [math.exp(v - m) if v > NEG else 0.0 for v in z]
        s = sum(e)
        return [v / s for v in e]

    if top_k != -1:
        kth = sorted(x, reverse=True)[min(top_k, len(x)) - 1]
        x = [v if v >= kth else NEG for v in x]
    p = softmax(x)
    order = sorted(range(len(x)), key=lambda i: x[i])
    cum = 0.0
    for i in order[:-1]:
        cum += p[i]
        if cum <= 1 - top_p:
            x[i] = NEG
    p = softmax(x)
    m = max(p)
    x = [v if pi >= min_p * m else NEG for v, pi in zip(x, p)]
    p = softmax(x)
    return [math.log(v) if v > 0 else NEG for v in p]


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05),
    dict(temperature=1.3, top_k=8, top_p=0.95),
    dict(temperature=0.5, top_p=0.7),
    dict(temperature=2.0, min_p=0.3),
    dict(temperature=1.0, top_k=4),
])
def test_processed_logprobs_match_reference(kw, candidates):
    values = [3.1, 2.3, 0.4, -1.2, 1.7, 2.9, 0.0, -0.6, 1.1, 0.9, -3.0, 2.0]
    d = run_processed(values, **kw)
    ref = reference_processed(values, **kw)
    assert survivors(d) == {i for i, v in enumerate(ref) if v > NEG}
    for tok in range(V):
        if ref[tok] > NEG:
            assert d[tok].logprob == pytest.approx(ref[tok], abs=1e-5)


def test_apply_top_k_top_p_rowwise():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2, 4]), torch.tensor([1.0, 0.5]))
    assert torch.isinf(out[0]).tolist() == [True, True, False, False]
    assert torch.isinf(out[1]).tolist() == [False, True, True, True]


@pytest.mark.parametrize("candidates", [1, 3, 8, 256])
def test_apply_truncation_matches_the_one_sort_version(monkeypatch, candidates):
    """The fast path (topk candidates) keeps exactly what vLLM's full sort keeps."""
    monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(0)
    n, vocab = 300, 40
    x = torch.randn(n, vocab, generator=g) * 2.5
    choice = lambda opts: opts[int(torch.randint(len(opts), (1,), generator=g))]  # noqa: E731
    ks = [choice([1, 2, 3, 5, 8, 20, vocab]) for _ in range(n)]
    ps = [choice([1.0, 0.05, 0.3, 0.5, 0.8, 0.9, 0.99]) for _ in range(n)]
    for i in range(0, n, 7):  # ties at the top, with top-k only (top-p among ties is
        x[i, :6] = x[i, 0]    # decided by sort position, in vLLM too)
        ps[i] = 1.0
    ref = apply_top_k_top_p(x.clone(), torch.tensor(ks), torch.tensor(ps))
    got = apply_truncation(x.clone(), ks, ps)
    assert torch.equal(torch.isinf(ref), torch.isinf(got))
    kept = ~torch.isinf(ref)
    assert torch.equal(ref[kept], got[kept])
    assert torch.equal(got[kept], x[kept])


# ---------------------------------------------------------------- min_tokens
def test_min_tokens_masks_eos_and_stop_ids():
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4], logprobs=2,
                            logits_processors=[forced(row({11: 9.0, 4: 8.0, 2: 7.0, 5: 1.0}))])
    params.all_stop_token_ids.add(5)  # what the engine may add (e.g. generation_config EOS)
    sampler = Sampler(V, eos_token_ids={11})
    sg = make_group(params)
    seq = sg.first_seq
    for step in range(3):
        s = sample_once(sg, sampler).samples[0]
        assert s.output_token == 2
        assert s.logprobs[2].rank == 1
        meta, n = build([sg])
        assert seq.get_output_len() == step
        seq.append_token_id(s.output_token, s.logprobs, s.logprob)
    # With 3 tokens out, nothing is masked any more: EOS (the top logit) wins.
    s = sample_once(sg, sampler).samples[0]
    assert s.output_token == 11


def test_min_tokens_mask_values():
    params = SamplingParams(min_tokens=1, stop_token_ids=[4], logprobs=V,
                            logits_processors=[forced(row({11: 2.0, 4: 1.0}, default=0.0))])
    params.all_stop_token_ids.add(6)
    d = sample_once(make_group(params), Sampler(V, eos_token_ids=[11])).samples[0].logprobs
    assert survivors(d) == set(range(V)) - {4, 6, 11}
    assert d[0].logprob == pytest.approx(math.log(1 / 9), abs=1e-6)


# ---------------------------------------------------------------- logprobs format
def test_logprobs_values_and_ranks():
    values = [0.3, 2.0, -1.0, 1.5, 0.0, 2.5, -0.5, 1.0, 0.7, -2.0, 0.1, 0.2]
    ref = torch.log_softmax(torch.tensor(values), dim=-1)
    for seed in range(5):
        params = SamplingParams(logprobs=3, seed=seed, logits_processors=[forced(values)])
        s = sample_once(make_group(params)).samples[0]
        keys = list(s.logprobs)
        assert keys[0] == s.output_token  # sampled first
        assert s.logprob == pytest.approx(ref[s.output_token].item(), abs=1e-6)
        rank = 1 + int((ref > ref[s.output_token]).sum())
        assert s.logprobs[s.output_token].rank == (rank if s.output_token not in (5, 1, 3)
                                                   else {5: 1, 1: 2, 3: 3}[s.output_token])
        top = {5: 1, 1: 2, 3: 3}
        for tok, r in top.items():
            assert s.logprobs[tok].rank == r
            assert s.logprobs[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-6)
        assert len(s.logprobs) == (3 if s.output_token in top else 4)
        assert keys[1:] == [t for t in (5, 1, 3) if t != s.output_token] or keys == [5, 1, 3]


def test_sampled_token_rank_outside_top_k():
    values = row({0: 3.0, 1: 2.0, 2: 1.0, 3: 0.5}, default=-5.0)
    forced_pick = lambda o, r: torch.tensor(values)  # noqa: E731
    # Greedy on a row where the top is masked by min_tokens: the sampled token is 1, rank 1
    # among the processed logprobs (EOS 0 is -inf).
    params = SamplingParams(temperature=0, logprobs=1, min_tokens=1, stop_token_ids=[0],
                            logits_processors=[forced_pick])
    s = sample_once(make_group(params)).samples[0]
    assert s.output_token == 1 and s.logprobs[1].rank == 1 and list(s.logprobs) == [1]


def test_logprobs_zero_and_none():
    values = row({3: 2.0, 5: 1.0})
    s = sample_once(make_group(SamplingParams(temperature=0, logprobs=0,
                                              logits_processors=[forced(values)]))).samples[0]
    assert list(s.logprobs) == [3] and s.logprobs[3].rank == 1
    s = sample_once(make_group(SamplingParams(temperature=0,
                                              logits_processors=[forced(values)]))).samples[0]
    assert list(s.logprobs) == [3]
    ref = torch.log_softmax(torch.tensor(values), -1)[3].item()
    assert s.logprob == pytest.approx(ref, abs=1e-6)
    assert s.logprobs[3].logprob == s.logprob


def test_random_request_without_logprobs_gets_the_processed_logprob():
    values = [0.3, 2.0, -1.0, 1.5, 0.0, 2.5, -0.5, 1.0, 0.7, -2.0, 0.1, 0.2]
    ref = torch.log_softmax(torch.tensor(values) / 0.8, dim=-1)
    for seed in range(5):
        params = SamplingParams(temperature=0.8, seed=seed, logits_processors=[forced(values)])
        s = sample_once(make_group(params)).samples[0]
        assert list(s.logprobs) == [s.output_token]
        assert s.logprob == pytest.approx(ref[s.output_token].item(), abs=1e-6)


def test_greedy_logprobs_use_temperature_one_and_top_k_one_gives_zero():
    values = row({3: 2.0, 5: 1.0, 6: 0.5})
    s = sample_once(make_group(SamplingParams(temperature=0, logprobs=2,
                                              logits_processors=[forced(values)]))).samples[0]
    ref = torch.log_softmax(torch.tensor(values), -1)
    assert s.logprobs[5].logprob == pytest.approx(ref[5].item(), abs=1e-6)
    s = sample_once(make_group(SamplingParams(top_k=1, logprobs=1,
                                              logits_processors=[forced(values)]))).samples[0]
    assert s.output_token == 3 and s.logprob == 0.0


def test_temperature_scales_logprobs():
    values = row({3: 2.0, 5: 1.0, 6: 0.5})
    s = sample_once(make_group(SamplingParams(temperature=0.5, logprobs=2, seed=0,
                                              logits_processors=[forced(values)]))).samples[0]
    ref = torch.log_softmax(torch.tensor(values) / 0.5, -1)
    for tok in (3, 5):
        assert s.logprobs[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-5)


def test_prompt_logprobs():
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=0.5, top_k=5, prompt_logprobs=2, repetition_penalty=2.0,
                            logits_processors=[forced(row({0: 1.0}))], seed=1)
    sg = make_group(params, prompt=prompt)
    meta, n = build([sg])
    assert meta.groups[0].prompt_logprob_rows == [0, 1, 2, 3]
    logits = torch.randn(n, V)
    out = Sampler(V)(logits, meta)[0]
    assert len(out.prompt_logprobs) == len(prompt) - 1
    # temperature and top-k apply to prompt rows; penalties and processors do not.
    for j, d in enumerate(out.prompt_logprobs):
        x = logits[j] / 0.5
        kth = torch.topk(x, 5).values[-1]
        x = torch.where(x >= kth, x, torch.tensor(NEG))
        ref = torch.log_softmax(x, -1)
        target = prompt[j + 1]
        keys = list(d)
        assert keys[0] == target
        assert d[target].logprob == pytest.approx(ref[target].item(), abs=1e-5)
        top2 = torch.topk(ref, 2).indices.tolist()
        for r, tok in enumerate(top2):
            assert d[tok].rank == r + 1
        if target not in top2:
            assert d[target].rank == 1 + int((ref > ref[target]).sum())
            assert len(d) == 3


# ---------------------------------------------------------------- random sampling & seeds
# "kernel" is the Triton sampling kernel (under TRITON_INTERPRET=1 without a GPU: conftest.py)
METHODS = ["exponential", "inverse_cdf", "kernel"]


def make_sampler(method="auto", **kw):
    kernels = None
    if method == "kernel":
        if os.environ.get("TRITON_INTERPRET") != "1":  # these tests sample CPU logits
            pytest.skip("the kernel method on CPU logits needs TRITON_INTERPRET=1 "
                        "(on a GPU, tests/kernels/test_sampling.py runs it on CUDA)")
        from labengine.attention.triton_backend import kernels
    return Sampler(V, sampling_method=method, kernels=kernels, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_random_sampling_follows_the_distribution(method):
    torch.manual_seed(0)
    # the interpreter runs the kernel's one program per sample at ~75 per second
    draws, tol = (600, 0.07) if method == "kernel" and not torch.cuda.is_available() else (4000, 0.03)
    params = SamplingParams(n=1, best_of=draws, logits_processors=[forced(LOGP)])
    out = sample_once(make_group(params), make_sampler(method))
    toks = [s.output_token for s in out.samples]
    assert len(toks) == draws
    assert all(s.parent_seq_id == 0 for s in out.samples)
    freq = [toks.count(t) / draws for t in range(4)]
    for f, p in zip(freq, PROBS[:4]):
        assert abs(f - p) < tol
    assert set(toks) <= {0, 1, 2, 3}


@pytest.mark.parametrize("method", METHODS)
def test_masked_tokens_are_never_sampled(method):
    torch.manual_seed(1)
    # the last token is masked (-inf) and tokens 0..1 carry almost nothing
    values = row({0: -30.0, 1: -30.0, 5: 2.0, 7: 2.0, 9: 1.0, V - 1: NEG}, default=0.0)
    params = SamplingParams(n=1, best_of=3000 if method != "kernel" else 300, top_k=3,
                            logits_processors=[forced(values)])
    out = sample_once(make_group(params), make_sampler(method))
    assert {s.output_token for s in out.samples} == {5, 7, 9}


def test_sampling_method_is_validated():
    with pytest.raises(ValueError, match="sampling_method must be one of"):
        Sampler(V, sampling_method="gumbel")
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        Sampler(V, sampling_method="kernel")


def test_greedy_is_argmax_in_a_mixed_batch():
    values = [0.1 * i for i in range(V)]
    g = make_group(SamplingParams(temperature=0, logits_processors=[forced(values)]), seq_id=0)
    r = make_group(SamplingParams(temperature=1.0), seq_id=1, rid="1")
    meta, n = build([r, g])
    for _ in range(5):
        out = Sampler(V)(torch.randn(n, V), meta)
        assert out[1].samples[0].output_token == V - 1


SEED_LOGITS = torch.randn(20, V, generator=torch.Generator().manual_seed(123))


def seeded_run(position: int, companions: list, steps=8, best_of=1, global_seed=0,
               method="auto"):
    """Runs the seeded target (seed 7) with companions around it; returns its tokens."""
    torch.manual_seed(global_seed)
    target = make_group(SamplingParams(seed=7, temperature=0.9, n=best_of, best_of=best_of),
                        seq_id=1000, rid="target")
    groups = list(companions)
    groups.insert(position, target)
    sampler = make_sampler(method)
    tokens = []
    for step in range(steps):
        meta, n = build(groups)
        logits = torch.randn(n, V)
        t_rows = meta.groups[position].sample_rows
        logits[t_rows] = SEED_LOGITS[step]
        out = sampler(logits, meta)
        samples = out[position].samples
        tokens.append([(s.output_token, s.logprob) for s in samples])
        for g, o in zip(groups, out):
            for s in o.samples[:1]:
                g.find(s.parent_seq_id).append_token_id(s.output_token, s.logprobs, s.logprob)
    return tokens


def companions():
    return [make_group(SamplingParams(seed=3, logprobs=2), seq_id=1, rid="a"),
            make_group(SamplingParams(), seq_id=2, rid="b"),
            make_group(SamplingParams(temperature=0), seq_id=3, rid="c"),
            make_group(SamplingParams(seed=7, top_k=3), seq_id=4, rid="d"),
            make_group(SamplingParams(n=3, best_of=3, seed=11), seq_id=5, rid="e")]


@pytest.mark.parametrize("method", METHODS)
def test_seed_reproducible_alone_and_in_mixed_batches(method):
    alone = seeded_run(0, [], method=method)
    assert len({tuple(t) for t in alone}) > 1  # it does sample
    assert seeded_run(0, companions(), method=method) == alone
    assert seeded_run(3, companions(), global_seed=5, method=method) == alone
    assert seeded_run(5, companions(), global_seed=9, method=method) == alone
    assert seeded_run(2, companions()[:3], method=method) == alone


@pytest.mark.parametrize("method", METHODS)
def test_seed_reproducible_with_best_of(method):
    alone = seeded_run(0, [], steps=1, best_of=3, method=method)
    assert len(alone[0]) == 3
    assert seeded_run(4, companions(), steps=1, best_of=3, global_seed=1, method=method) == alone


@pytest.mark.parametrize("method", METHODS)
def test_unseeded_requests_follow_the_global_rng(method):
    def run(seed):
        torch.manual_seed(seed)
        sg = make_group(SamplingParams(n=1, best_of=20))
        return [s.output_token for s in sample_once(sg, make_sampler(method),
                                                     logits=torch.zeros(1, V)).samples]
    a, b = run(42), run(42)
    assert a == b and len(set(a)) > 1
    assert run(43) != a


# ---------------------------------------------------------------- best_of / beam at the sampler
def test_best_of_prompt_step_samples_from_the_single_row():
    params = SamplingParams(n=2, best_of=3, seed=0, logprobs=1,
                            logits_processors=[forced(LOGP)])
    out = sample_once(make_group(params, seq_id=5))
    assert len(out.samples) == 3 and all(s.parent_seq_id == 5 for s in out.samples)
    # After the fork, each sequence has its own row and gets one sample.
    sg = make_group(params, seq_id=5, outputs=[0])
    child = sg.first_seq.fork(6)
    sg.add(child)
    meta, n = build([sg])
    assert meta.groups[0].is_prompt is False
    out = Sampler(V)(torch.zeros(n, V), meta)[0]
    assert [s.parent_seq_id for s in out.samples] == [5, 6]


def test_beam_prompt_step_takes_top_2w():
    values = [0.5, 3.0, 2.0, 1.0, 4.0, -1.0, 0.0, 0.2, 0.1, -2.0, -3.0, 2.5]
    params = SamplingParams(use_beam_search=True, best_of=2, n=2, temperature=0,
                            logits_processors=[forced(values)])
    out = sample_once(make_group(params, seq_id=3))
    ref = torch.log_softmax(torch.tensor(values), -1)
    assert [s.output_token for s in out.samples] == [4, 1, 11, 2]
    assert all(s.parent_seq_id == 3 for s in out.samples)
    for s in out.samples:
        assert s.logprob == pytest.approx(ref[s.output_token].item(), abs=1e-6)


def test_beam_later_step_top_2w_over_cumulative_plus_next():
    rows = {
        (1,): [0.0] * V,                             # flat: each token log(1/12) = -2.4849
        (2,): row({5: 5.0, 6: 4.0, 7: 3.0}, 0.0),
    }

    def proc(out_ids, logits):
        return torch.tensor(rows[tuple(out_ids)])

    params = SamplingParams(use_beam_search=True, best_of=2, temperature=0,
                            logits_processors=[proc])
    sg = make_group(params, seq_id=0, outputs=[1])
    sg.first_seq.cumulative_logprob = -0.1
    other = Sequence(1, None, [1, 2, 3])
    other.append_token_id(2, {2: Logprob(-2.0)}, -2.0)
    other.status = SequenceStatus.RUNNING
    sg.add(other)
    meta, n = build([sg])
    out = Sampler(V)(torch.zeros(n, V), meta)[0]
    lp2 = torch.log_softmax(torch.tensor(rows[(2,)]), -1)
    flat = math.log(1 / V)
    cands = [(-0.1 + flat, 0, t) for t in range(V)] + \
            [(-2.0 + lp2[t].item(), 1, t) for t in range(V)]
    cands.sort(key=lambda c: -c[0])
    # seq 1's token 5 (-2.0 - 0.37) beats every flat continuation of seq 0 (-2.58)
    assert (out.samples[0].parent_seq_id, out.samples[0].output_token) == (1, 5)
    assert [s.parent_seq_id for s in out.samples[1:]] == [0, 0, 0]
    assert out.samples[0].logprob == pytest.approx(lp2[5].item(), abs=1e-6)
    assert out.samples[1].logprob == pytest.approx(flat, abs=1e-6)
    assert [c[0] for c in cands[:4]] == pytest.approx(
        [(-2.0 if s.parent_seq_id == 1 else -0.1) + s.logprob for s in out.samples], abs=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_logits_are_sampled_in_float32(method):
    """Models return logits in their own dtype; every method samples from their float32 values."""
    torch.manual_seed(4)
    logits = (torch.randn(2, V) * 3).to(torch.bfloat16)
    greedy = make_group(SamplingParams(temperature=0), seq_id=0)
    rand = make_group(SamplingParams(temperature=0.7, seed=1), seq_id=1, rid="1")
    meta, _ = build([greedy, rand])
    out = make_sampler(method)(logits, meta)
    ref = torch.log_softmax(logits.float(), dim=-1)
    g = out[0].samples[0]
    assert g.output_token == int(logits[0].float().argmax())
    assert g.logprob == pytest.approx(float(ref[0, g.output_token]), abs=1e-5)
    r = out[1].samples[0]
    assert r.logprob == pytest.approx(float(torch.log_softmax(logits[1].float() / 0.7, -1)[r.output_token]), abs=1e-5)
