"""The LLM entry point: arguments and their validation, generate's input forms, output order,
request ids, and bad input that leaves the engine usable and holding no blocks."""
import pytest
import torch

import labengine
from labengine import LLM, SamplingParams
from labengine.arg_utils import EngineArgs
from labengine.testing import make_random_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model("llama", tmp_path_factory.mktemp("api") / "llama"))


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model=model_path, max_model_len=64, num_gpu_blocks_override=32, seed=0)


def all_free(llm):
    bm = llm.llm_engine.scheduler.block_manager
    return bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks and not bm.block_tables


GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(tokenizer_mode="fast"), ValueError, "Unknown tokenizer mode: fast. Must be either 'auto' or 'slow'."),
    (dict(dtype="int8"), ValueError, "Unknown dtype: int8"),
    (dict(gpu_memory_utilization=1.5), ValueError, "GPU memory utilization must be less than 1.0. Got 1.5."),
    (dict(quantization="awq"), ValueError, "quantization='awq' is not supported"),
    # (more ranks than GPUs on a GPU run: tests/test_tensor_parallel.py)
    (dict(tensor_parallel_size=3, device="cpu"), ValueError,
     "Total number of attention heads (4) must be divisible by tensor parallel size (3)."),
    (dict(block_size=12), ValueError, "block_size must be one of"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be at least 1, got 0."),
    (dict(preemption_mode="evict"), ValueError, "preemption_mode must be 'recompute' or 'swap', got 'evict'"),
    (dict(device="tpu"), ValueError, "device must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
    (dict(load_format="gguf"), ValueError, "load_format must be one of 'auto', 'pt', 'safetensors'"),
    (dict(max_logprobs=-1), ValueError, "max_logprobs must be non-negative"),
    (dict(swap_space=10_000), ValueError, "Too large swap space."),
    (dict(num_gpu_blocks_override=0), ValueError, "num_gpu_blocks_override must be at least 1, got 0."),
    (dict(max_num_seqs="8"), TypeError, "max_num_seqs must be an int, got '8'"),
    (dict(enforce_eager="yes"), TypeError, "enforce_eager must be True or False"),
    (dict(attention_backend="flash"), ValueError, "attention_backend must be 'auto', 'torch' or 'triton'"),
])
def test_engine_args_rejected(model_path, kwargs, exc, match):
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        LLM(model=model_path, **kwargs)


def test_unknown_kwarg_is_a_type_error(model_path):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(model=model_path, max_num_seq=4)


def test_model_dependent_rules(model_path):
    with pytest.raises(ValueError, match=r"User-specified max_model_len \(4096\) is greater than the derived "
                                         r"max_model_len \(max_position_embeddings=512"):
        LLM(model=model_path, max_model_len=4096)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(32\) is smaller than max_model_len \(64\)"):
        LLM(model=model_path, max_model_len=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match=r"The model's max seq len \(64\) is larger than the maximum number of "
                                         r"tokens that can be stored in KV cache \(48\)"):
        LLM(model=model_path, max_model_len=64, num_gpu_blocks_override=3)


def test_missing_model_names_the_embedded_model(tmp_path):
    with pytest.raises(ValueError) as e:
        LLM(model="no-such-org/no-such-model")
    msg = str(e.value)
    assert "no-such-org/no-such-model" in msg and "DEFAULT_MODEL" in msg


def test_full_initialization_block_accepted(model_path, caplog):
    # Every parameter of the lesson's "Full initialization" block, plus max_paddings.
    llm = LLM(model=model_path, tokenizer=None, tokenizer_mode="auto", trust_remote_code=False,
              tensor_parallel_size=1, dtype="auto", quantization=None, revision=None, tokenizer_revision=None,
              seed=0, gpu_memory_utilization=0.9, swap_space=4, max_model_len=None, download_dir=None,
              load_format="auto", disable_custom_all_reduce=False, enforce_eager=False,
              max_num_batched_tokens=None, max_num_seqs=256, max_paddings=256, disable_log_stats=False)
    cfg = llm.llm_engine.config
    assert cfg.model_config.max_model_len == 512  # derived from the config
    assert cfg.scheduler_config.max_num_batched_tokens == 2048  # max(max_model_len, 2048)
    assert cfg.model_config.dtype == torch.float32  # auto on the CPU


def test_dtype_is_honoured(model_path):
    llm = LLM(model=model_path, dtype="bfloat16", max_model_len=64, num_gpu_blocks_override=8)
    assert next(llm.llm_engine.model_runner.model.parameters()).dtype == torch.bfloat16
    assert llm.llm_engine.model_runner.kv_cache.dtype == torch.bfloat16
    out = llm.generate("Hello", GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_scheduler_budgets_are_honoured(model_path):
    llm = LLM(model=model_path, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64)
    batch_sizes = []
    llm.add_event_listener(lambda e: batch_sizes.append(e.batch_size) if e.kind == "step_finished" else None)
    llm.generate(["a b c"] * 5, GREEDY, use_tqdm=False)
    assert max(batch_sizes) == 2


# ---------------------------------------------------------------- generate
def test_input_forms_and_order(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("The cat")
    a = llm.generate("The cat", GREEDY, use_tqdm=False)
    b = llm.generate({"prompt": "The cat"}, GREEDY, use_tqdm=False)
    c = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    d = llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY, use_tqdm=False)
    e = llm.generate(prompts=["The cat"], sampling_params=GREEDY, use_tqdm=False)
    tokens = [x[0].outputs[0].token_ids for x in (a, b, c, d, e)]
    assert all(t == tokens[0] for t in tokens)
    assert a[0].prompt == "The cat" and c[0].prompt is None and a[0].prompt_token_ids == ids
    # request ids continue across calls and outputs come back in input order
    first = int(a[0].request_id)
    assert [int(x[0].request_id) for x in (b, c, d, e)] == [first + 1, first + 2, first + 3, first + 4]
    prompts = ["x" * n for n in (30, 1, 12, 5)]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (1, 9, 2, 5)],
                        use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 9, 2, 5]
    assert all_free(llm)


