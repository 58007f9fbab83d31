"""OutputProcessor + RequestOutput, driven step by step with a fake scheduler: forking for
best_of, top-n by cumulative logprob, streamed text hold-back, stop handling end to end,
prompt logprobs, beam search (ordering by length-penalised score, early_stopping variants)
and the reprs learners print."""
import itertools
import math

import pytest
import torch

from labengine.detokenizer import Detokenizer, StopChecker
from labengine.output_processor import OutputProcessor
from labengine.outputs import CompletionOutput, RequestOutput, beam_search_score
from labengine.sampler import Sampler, SamplingMetadata, SequenceGroupToSample
from labengine.sampling_params import SamplingParams
from labengine.sequence import Logprob, RequestMetrics, Sequence, SequenceGroup, SequenceStatus

from fake_tokenizer import FakeTokenizer

V = 12
EOS = 0

TOK = FakeTokenizer()


class FakeScheduler:
    def __init__(self):
        self.forks: list[tuple[int, int]] = []
        self.frees: list[int] = []

    def fork_seq(self, parent, child):
        assert not child.is_finished()
        self.forks.append((parent.seq_id, child.seq_id))

    def free_seq(self, seq):
        assert seq.seq_id not in self.frees, "freed twice"
        self.frees.append(seq.seq_id)


class Engine:
    """The smallest loop around Sampler + OutputProcessor (what LLMEngine.step does)."""

    def __init__(self, max_model_len=100):
        self.scheduler = FakeScheduler()
        self.sampler = Sampler(V, eos_token_ids={EOS})
        self.stop_checker = StopChecker(max_model_len, TOK, {EOS})
        self.processor = OutputProcessor(self.scheduler, Detokenizer(TOK), self.stop_checker,
                                         itertools.count(1))

    def step(self, groups, logits=None):
        to_sample, r = [], 0
        for sg in groups:
            seqs = sg.get_seqs(SequenceStatus.RUNNING)
            if not seqs:
                continue
            is_prompt = seqs[0].get_output_len() == 0
            prows = []
            if (is_prompt and sg.sampling_params.prompt_logprobs is not None
                    and sg.prompt_logprobs is None):
                prows = list(range(r, r + len(sg.prompt_token_ids) - 1))
                r += len(prows)
            srows = list(range(r, r + len(seqs)))
            r += len(seqs)
            to_sample.append(SequenceGroupToSample(sg, [s.seq_id for s in seqs], is_prompt,
                                                   prows, srows))
        if logits is None:
            logits = torch.randn(r, V)
        out = self.sampler(logits, SamplingMetadata(groups=to_sample))
        for g in to_sample:
            for s in g.seq_group.get_seqs(SequenceStatus.RUNNING):
                s.num_computed_tokens = s.get_len()
        self.processor.process_outputs(to_sample, out)
        return [RequestOutput.from_seq_group(sg) for sg in groups]

    def run(self, sg, max_steps=50):
        outs = []
        while not sg.is_finished() and len(outs) < max_steps:
            outs.append(self.step([sg])[0])
        return outs


def new_group(params, prompt=(1, 2), rid="0"):
    seq = Sequence(0, None, list(prompt))
    seq.status = SequenceStatus.RUNNING
    return SequenceGroup(rid, [seq], params, 0.0)


def forced_by_step(table: dict, default=None):
    """Processor choosing the row from the output length: table[len] = {token: logit}."""
    def proc(out_ids, logits):
        spec = table.get(len(out_ids), default)
        r = torch.full((V,), -10.0)
        for t, v in spec.items():
            r[t] = v
        return r
    return proc


def only(token):
    return {token: 10.0}


# ---------------------------------------------------------------- single sequence
def test_greedy_run_to_max_tokens():
    params = SamplingParams(temperature=0, max_tokens=4,
                            logits_processors=[forced_by_step({}, default=only(4))])
    outs = Engine().run(new_group(params))
    assert len(outs) == 4
    final = outs[-1]
    assert final.finished and final.request_id == "0" and final.prompt is None
    assert final.prompt_token_ids == [1, 2] and final.prompt_logprobs is None
    (c,) = final.outputs
    assert c.index == 0 and c.token_ids == [4, 4, 4, 4] and c.text == "abababab"
    assert c.finish_reason == "length" and c.stop_reason is None and c.finished()
    # cumulative_logprob is a float even without logprobs (the lab's deliberate choice)
    assert isinstance(c.cumulative_logprob, float) and c.cumulative_logprob <= 0.0
    assert c.logprobs is None
    assert [o.finished for o in outs] == [False, False, False, True]


