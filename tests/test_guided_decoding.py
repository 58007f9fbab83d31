"""Structured output (vLLM v0.5.4's guided decoding): LLM.generate(..., guided_options_request=...).

Outputs satisfy their JSON schema / regex / choice / Lark grammar with every sampling mode
(greedy, random, n > 1 with best_of, seeded); EOS is allowed only where the grammar accepts;
bad specs raise a ValueError naming the field and leave the engine clean; compiled grammars
are cached by spec; the processor follows forks. The adapter is also walked with random
logits over three tokenizer families: the embedded model's, a GPT-2-style byte-level BPE and
a Llama-style (Metaspace + byte fallback) BPE.
"""
import json
import re

import jsonschema
import pytest
import torch

from labengine import LLM, SamplingParams
from labengine.guided_decoding import GuidedDecodingRequest, get_guided_decoding_logits_processor
from labengine.guided_decoding import llguidance_backend

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["answer", "score", "tags"],
    "additionalProperties": False,
}
GRAMMAR = r"""
?start: select_statement
?select_statement: "SELECT " column_list " FROM " table_name
?column_list: column_name ("," column_name)*
?table_name: identifier
?column_name: identifier
?identifier: /[a-z]{1,8}/
"""


@pytest.fixture(scope="module")
def llm():
    return LLM(model="tinylab", num_gpu_blocks_override=256, seed=0)


def all_free(llm):
    bm = llm.llm_engine.scheduler.block_manager
    return bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks and not bm.block_tables


def gen(llm, prompts, params, options):
    return llm.generate(prompts, params, guided_options_request=options, use_tqdm=False)


PROMPTS = ["Once upon a time", "The answer is", "A list of colours:"]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=60),
    SamplingParams(temperature=1.0, max_tokens=60, seed=3),
    SamplingParams(temperature=1.2, max_tokens=60, n=2, best_of=3),
], ids=["greedy", "seeded", "n2-best_of3"])
def test_json_schema_outputs_validate(llm, params):
    outs = gen(llm, PROMPTS, params, {"guided_json": SCHEMA})
    assert len(outs) == len(PROMPTS)
    for out in outs:
        assert len(out.outputs) == params.n
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text  # the schema is bounded: the grammar completes
            jsonschema.validate(json.loads(c.text), SCHEMA)
            assert c.token_ids[-1] == llm.get_tokenizer().eos_token_id
    assert all_free(llm)


def test_json_schema_as_string_and_pydantic_model(llm):
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false
        answer: bool
        score: int = pydantic.Field(ge=0, le=9)

    for spec in (json.dumps(SCHEMA), Answer):
        out = gen(llm, ["Q:"], SamplingParams(temperature=0.0, max_tokens=60), {"guided_json": spec})[0].outputs[0]
        value = json.loads(out.text)
        if spec is Answer:
            Answer.model_validate(value)
        else:
            jsonschema.validate(value, SCHEMA)


def test_json_object(llm):
    out = gen(llm, ["Data:"], SamplingParams(temperature=0.0, max_tokens=40),
              GuidedDecodingRequest(guided_json_object=True))[0].outputs[0]
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_regex_choice_grammar(llm):
    p = SamplingParams(temperature=0.8, max_tokens=40, n=3, best_of=3, seed=5)
    outs = gen(llm, PROMPTS, p, {"guided_regex": r"[0-9]{3}-(cat|dog)s?"})
    for c in (c for o in outs for c in o.outputs):
        assert re.fullmatch(r"[0-9]{3}-(cat|dogs?|cats)", c.text), c.text
        assert c.finish_reason == "stop"
    outs = gen(llm, PROMPTS, p, {"guided_choice": ["happy", "sad", "a big tree"]})
    assert all(c.text in ("happy", "sad", "a big tree") for o in outs for c in o.outputs)
    outs = gen(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=40), {"guided_grammar": GRAMMAR})
    for c in (o.outputs[0] for o in outs):
        # A Lark grammar bounds the shape; a stopped output is complete, a cut one a prefix.
        full = re.fullmatch(r"SELECT [a-z]{1,8}(,[a-z]{1,8})* FROM [a-z]{1,8}", c.text)
        assert full if c.finish_reason == "stop" else re.fullmatch(r"SELECT [a-z]{1,8}(,[a-z]{1,8})*,?", c.text)
    assert all_free(llm)


