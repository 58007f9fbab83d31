"""Incremental detokenization and the StopChecker, model-independently: a hand-made
"slow" tokenizer whose tokens are literal strings, and a tiny byte-level BPE trained here
with `tokenizers` (no downloads)."""
import pytest

from labengine.detokenizer import Detokenizer, StopChecker, detokenize_incrementally
from labengine.sampling_params import SamplingParams
from labengine.sequence import Logprob, Sequence, SequenceGroup, SequenceStatus

from fake_tokenizer import FakeTokenizer

TOK = FakeTokenizer()
IDS = {p: i for i, p in enumerate(FakeTokenizer.PIECES)}


def feed(pieces, params=None, prompt=("a", "b"), max_model_len=100, tokenizer=TOK,
         eos_token_ids=None, logprobs=None):
    """Appends the tokens one by one (detokenize + stop check) until the sequence finishes."""
    params = params or SamplingParams(max_tokens=50)
    prompt_ids = [IDS[p] if isinstance(p, str) else p for p in prompt]
    seq = Sequence(0, None, prompt_ids)
    seq.status = SequenceStatus.RUNNING
    detok = Detokenizer(tokenizer)
    checker = StopChecker(max_model_len, tokenizer, eos_token_ids)
    chunks = []
    for i, p in enumerate(pieces):
        tid = IDS[p] if isinstance(p, str) else p
        lp = logprobs[i] if logprobs else {tid: Logprob(-1.0)}
        seq.append_token_id(tid, lp, -1.0)
        n = detok.decode_sequence_inplace(seq, params) if params.detokenize else 0
        chunks.append(seq.output_text[-n:] if n else "")
        checker.maybe_stop_sequence(seq, n, params)
        if seq.is_finished():
            break
    return seq, chunks


# ---------------------------------------------------------------- incremental decoding
def test_incremental_text_per_token():
    seq, chunks = feed(["ab", "cd", " ", "e", "!"])
    assert chunks == ["ab", "cd", " ", "e", "!"]
    assert seq.output_text == "abcd e!"


def test_skip_special_tokens():
    p = SamplingParams(ignore_eos=True, max_tokens=50)
    seq, _ = feed(["a", "</s>", "b", "<sp>", "c"], p)
    assert seq.output_text == "abc"
    p = SamplingParams(ignore_eos=True, skip_special_tokens=False, max_tokens=50)
    seq, _ = feed(["a", "</s>", "b"], p)
    assert "</s>" in seq.output_text


def test_spaces_between_special_tokens():
    common = dict(ignore_eos=True, skip_special_tokens=False, max_tokens=50)
    seq, _ = feed(["a", "<sp>", "<sp>", "b"], SamplingParams(**common))
    assert seq.output_text == "a <sp> <sp> b"
    seq, _ = feed(["a", "<sp>", "<sp>", "b"],
                  SamplingParams(spaces_between_special_tokens=False, **common))
    assert seq.output_text == "a<sp><sp>b"


def test_decoded_token_of_logprob_alternatives():
    lps = [{IDS["cd"]: Logprob(-0.1), IDS["e"]: Logprob(-2.0), IDS["xy"]: Logprob(-3.0)}]
    seq, _ = feed(["cd"], logprobs=lps)
    d = seq.output_logprobs[0]
    assert [(t, lp.decoded_token) for t, lp in d.items()] == \
        [(IDS["cd"], "cd"), (IDS["e"], "e"), (IDS["xy"], "xy")]


def test_out_of_vocab_token_gives_no_text():
    toks, text, _, _ = detokenize_incrementally(TOK, [1, 2, 999], None, 0, 0)
    assert text == ""


