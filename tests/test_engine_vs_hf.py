"""labengine against Hugging Face transformers, end to end through the public API.

For every architecture, a random-weight model built from a small config: greedy output
equals transformers' greedy `generate` token for token (float32, CPU) for a batch of
prompts of different lengths, with an ample cache and with a cache so small that
preemption happens (by recompute and by swap); prompt logprobs match to 1e-4.
"""
import pytest
import torch

from labengine import LLM, SamplingParams
from labengine.testing import ARCHS, make_random_model

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a little robot who wanted to learn how to paint the sky. It",
    "Hello",
    "A block table maps the logical blocks of a sequence to physical blocks in memory, the way an "
    "operating system maps pages. When memory runs out, the scheduler",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_random_model(arch, root / arch) for arch in ARCHS}


def hf_greedy(path, prompt_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # keep going past EOS, as ignore_eos does
    outs, logprobs = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0)
            outs.append(out[0, len(ids):].tolist())
            logprobs.append(torch.log_softmax(model(x).logits[0].float(), -1))
    return outs, logprobs


@pytest.fixture(scope="module")
def references(models):
    refs = {}
    for arch, path in models.items():
        llm = LLM(model=str(path), max_model_len=256)
        ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
        refs[arch] = (ids, *hf_greedy(path, ids))
    return refs


CASES = [("ample", None, "recompute"), ("tiny", 9, "recompute"), ("tiny", 9, "swap")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache,blocks,mode", CASES, ids=[f"{c}-{m}" for c, _, m in CASES])
def test_greedy_equals_transformers(models, references, arch, cache, blocks, mode):
    prompt_ids, hf_tokens, hf_logprobs = references[arch]
    # (float32 explicitly: on a GPU dtype="auto" would map these float32 models to float16)
    llm = LLM(model=str(models[arch]), dtype="float32", max_model_len=128, num_gpu_blocks_override=blocks,
              preemption_mode=mode, swap_space=0.01, check_invariants=True)
    preempted = []
    llm.add_event_listener(lambda e: preempted.append(e.mode) if e.kind == "preempted" else None)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out, ids, ref, ref_lp in zip(outs, prompt_ids, hf_tokens, hf_logprobs):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == ref, f"{arch}: greedy tokens differ from transformers"
        # prompt_logprobs[i] holds prompt token i, predicted from the tokens before it
        assert out.prompt_logprobs[0] is None
        for i in range(1, len(ids)):
            got = out.prompt_logprobs[i][ids[i]].logprob
            assert abs(got - ref_lp[i - 1, ids[i]].item()) < 1e-4
    if cache == "tiny":
        assert mode in preempted, f"the {blocks}-block cache should have forced preemption by {mode}"
    else:
        assert not preempted
    bm = llm.llm_engine.scheduler.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_cpu_blocks