def test_logprobs_in_the_output_align_with_tokens():
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                            logits_processors=[forced_by_step({}, default={4: 2.0, 5: 1.0})])
    c = Engine().run(new_group(params))[-1].outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 3
    ref = torch.log_softmax(torch.tensor([-10.0] * 4 + [2.0, 1.0] + [-10.0] * 6), -1)
    for d in c.logprobs:
        assert list(d) == [4, 5]
        assert d[4] == Logprob(pytest.approx(ref[4].item(), abs=1e-6), 1, "ab")
        assert d[5].rank == 2 and d[5].decoded_token == "cd"
    assert c.cumulative_logprob == pytest.approx(3 * ref[4].item(), abs=1e-5)


def test_eos_end_to_end_and_blocks_freed():
    params = SamplingParams(temperature=0, max_tokens=10,
                            logits_processors=[forced_by_step({0: only(4), 1: only(EOS)})])
    eng = Engine()
    sg = new_group(params)
    outs = eng.run(sg)
    c = outs[-1].outputs[0]
    assert c.token_ids == [4, EOS] and c.text == "ab"
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert eng.scheduler.frees == [0] and eng.scheduler.forks == []


def test_min_tokens_against_eos_and_stop_ids_end_to_end():
    for stop_kw, reason in ((dict(), None), (dict(stop_token_ids=[10]), 10)):
        top = EOS if reason is None else 10
        params = SamplingParams(temperature=0, min_tokens=3, max_tokens=10, **stop_kw,
                                logits_processors=[forced_by_step({}, default={top: 9.0, 6: 1.0})])
        c = Engine().run(new_group(params))[-1].outputs[0]
        assert c.token_ids == [6, 6, 6, top]
        assert c.text == "eee" and c.finish_reason == "stop" and c.stop_reason == reason


def test_stop_string_end_to_end_and_streaming_hold_back():
    table = {0: only(1), 1: only(4), 2: only(5), 3: only(4), 4: only(10), 5: only(8), 6: only(6)}
    params = SamplingParams(temperature=0, stop=["xySTOP", "zzz"], max_tokens=20,
                            logits_processors=[forced_by_step(table)])
    assert params.output_text_buffer_length == 5
    outs = Engine().run(new_group(params))
    texts = [o.outputs[0].text for o in outs]
    full = ["a", "aab", "aabcd", "aabcdab", "aabcdabxy"]
    assert texts[:5] == [t[:-5] for t in full]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)  # never backtracks
    final = outs[-1].outputs[0]
    assert final.text == "aabcdab" and final.stop_reason == "xySTOP"
    assert final.token_ids == [1, 4, 5, 4, 10, 8]
    # with include_stop_str_in_output nothing is held back
    params = SamplingParams(temperature=0, stop=["xySTOP"], include_stop_str_in_output=True,
                            max_tokens=20, logits_processors=[forced_by_step(table)])
    outs = Engine().run(new_group(params))
    assert [o.outputs[0].text for o in outs[:3]] == ["a", "aab", "aabcd"]
    assert outs[-1].outputs[0].text == "aabcdabxySTOP"