def test_decode_prompt_logprobs_inplace():
    params = SamplingParams(prompt_logprobs=1)
    seq = Sequence(0, None, [IDS["ab"], IDS["cd"], IDS["e"]])
    sg = SequenceGroup("0", [seq], params, 0.0)
    plp = [None, {IDS["cd"]: Logprob(-1.0), IDS["xy"]: Logprob(-0.5)},
           {IDS["e"]: Logprob(-1.0), IDS["!"]: Logprob(-0.2)}]
    Detokenizer(TOK).decode_prompt_logprobs_inplace(sg, plp, position_offset=0)
    assert plp[1][IDS["cd"]].decoded_token == "cd" and plp[1][IDS["xy"]].decoded_token == "xy"
    assert plp[2][IDS["e"]].decoded_token == "e" and plp[2][IDS["!"]].decoded_token == "!"
    # detokenize=False leaves them None.
    sg2 = SequenceGroup("1", [Sequence(1, None, [1, 2])], SamplingParams(detokenize=False), 0.0)
    plp2 = [None, {2: Logprob(-1.0)}]
    Detokenizer(TOK).decode_prompt_logprobs_inplace(sg2, plp2)
    assert plp2[1][2].decoded_token is None


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. "
                             "stop here! STOP now."] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@pytest.mark.parametrize("text", ["héllo wörld 你好 the fox", "the lazy dog 🦊🦊 ok", "ünïcödé"])
def test_byte_level_incremental_equals_full_decode(bpe, text):
    prompt = bpe.encode("hello ")
    ids = bpe.encode(text)
    seq = Sequence(0, None, prompt)
    detok = Detokenizer(bpe)
    params = SamplingParams()
    chunks = []
    for t in ids:
        seq.append_token_id(t, {t: Logprob(0.0)}, 0.0)
        n = detok.decode_sequence_inplace(seq, params)
        chunks.append(seq.output_text[-n:] if n else "")
    assert seq.output_text == bpe.decode(ids) == text
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks  # some character really was split across tokens


def test_byte_level_stop_string_across_tokens(bpe):
    ids = bpe.encode("the quick brown fox")
    params = SamplingParams(stop=["ck bro"], max_tokens=50)
    seq = Sequence(0, None, bpe.encode("hello"))
    detok, checker = Detokenizer(bpe), StopChecker(100, bpe)
    for t in ids:
        seq.append_token_id(t, {t: Logprob(0.0)}, 0.0)
        n = detok.decode_sequence_inplace(seq, params)
        checker.maybe_stop_sequence(seq, n, params)
        if seq.is_finished():
            break
    assert seq.output_text == "the qui"
    assert seq.stop_reason == "ck bro" and seq.status == SequenceStatus.FINISHED_STOPPED


# ---------------------------------------------------------------- stop checks
def test_stop_string_spanning_tokens_excluded():
    # "bc" spans "ab" | "cd": the text is cut before it, the "d" after it is dropped.
    seq, _ = feed(["e", "ab", "cd", "e"], SamplingParams(stop=["bc"]))
    assert seq.output_text == "ea"
    assert seq.stop_reason == "bc" and seq.status == SequenceStatus.FINISHED_STOPPED
    assert seq.output_token_ids == [IDS["e"], IDS["ab"], IDS["cd"]]


def test_stop_string_spanning_tokens_included():
    seq, _ = feed(["e", "ab", "cd", "e"], SamplingParams(stop=["bc"], include_stop_str_in_output=True))
    assert seq.output_text == "eabc"  # the "d" after the match is dropped
    assert seq.stop_reason == "bc"
    seq, _ = feed(["e", "ab", "cd"], SamplingParams(stop=["bcd"], include_stop_str_in_output=True))
    assert seq.output_text == "eabcd"


def test_stop_string_spanning_three_tokens():
    seq, _ = feed(["a", "b", "c", "!"], SamplingParams(stop=["abc"]))
    assert seq.output_text == "" and seq.stop_reason == "abc"
    assert len(seq.output_token_ids) == 3


def test_stop_strings_are_checked_at_every_token():
    # "b" arrives (in "ab") one step before "cd": it stops there, whatever the list order.
    seq, _ = feed(["xy", "ab", "cd"], SamplingParams(stop=["cd", "b"]))
    assert seq.stop_reason == "b" and seq.output_text == "xya"
    assert len(seq.output_token_ids) == 2