def test_eos_only_where_the_grammar_accepts(llm):
    tok = llm.get_tokenizer()
    eng = llm.llm_engine
    proc = get_guided_decoding_logits_processor(GuidedDecodingRequest(guided_regex=r"ab(c)?"), tok,
                                                eng.model_runner.vocab_size, eng.eos_token_ids)
    eos = tok.eos_token_id
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("a", "b", "c")}
    assert proc.forbidden([])[eos] and proc.forbidden([ids["a"]])[eos]
    after_ab = proc.forbidden([ids["a"], ids["b"]])
    assert not after_ab[eos] and not after_ab[ids["c"]]  # accepting, and may go on
    after_abc = proc.forbidden([ids["a"], ids["b"], ids["c"]])
    assert not after_abc[eos] and int((~after_abc).sum()) == 1  # complete: EOS only
    row = torch.zeros(eng.model_runner.vocab_size)
    out = proc([ids["a"]], row)
    assert torch.isfinite(out).sum() == (~proc.forbidden([ids["a"]])).sum()


def test_forks_continue_their_parent_state(llm):
    tok = llm.get_tokenizer()
    eng = llm.llm_engine
    proc = get_guided_decoding_logits_processor(GuidedDecodingRequest(guided_choice=["ab", "ac"]), tok,
                                                eng.model_runner.vocab_size, eng.eos_token_ids)
    a, b, c = (tok.convert_tokens_to_ids(s) for s in "abc")
    assert not proc.forbidden([a])[b] and not proc.forbidden([a])[c]
    # Two children of the prefix [a]: each sees its own branch (the parent state is copied).
    assert int((~proc.forbidden([a, b])).sum()) == 1 and int((~proc.forbidden([a, c])).sum()) == 1
    # A prefix never seen (e.g. after its ancestors were dropped) is rebuilt from the start.
    fresh = get_guided_decoding_logits_processor(GuidedDecodingRequest(guided_choice=["ab", "ac"]), tok,
                                                 eng.model_runner.vocab_size, eng.eos_token_ids)
    assert torch.equal(fresh.forbidden([a, c]), proc.forbidden([a, c]))
    with pytest.raises(RuntimeError, match="breaks the grammar"):
        fresh.forbidden([b])


def test_grammars_are_cached_by_spec(llm):
    tok, eng = llm.get_tokenizer(), llm.llm_engine
    vocab, eos = eng.model_runner.vocab_size, eng.eos_token_ids
    m1, _ = llguidance_backend.compiled_matcher(GuidedDecodingRequest(guided_json=SCHEMA), tok, vocab, eos)
    m2, _ = llguidance_backend.compiled_matcher(GuidedDecodingRequest(guided_json=json.dumps(SCHEMA)), tok, vocab, eos)
    m3, _ = llguidance_backend.compiled_matcher(
        GuidedDecodingRequest(guided_json=SCHEMA, guided_whitespace_pattern=r"[ \n]*"), tok, vocab, eos)
    assert m1 is m2 and m3 is not m1


def test_whitespace_pattern(llm):
    out = gen(llm, ["x"], SamplingParams(temperature=0.0, max_tokens=60),
              {"guided_json": SCHEMA, "guided_whitespace_pattern": ""})[0].outputs[0]
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert " " not in re.sub(r'"[^"]*"', '""', out.text)  # an empty pattern: no whitespace between tokens
    out = gen(llm, ["x"], SamplingParams(temperature=0.0, max_tokens=60), {"guided_json": SCHEMA})[0].outputs[0]
    assert " " in re.sub(r'"[^"]*"', '""', out.text)  # the default, outlines' "[ ]?", lets the model write one space