def test_prompt_logprobs_stored_with_leading_none_and_decoded():
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    sg = new_group(params, prompt=(4, 5, 6))
    eng = Engine()
    logits = torch.full((3, V), -5.0)
    logits[0, 5] = 3.0  # row 0 predicts prompt token 1 (= 5): rank 1
    logits[1, 11] = 3.0
    logits[1, 6] = 2.0  # row 1 predicts prompt token 2 (= 6): rank 2, "!" is rank 1
    out = eng.step([sg], logits)[0]
    plp = out.prompt_logprobs
    assert len(plp) == 3 and plp[0] is None
    assert list(plp[1]) == [5] and plp[1][5].rank == 1 and plp[1][5].decoded_token == "cd"
    assert list(plp[2]) == [6, 11]
    assert (plp[2][6].rank, plp[2][11].rank) == (2, 1)
    assert (plp[2][6].decoded_token, plp[2][11].decoded_token) == ("e", "!")
    ref = torch.log_softmax(logits[1], -1)
    assert plp[2][6].logprob == pytest.approx(ref[6].item(), abs=1e-6)
    # the next step does not compute them again
    out2 = eng.step([sg])[0]
    assert out2.prompt_logprobs == plp


def test_detokenize_false_gives_no_text_and_no_decoded_tokens():
    params = SamplingParams(temperature=0, max_tokens=2, detokenize=False, logprobs=1,
                            logits_processors=[forced_by_step({}, default=only(4))])
    c = Engine().run(new_group(params))[-1].outputs[0]
    assert c.text == "" and c.token_ids == [4, 4]
    assert all(lp.decoded_token is None for d in c.logprobs for lp in d.values())


# ---------------------------------------------------------------- n / best_of
def test_best_of_forks_at_the_prompt_step():
    torch.manual_seed(0)
    params = SamplingParams(n=2, best_of=3, max_tokens=3, seed=5)
    sg = new_group(params)
    eng = Engine()
    meta_out = eng.step([sg])[0]
    seqs = sg.get_seqs()
    assert [s.seq_id for s in seqs] == [0, 1, 2]
    assert all(s.get_output_len() == 1 for s in seqs)
    assert all(s.status == SequenceStatus.RUNNING for s in seqs if not s.is_finished())
    running_children = [s.seq_id for s in seqs[1:] if not s.is_finished()]
    assert eng.scheduler.forks == [(0, c) for c in running_children]
    assert all(s.prompt_token_ids == [1, 2] for s in seqs)
    assert all(s.num_computed_tokens == 2 for s in seqs)
    assert len(meta_out.outputs) == 2
    eng.run(sg)
    assert all(s.is_finished() for s in sg.get_seqs())


def test_best_of_parent_takes_the_first_sample():
    # Three samples from the same forced row, by a processor that counts its calls... the
    # sampler calls processors once per row, so draw from a 3-token uniform row and check the
    # parent/children against the sampler's own order.
    params = SamplingParams(n=3, best_of=3, seed=1, max_tokens=5,
                            logits_processors=[forced_by_step({}, default={4: 0.0, 5: 0.0, 6: 0.0})])
    sg = new_group(params)
    eng = Engine()
    sampler_out = []
    orig = eng.sampler.__call__

    def spy(logits, meta):
        out = orig(logits, meta)
        sampler_out.append(out)
        return out
    eng.sampler = spy
    eng.step([sg])
    tokens = [s.output_token for s in sampler_out[0][0].samples]
    assert [sg.find(i).output_token_ids[0] for i in (0, 1, 2)] == tokens


def test_top_n_by_cumulative_logprob_index_is_position():
    params = SamplingParams(n=2, best_of=3, max_tokens=5)
    seqs = []
    for i, (cum, tok) in enumerate([(-3.0, 4), (-1.0, 5), (-2.0, 6)]):
        s = Sequence(i, "p", [1])
        s.append_token_id(tok, {tok: Logprob(cum)}, cum)
        s.output_text = TOK.PIECES[tok]
        s.status = SequenceStatus.FINISHED_STOPPED
        seqs.append(s)
    sg = SequenceGroup("7", seqs, params, 0.0)
    out = RequestOutput.from_seq_group(sg)
    assert [(c.index, c.cumulative_logprob, c.text) for c in out.outputs] == \
        [(1, -1.0, "cd"), (2, -2.0, "e")]
    assert out.finished and out.prompt == "p"
    # n == best_of: still sorted
    sg.sampling_params = SamplingParams(n=3, max_tokens=5)
    assert [c.index for c in RequestOutput.from_seq_group(sg).outputs] == [1, 2, 0]