def test_first_stop_string_in_list_order_wins():
    # Both strings are in the same new text: the first in list order wins.
    seq, _ = feed(["e", "cd"], SamplingParams(stop=["d", "c"]))
    assert seq.stop_reason == "d" and seq.output_text == "ec"
    seq, _ = feed(["e", "cd"], SamplingParams(stop=["c", "d"]))
    assert seq.stop_reason == "c" and seq.output_text == "e"


def test_eos_stops_with_no_reason_and_no_text():
    seq, _ = feed(["a", "</s>", "b"])
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.stop_reason is None
    assert seq.output_text == "a" and seq.output_token_ids == [1, 0]
    # even when special tokens are not skipped, EOS text is removed
    seq, _ = feed(["a", "</s>"], SamplingParams(skip_special_tokens=False))
    assert seq.output_text == "a"


def test_extra_eos_ids_from_generation_config():
    seq, _ = feed(["a", "!", "b"], eos_token_ids={IDS["!"]})
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.stop_reason is None
    assert seq.output_text == "a"


def test_ignore_eos_continues_past_eos():
    seq, _ = feed(["a", "</s>", "b"], SamplingParams(ignore_eos=True, max_tokens=3))
    assert seq.output_token_ids == [1, 0, 2]
    assert seq.output_text == "ab" and seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED


def test_stop_token_ids():
    seq, _ = feed(["a", "xy", "b"], SamplingParams(stop_token_ids=[IDS["xy"]]))
    assert seq.stop_reason == IDS["xy"] and seq.output_text == "a"
    assert seq.output_token_ids == [1, IDS["xy"]]
    seq, _ = feed(["a", "xy", "b"], SamplingParams(stop_token_ids=[IDS["xy"]],
                                                   include_stop_str_in_output=True))
    assert seq.stop_reason == IDS["xy"] and seq.output_text == "axy"


def test_eos_is_checked_before_stop_token_ids():
    seq, _ = feed(["a", "</s>"], SamplingParams(stop_token_ids=[0]))
    assert seq.stop_reason is None


def test_min_tokens_delays_every_stop():
    p = SamplingParams(min_tokens=5, stop=["b"], stop_token_ids=[IDS["xy"]], max_tokens=10)
    seq, _ = feed(["</s>", "xy", "b", "a", "e", "b", "e"], p)
    # EOS, the stop id and the stop string inside the first 4 tokens do not stop it (the
    # 5th is checked, with len(stop) characters of look-back: "ae" holds no "b")...
    assert seq.output_token_ids[:5] == [0, IDS["xy"], IDS["b"], IDS["a"], IDS["e"]]
    # ...and the next "b" stops it.
    assert seq.stop_reason == "b" and seq.output_text == "xybae"
    assert len(seq.output_token_ids) == 6
    p = SamplingParams(min_tokens=2, max_tokens=10)
    seq, _ = feed(["a", "</s>", "</s>"], p)
    assert seq.output_token_ids == [1, 0] and seq.status == SequenceStatus.FINISHED_STOPPED
    p = SamplingParams(min_tokens=3, max_tokens=10)
    seq, _ = feed(["</s>", "</s>", "</s>", "a"], p)
    assert seq.output_token_ids == [0, 0, 0] and seq.status == SequenceStatus.FINISHED_STOPPED


def test_max_tokens_and_max_model_len():
    seq, _ = feed(["a"] * 10, SamplingParams(max_tokens=4))
    assert seq.get_output_len() == 4 and seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    assert seq.stop_reason is None
    # prompt 2 + output may reach max_model_len + 1 (V0): stops when len > max_model_len
    seq, _ = feed(["a"] * 10, SamplingParams(max_tokens=None), max_model_len=6)
    assert seq.get_len() == 7 and seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    seq, _ = feed(["a"] * 30, SamplingParams(max_tokens=None), max_model_len=1000)
    assert not seq.is_finished()


def test_stop_checker_accepts_a_getter_or_nothing():
    checker = StopChecker(10, lambda seq: TOK)
    assert checker.get_eos_token_ids() == {0}
    assert StopChecker(10, None, {5}).get_eos_token_ids() == {5}
    assert StopChecker(10).get_eos_token_ids() == set()