def test_default_params_and_no_mutation(llm):
    params = SamplingParams(temperature=0.0, top_p=0.5, max_tokens=3)
    before = repr(params)
    llm.generate("Hi", params, use_tqdm=False)
    assert repr(params) == before
    out = llm.generate("Hi", use_tqdm=False)[0]  # SamplingParams(): max_tokens=16
    assert len(out.outputs[0].token_ids) <= 16


def test_generate_argument_errors(llm):
    with pytest.raises(ValueError, match="Either prompts or prompt_token_ids must be provided."):
        llm.generate(use_tqdm=False)
    with pytest.raises(ValueError, match="The lengths of prompts and sampling_params must be the same."):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="The lengths of prompts and prompt_token_ids must be the same."):
        llm.generate(["a", "b"], GREEDY, prompt_token_ids=[[5]], use_tqdm=False)
    assert all_free(llm)


def test_bad_prompts_raise_before_anything_runs(llm):
    engine = llm.llm_engine
    steps_before = engine.event_bus.step
    too_long = "word " * 200
    cases = [
        (["fine prompt", too_long], "The decoder prompt .* is longer than the maximum model length of 64"),
        (["fine prompt", ""], "Prompt cannot be empty"),
        ([{"prompt_token_ids": []}], "Prompt cannot be empty"),
        ([{"prompt_token_ids": [5, 10**6]}], r"token ids must be ints in \[0, "),
    ]
    for prompts, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert not engine.has_unfinished_requests()
        assert all_free(llm)
    with pytest.raises(ValueError, match="Cannot request more than 20 logprobs."):
        llm.generate("Hello", SamplingParams(logprobs=21), use_tqdm=False)
    assert engine.event_bus.step == steps_before  # no step ran for any of them
    # ...and the engine still works
    assert len(llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 5


def test_failing_request_does_not_take_down_the_engine(llm):
    def boom(out_ids, logits):
        if len(out_ids) == 2:
            raise RuntimeError("logits processor failed")
        return logits

    bad = SamplingParams(temperature=0.0, max_tokens=6, logits_processors=[boom])
    with pytest.raises(RuntimeError, match="logits processor failed"):
        llm.generate(["one", "two", "three"], [GREEDY, bad, GREEDY], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert all_free(llm)
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].finished


def test_engine_level_failure_isolated(model_path):
    engine = labengine.LLMEngine.from_engine_args(EngineArgs(model=model_path, max_model_len=64,
                                                             num_gpu_blocks_override=16))

    def boom(out_ids, logits):
        raise RuntimeError("bad processor")

    engine.add_request("good", "Hello there", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request("bad", "Hello there", SamplingParams(temperature=0, max_tokens=4, logits_processors=[boom]))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert len(done["good"].outputs[0].token_ids) == 4
    assert done["bad"].outputs[0].finish_reason == "abort"
    assert isinstance(engine.request_errors["bad"], RuntimeError)
    bm = engine.scheduler.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks


def test_engine_step_api(model_path):
    engine = labengine.LLMEngine.from_engine_args(EngineArgs(model=model_path, max_model_len=64))
    engine.add_request("a", "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request("b", "Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 2
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"} and not any(o.finished for o in outs)
    engine.abort_request("b")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_num_unfinished_requests() == 0


def test_tqdm_and_utils(llm, capsys):
    llm.generate(["a", "b"], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "toks/s" in err
    from labengine.utils import is_cpu, is_hip

    assert is_cpu() == (not torch.cuda.is_available())
    assert is_hip() is False


def test_trace_context_manager(llm):
    with llm.trace() as trace:
        llm.generate(["a b", "c"], GREEDY, use_tqdm=False)
    df = trace.to_dataframe()
    assert {"request_added", "scheduled", "block_allocated", "block_freed", "step_finished",
            "request_finished"} <= set(df["event"])
    steps = df[df.event == "step_finished"]
    assert (steps.kv_blocks_total == 32).all()
    assert set(steps.columns) >= {"latency_s", "schedule_s", "prepare_s", "forward_s", "sample_s", "detokenize_s",
                                  "batch_size", "num_prefill_tokens", "num_decode_tokens", "kv_blocks_used"}


def test_generate_pauses_full_garbage_collection_and_restores_it(llm):
    """A full gc pass over every request's tokens stalls the engine for 0.1-0.3 s; generate()
    raises generation 2's threshold for its run and puts the user's thresholds back, also
    when a request fails."""
    import gc

    before = gc.get_threshold()
    seen = []

    def spy(output_ids, logits):
        seen.append(gc.get_threshold())
        return logits

    llm.generate("Hello", SamplingParams(max_tokens=3, logits_processors=[spy]), use_tqdm=False)
    assert seen and all(t[:2] == before[:2] and t[2] >= 1_000_000 for t in seen)
    assert gc.get_threshold() == before

    def boom(output_ids, logits):
        raise RuntimeError("processor failed")

    with pytest.raises(RuntimeError, match="processor failed"):
        llm.generate("Hello", SamplingParams(max_tokens=3, logits_processors=[boom]), use_tqdm=False)
    assert gc.get_threshold() == before
    assert all_free(llm)