def test_unfinished_group_and_finished_flag():
    params = SamplingParams(n=2, stop=["xyz"], max_tokens=5)
    a, b = Sequence(0, None, [1]), Sequence(1, None, [1])
    a.output_text, b.output_text = "hello", "hi"
    a.status, b.status = SequenceStatus.FINISHED_STOPPED, SequenceStatus.RUNNING
    sg = SequenceGroup("1", [a, b], params, 0.0)
    out = RequestOutput.from_seq_group(sg)
    assert not out.finished
    texts = {c.index: c.text for c in out.outputs}
    assert texts == {0: "hello", 1: ""}  # finished: whole text; running: held back 2 chars
    assert {c.index: c.finish_reason for c in out.outputs} == {0: "stop", 1: None}


def test_aborted_group_is_skipped():
    params = SamplingParams(temperature=0)
    sg = new_group(params)
    eng = Engine()
    meta = SamplingMetadata(groups=[SequenceGroupToSample(sg, [0], True, [], [0])])
    out = eng.sampler(torch.randn(1, V), meta)
    sg.first_seq.status = SequenceStatus.FINISHED_ABORTED
    eng.processor.process_outputs(meta.groups, out)
    assert sg.first_seq.get_output_len() == 0


# ---------------------------------------------------------------- beam search
PROBS = {
    (): {3: 0.5, 4: 0.3, EOS: 0.15, 5: 0.05},
    (3,): {EOS: 0.6, 6: 0.4},
    (4,): {EOS: 0.1, 7: 0.9},
    (4, 7): {EOS: 0.9, 8: 0.1},
    (3, 6): {EOS: 0.2, 9: 0.8},
    (3, 6, 9): {EOS: 0.6, 10: 0.4},
    (4, 7, 8): {EOS: 0.99},
}


def tree_processor(out_ids, logits):
    spec = PROBS.get(tuple(out_ids), {})
    # tokens not in the table: tiny, distinct probabilities (no ties)
    r = torch.tensor([math.log(1e-6 * (1 + t / 100)) for t in range(V)])
    for t, p in spec.items():
        r[t] = math.log(p)
    return r


def beam_params(**kw):
    kw.setdefault("max_tokens", 6)
    return SamplingParams(n=2, best_of=2, use_beam_search=True, temperature=0.0,
                          logits_processors=[tree_processor], **kw)


def run_beam(max_model_len=100, **kw):
    eng = Engine(max_model_len=max_model_len)
    sg = new_group(beam_params(**kw))
    outs = eng.run(sg)
    return eng, sg, outs


def score(tokens, lp=1.0, prompt_len=2):
    cum = 0.0
    prefix = ()
    for t in tokens:
        cum += math.log(PROBS[prefix][t])
        prefix += (t,)
    length = prompt_len + len(tokens) - (1 if tokens[-1] == EOS else 0)
    return cum / length ** lp


def test_beam_early_stopping_false():
    eng, sg, outs = run_beam(early_stopping=False)
    # step 2: finished [3,EOS] -0.401 and [EOS] -0.949; the best running beam [4,7]
    # (-0.327) can still beat the worst finished: continue. Step 3: [4,7,EOS] (-0.354)
    # enters; step 4: [3,6,9,10] (-0.458) cannot beat [3,EOS] (-0.401): stop.
    assert len(outs) == 4
    final = outs[-1]
    assert final.finished
    assert [c.token_ids for c in final.outputs] == [[4, 7, EOS], [3, EOS]]
    assert [c.text for c in final.outputs] == ["ab ", "c"]
    scores = sorted((beam_search_score(s, 1.0, EOS) for s in sg.get_seqs()), reverse=True)
    assert scores == pytest.approx([score([4, 7, EOS]), score([3, EOS])], abs=1e-5)
    assert scores == pytest.approx([-1.414 / 4, -1.204 / 3], abs=1e-3)
    assert all(c.finish_reason == "stop" for c in final.outputs)
    # only the W kept beams remain; every forked sequence gave its blocks back
    assert len(sg.get_seqs()) == 2 and all(s.is_finished() for s in sg.get_seqs())
    forked = {c for _, c in eng.scheduler.forks} | {0}
    assert forked <= set(eng.scheduler.frees)