def test_caller_params_untouched_and_plain_requests_unconstrained(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    guided = gen(llm, ["Hello"], params, {"guided_choice": ["yes", "no"]})[0].outputs[0].text
    assert guided in ("yes", "no") and params.logits_processors is None
    plain = llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0].text
    assert plain not in ("yes", "no")


@pytest.mark.parametrize("options,match", [
    ({"guided_regex": "a(b"}, r"(?s)Invalid guided_regex 'a\(b'.*unclosed group"),
    ({"guided_grammar": "start: foo"}, r"(?s)Invalid guided_grammar 'start: foo'.*unknown name"),
    ({"guided_json": {"type": "objectx"}}, r"(?s)Invalid guided_json .*objectx"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_json": [1, 2]}, "guided_json must be a JSON schema object"),
    ({"guided_choice": []}, "guided_choice must be a non-empty list of str"),
    ({"guided_choice": "yes"}, "guided_choice must be a non-empty list of str"),
    ({"guided_regex": "a", "guided_choice": ["x"]}, "You can only use one kind of guided decoding"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend='outlines'"),
    ({"guided_regexp": "a"}, r"Unknown guided decoding option\(s\) \['guided_regexp'\]"),
])
def test_invalid_specs_raise_and_leave_the_engine_clean(llm, options, match):
    with pytest.raises(ValueError, match=match):
        gen(llm, ["Hello", "World"], SamplingParams(max_tokens=4), options)
    assert all_free(llm) and not llm.llm_engine.has_unfinished_requests()
    assert len(gen(llm, ["Hello"], SamplingParams(max_tokens=4), None)[0].outputs[0].token_ids) == 4


def test_engine_arg_backend():
    from labengine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="guided_decoding_backend='outlines' is not available"):
        EngineArgs(model="tinylab", guided_decoding_backend="outlines")


# ------------------------------------------------------------ tokenizer families
def _llama_style_tokenizer():
    """A Llama/Mistral-style tokenizer: Metaspace pre-tokenizer, BPE with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from labengine.testing import CORPUS

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Llama keeps its 256 byte tokens <0x00>..<0xFF> in the BPE vocabulary (not as added tokens).
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tokenizers():
    from transformers import AutoTokenizer

    from labengine.embedded import DEFAULT_MODEL
    from labengine.testing import make_tokenizer

    return {"tinylab": AutoTokenizer.from_pretrained(DEFAULT_MODEL), "gpt2-style": make_tokenizer(add_bos=False),
            "llama-style": _llama_style_tokenizer()}


@pytest.mark.parametrize("family", ["tinylab", "gpt2-style", "llama-style"])
def test_random_walks_obey_the_grammar(family):
    """Sample from random logits through the processor until EOS; the decoded text must match."""
    tok = _tokenizers()[family]
    vocab = len(tok) + 7  # logits rows wider than the tokenizer, as with padded embeddings
    cases = [
        (GuidedDecodingRequest(guided_json=SCHEMA), lambda s: jsonschema.validate(json.loads(s), SCHEMA)),
        (GuidedDecodingRequest(guided_regex=r"(0|[1-9][0-9]*)\.[0-9]{2} (EUR|USD)"),
         lambda s: re.fullmatch(r"(0|[1-9][0-9]*)\.[0-9]{2} (EUR|USD)", s) or pytest.fail(s)),
        (GuidedDecodingRequest(guided_choice=["naïve café", "über", "x y"]),
         lambda s: s in ("naïve café", "über", "x y") or pytest.fail(s)),
    ]
    gen_ = torch.Generator().manual_seed(0)
    for request, check in cases:
        for _ in range(3):
            proc = get_guided_decoding_logits_processor(request, tok, vocab, {tok.eos_token_id})
            out: list[int] = []
            for _ in range(200):
                row = proc(out, torch.randn(vocab, generator=gen_))
                assert torch.isfinite(row[len(tok):]).sum() == 0  # padding rows never allowed
                t = int(torch.multinomial(torch.softmax(row, -1), 1, generator=gen_))
                if t == tok.eos_token_id:
                    break
                out.append(t)
            else:
                pytest.fail(f"{family}: no EOS after 200 tokens: {tok.decode(out)!r}")
            check(tok.decode(out))