def test_beam_early_stopping_true_stops_at_w_finished():
    eng, sg, outs = run_beam(early_stopping=True)
    assert len(outs) == 2
    assert [c.token_ids for c in outs[-1].outputs] == [[3, EOS], [EOS]]
    forked = {c for _, c in eng.scheduler.forks} | {0}
    assert forked <= set(eng.scheduler.frees)


def test_beam_early_stopping_never_runs_to_the_length_limit():
    eng, sg, outs = run_beam(early_stopping="never")
    # with length_penalty > 0 the best attainable score uses max(prompt + max_tokens,
    # max_model_len) = 100, so the search only ends when no beam is left running.
    assert len(outs) == 6
    assert [c.token_ids for c in outs[-1].outputs] == [[4, 7, EOS], [3, EOS]]


def test_beam_length_penalty_changes_the_ranking():
    # length_penalty=0 ranks by raw cumulative logprob: at step 2 the finished beams are
    # [3,EOS] (-1.204), [EOS] (-1.897), [4,EOS] (-3.507); early_stopping=True keeps two.
    eng, sg, outs = run_beam(early_stopping=True, length_penalty=0.0)
    assert [c.token_ids for c in outs[-1].outputs] == [[3, EOS], [EOS]]
    # RequestOutput orders the final beams by the same score: length_penalty=-1 favours
    # the short [EOS] (-1.897 * 2) over [4,7,EOS] (-1.414 * 4).
    seqs = []
    for i, toks in enumerate([[EOS], [4, 7, EOS]]):
        s = Sequence(i, None, [1, 2])
        cum = 0.0
        prefix = ()
        for t in toks:
            cum += math.log(PROBS[prefix][t])
            prefix += (t,)
            s.append_token_id(t, {}, math.log(PROBS[prefix[:-1]][t]))
        s.status = SequenceStatus.FINISHED_STOPPED
        seqs.append(s)
    for lp, order in ((0.0, [[4, 7, EOS], [EOS]]), (1.0, [[4, 7, EOS], [EOS]]),
                      (-1.0, [[EOS], [4, 7, EOS]])):
        sg = SequenceGroup("b", seqs, beam_params(length_penalty=lp), 0.0)
        sg.beam_eos_token_id = EOS
        got = [c.token_ids for c in RequestOutput.from_seq_group(sg).outputs]
        expect = sorted([[EOS], [4, 7, EOS]], key=lambda t: -score(t, lp))
        assert got == expect


def test_beam_search_score_excludes_eos_from_the_length():
    s = Sequence(0, None, [1, 2, 3])
    s.append_token_id(4, {}, -1.0)
    s.append_token_id(EOS, {}, -1.0)
    assert beam_search_score(s, 1.0, EOS) == pytest.approx(-2.0 / 4)
    assert beam_search_score(s, 1.0, None) == pytest.approx(-2.0 / 5)
    assert beam_search_score(s, 2.0, EOS) == pytest.approx(-2.0 / 16)
    assert beam_search_score(s, 1.0, EOS, seq_len=10) == pytest.approx(-0.2)


# ---------------------------------------------------------------- reprs
def test_reprs():
    c = CompletionOutput(0, "hi", [4, 5], -1.5, None, "stop", None)
    assert repr(c) == ("CompletionOutput(index=0, text='hi', token_ids=[4, 5], "
                       "cumulative_logprob=-1.5, logprobs=None, finish_reason=stop, "
                       "stop_reason=None)")
    m = RequestMetrics(arrival_time=1.0, last_token_time=2.0)
    r = RequestOutput("3", "hello", [1, 2], None, [c], True, m)
    assert repr(r) == ("RequestOutput(request_id=3, prompt='hello', prompt_token_ids=[1, 2], "
                       f"prompt_logprobs=None, outputs=[{c!r}], finished=True, metrics={m!r})")
    assert repr(Logprob(-0.5, 1, "a")) == "Logprob(logprob=-0.5, rank=1, decoded_token='a')"
    assert "time_in_queue=None" in repr(m) and "scheduler_time=0.0" in repr(m)
    from labengine.outputs import Logprob as L2, RequestMetrics as M2
    assert L2 is Logprob and M2 is RequestMetrics
