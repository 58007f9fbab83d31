"""The model layer against Hugging Face transformers, plus the loader's paths and errors.

Every architecture is built from a tiny random-weight HF folder (labengine.testing), run as
one flattened prefill of three prompts of different lengths over a paged KV cache with
scattered block tables, then a few decode steps that read that cache; logits must match
transformers' (float32, eager attention) to 1e-4.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import types

import pytest
import torch

from labengine.attention import get_attn_backend
from labengine.attention.torch_backend import TorchAttentionBackend
from labengine.models import (
    MODEL_REGISTRY,
    ModelNotFoundError,
    WeightsNotFoundError,
    get_model,
    get_model_class,
    iterate_weights,
    load_hf_config,
    resolve_model_path,
)
from labengine.models.layers import rope_inv_freq
from labengine.testing import (
    ARCHS,
    VOCAB_SIZE,
    flat_positions,
    make_attention_metadata,
    make_kv_caches,
    make_random_model,
    make_tokenizer,
)

ATOL = 1e-4
BLOCK_SIZE = 4
PROMPT_LENS = [5, 11, 3]
# scattered, non-contiguous physical blocks; enough for each prompt + DECODE_STEPS tokens
BLOCK_TABLES = [[7, 2, 9], [1, 5, 3, 11, 12], [4, 6]]
DECODE_STEPS = 3

# (name, arch, config overrides): every architecture, plus variants that switch on the
# config paths the plain tiny models leave off
VARIANTS = [(arch, arch, {}) for arch in ARCHS] + [
    (
        "llama-bias-tied-llama3rope",
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    ("llama-linear-rope-headdim", "llama", dict(head_dim=24, rope_scaling=dict(rope_type="linear", factor=2.0))),
    ("mistral-dynamic-rope", "mistral", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    ("opt-350m-style", "opt", dict(word_embed_proj_dim=32, do_layer_norm_before=False)),
    ("gpt2-inverse-layer-scale", "gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(name, arch, **overrides) -> folder, built once per session."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def make(name, arch, **overrides):
        if name not in made:
            made[name] = make_random_model(arch, root / name, **overrides)
        return made[name]

    return make


def load_ours(path, dtype=torch.float32, load_format="auto", backend="torch"):
    """Our model on the CPU; backend "triton" runs Triton's interpreter (the GPU path: the
    Triton attention kernels and, for the Llama family, the fused norm/rotary/SiLU kernels)."""
    attn = TorchAttentionBackend() if backend == "torch" else get_attn_backend("triton", torch.device("cpu"))
    return get_model(path, load_hf_config(path), "cpu", dtype, attn, load_format=load_format)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def random_prompts(vocab_size, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]


def prefill_logits(model, prompts, kv_caches):
    """One flattened prefill step of all prompts; logits of every token [T, V]."""
    lens = [len(p) for p in prompts]
    meta = make_attention_metadata([0] * len(prompts), lens, BLOCK_TABLES[: len(prompts)], BLOCK_SIZE)
    input_ids = torch.tensor(sum(prompts, []), dtype=torch.int64)
    hidden = model(input_ids, flat_positions([0] * len(prompts), lens), kv_caches, meta)
    assert hidden.shape == (sum(lens), model.hidden_size)
    return model.compute_logits(hidden)


# these models run on CPU tensors, so the Triton path needs the interpreter (on a GPU machine
# the same kernels are checked by test_cuda_model_matches_cpu_transformers and test_engine_vs_hf)
TRITON_PATH = pytest.param(
    "triton", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs TRITON_INTERPRET=1 (conftest.py sets it without a GPU)"))


@pytest.mark.parametrize("backend", ["torch", TRITON_PATH])
@pytest.mark.parametrize("name,arch,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_prefill_and_decode_match_transformers(model_dir, name, arch, overrides, backend):
    path = model_dir(name, arch, **overrides)
    ours, hf = load_ours(path, backend=backend), load_hf(path)
    if backend == "triton" and arch not in ("opt", "gpt2"):
        assert ours.model.layers[0].mlp.kernels is not None  # the fused kernels are in use
    vocab = ours.vocab_size
    prompts = random_prompts(vocab, PROMPT_LENS)
    kv_caches = make_kv_caches(ours, num_blocks=16, block_size=BLOCK_SIZE)

    with torch.inference_mode():
        logits = prefill_logits(ours, prompts, kv_caches)
        assert logits.dtype == torch.float32 and logits.shape == (sum(PROMPT_LENS), vocab)
        start = 0
        for prompt in prompts:
            ref = hf(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits[start : start + len(prompt)], ref, atol=ATOL, rtol=0)
            start += len(prompt)
        # the reference is not trivially flat: a wrong RoPE/bias/norm would move it by far more than ATOL
        assert logits.abs().max() > 1.0

        seqs = [list(p) for p in prompts]
        last = logits[torch.tensor(PROMPT_LENS).cumsum(0) - 1]
        for _ in range(DECODE_STEPS):
            next_tokens = last.argmax(-1).tolist()
            context = [len(s) for s in seqs]
            for seq, tok in zip(seqs, next_tokens):
                seq.append(tok)
            meta = make_attention_metadata(context, [1] * len(seqs), BLOCK_TABLES, BLOCK_SIZE)
            assert not meta.is_prefill
            hidden = ours(torch.tensor(next_tokens), flat_positions(context, [1] * len(seqs)), kv_caches, meta)
            last = ours.compute_logits(hidden)
            for i, seq in enumerate(seqs):
                ref = hf(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(last[i], ref, atol=ATOL, rtol=0)


def test_prefill_on_top_of_cached_context(model_dir):
    """A prompt prefilled in two chunks (the second with context_lens > 0) equals one pass."""
    path = model_dir("llama", "llama")
    ours, hf = load_ours(path), load_hf(path)
    (prompt,) = random_prompts(ours.vocab_size, [11], seed=3)
    table = [[6, 0, 3]]
    kv_caches = make_kv_caches(ours, num_blocks=8, block_size=BLOCK_SIZE)
    with torch.inference_mode():
        meta = make_attention_metadata([0], [6], table, BLOCK_SIZE)
        ours(torch.tensor(prompt[:6]), flat_positions([0], [6]), kv_caches, meta)
        meta = make_attention_metadata([6], [5], table, BLOCK_SIZE)
        assert meta.is_prefill
        logits = ours.compute_logits(ours(torch.tensor(prompt[6:]), flat_positions([6], [5]), kv_caches, meta))
        ref = hf(torch.tensor([prompt])).logits[0, 6:]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "arch,num_kv_heads,head_size",
    [("llama", 2, 16), ("mistral", 2, 16), ("qwen2", 2, 16), ("qwen3", 2, 32), ("opt", 4, 16), ("gpt2", 4, 16)],
)
def test_cache_shape_attributes_and_eval_state(model_dir, arch, num_kv_heads, head_size):
    model = load_ours(model_dir(arch, arch))
    assert (model.num_layers, model.num_kv_heads, model.head_size) == (2, num_kv_heads, head_size)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_bfloat16_model_is_built_in_bfloat16_and_tracks_float32(model_dir):
    path = model_dir("qwen3", "qwen3")
    ours32, ours16 = load_ours(path), load_ours(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours16.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the build did not leak its default dtype
    prompts = random_prompts(ours32.vocab_size, PROMPT_LENS)
    with torch.inference_mode():
        l32 = prefill_logits(ours32, prompts, make_kv_caches(ours32, 16, BLOCK_SIZE))
        l16 = prefill_logits(ours16, prompts, make_kv_caches(ours16, 16, BLOCK_SIZE, dtype=torch.bfloat16))
    assert l16.dtype == torch.bfloat16  # logits in the model's dtype; the sampler upcasts
    l16 = l16.float()
    assert (l16 - l32).abs().max() < 0.5  # bf16 rounding over two layers; a real bug is O(logit scale)
    assert (l16.argmax(-1) == l32.argmax(-1)).float().mean() > 0.8


def test_rope_theta_and_rope_scaling_from_old_style_config():
    """Configs from before transformers 5 keep `rope_theta` and `rope_scaling` ({"type": ...})."""
    base = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=512)
    plain = types.SimpleNamespace(**base, rope_theta=1000.0, rope_scaling=None)
    linear = types.SimpleNamespace(**base, rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 4.0})
    expected = 1.0 / (1000.0 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(rope_inv_freq(plain, 16), expected)
    torch.testing.assert_close(rope_inv_freq(linear, 16), expected / 4.0)
    yarn = types.SimpleNamespace(**base, rope_theta=1000.0, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_type='yarn'.*allowed: default, linear, llama3, dynamic"):
        rope_inv_freq(yarn, 16)


# ----------------------------------------------------------------------------- registry


def test_registry_covers_the_supported_architectures():
    assert set(MODEL_REGISTRY) == {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "OPTForCausalLM",
        "GPT2LMHeadModel",
    }


def test_unsupported_architecture_is_named_with_the_supported_ones():
    from transformers import BertConfig

    config = BertConfig(architectures=["BertForMaskedLM"])
    with pytest.raises(ValueError) as err:
        get_model_class(config)
    msg = str(err.value)
    assert "BertForMaskedLM" in msg
    for arch in MODEL_REGISTRY:
        assert arch in msg


def test_config_without_architectures_falls_back_to_model_type():
    from transformers import LlamaConfig

    assert get_model_class(LlamaConfig()).__name__ == "LlamaForCausalLM"


# ----------------------------------------------------------------------------- loader


def test_resolve_local_folder(model_dir):
    path = model_dir("gpt2", "gpt2")
    assert resolve_model_path(str(path)) == path.resolve()


def test_resolve_hub_id_from_local_cache_only(model_dir, tmp_path):
    """A hub id already in the HF cache resolves to its snapshot; the network is never used."""
    src = model_dir("gpt2", "gpt2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--lab--tiny-gpt2"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = resolve_model_path("lab/tiny-gpt2", download_dir=str(tmp_path / "hub"))
    assert path == repo / "snapshots" / commit
    model = load_ours(path)
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_missing_model_error_names_model_places_and_offline_choice(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model_path tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cache = tmp_path / "hf-cache"
    with pytest.raises(ValueError) as err:
        resolve_model_path("no-such-org/no-such-model", download_dir=str(cache))
    assert isinstance(err.value, ModelNotFoundError) and isinstance(err.value, OSError)
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg
    assert str(cache) in msg  # the HF cache it looked in
    assert "local folder at" in msg  # and the path it checked
    assert "LLM(model=labengine.DEFAULT_MODEL)" in msg


def test_bad_load_format_lists_allowed_values(model_dir):
    with pytest.raises(ValueError, match=r"load_format='gguf'.*auto, pt, safetensors"):
        iterate_weights(model_dir("gpt2", "gpt2"), load_format="gguf")


def test_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match=r"no weight files for load_format='auto'.*config.json"):
        iterate_weights(tmp_path)


def test_load_hf_config_needs_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_config(tmp_path)


def _logits(model, prompt):
    kv = make_kv_caches(model, 8, BLOCK_SIZE)
    meta = make_attention_metadata([0], [len(prompt)], [[0, 1, 2]], BLOCK_SIZE)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(prompt), flat_positions([0], [len(prompt)]), kv, meta))


def _copy_without_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_bin_checkpoint_loads_like_safetensors(model_dir, tmp_path, arch):
    src = model_dir(arch, arch)
    state = dict(iterate_weights(src, "safetensors"))
    dst = _copy_without_weights(src, tmp_path / "bin")
    torch.save(state, dst / "pytorch_model.bin")
    prompt = random_prompts(VOCAB_SIZE, [9])[0]
    expected = _logits(load_ours(src), prompt)
    for fmt in ("auto", "pt"):
        torch.testing.assert_close(_logits(load_ours(dst, load_format=fmt), prompt), expected, atol=0, rtol=0)
    with pytest.raises(WeightsNotFoundError, match=r"load_format='safetensors'.*\*\.safetensors"):
        load_ours(dst, load_format="safetensors")


def test_sharded_safetensors_with_index(model_dir, tmp_path):
    src = model_dir("qwen2", "qwen2")
    hf = load_hf(src)
    dst = _copy_without_weights(src, tmp_path / "sharded")
    hf.save_pretrained(dst, max_shard_size="100KB")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(n for n, _ in iterate_weights(dst)) == sorted(n for n, _ in iterate_weights(src))
    prompt = random_prompts(VOCAB_SIZE, [7])[0]
    torch.testing.assert_close(_logits(load_ours(dst), prompt), _logits(load_ours(src), prompt), atol=0, rtol=0)


def test_original_gpt2_and_opt_checkpoint_names(model_dir, tmp_path):
    """The `gpt2` and `facebook/opt-*` repos saved the base model: no `transformer.`/`model.` prefix,
    and GPT-2's causal-mask buffers `attn.bias`/`attn.masked_bias` alongside."""
    for arch, prefix in (("gpt2", "transformer."), ("opt", "model.")):
        src = model_dir(arch, arch)
        state = {}
        for name, t in iterate_weights(src):
            state[name[len(prefix) :] if name.startswith(prefix) else name] = t
        if arch == "gpt2":
            state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 512, 512))
            state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
        dst = _copy_without_weights(src, tmp_path / arch)
        torch.save(state, dst / "pytorch_model.bin")
        prompt = random_prompts(VOCAB_SIZE, [6])[0]
        torch.testing.assert_close(_logits(load_ours(dst), prompt), _logits(load_ours(src), prompt), atol=0, rtol=0)


def test_missing_or_misshapen_weights_are_errors(model_dir):
    path = model_dir("qwen3", "qwen3")
    cfg = load_hf_config(path)
    cls = get_model_class(cfg)
    weights = dict(iterate_weights(path))
    partial = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        cls(cfg, TorchAttentionBackend()).load_weights(partial.items())
    bad = dict(weights, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\).*expects \(64,\)"):
        cls(cfg, TorchAttentionBackend()).load_weights(bad.items())


# ----------------------------------------------------------------------------- testing helpers


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_folder_is_consistent_and_offline(model_dir, arch):
    from transformers import AutoTokenizer

    path = model_dir(arch, arch)
    cfg = load_hf_config(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert (path / "generation_config.json").is_file()
    text = "The capital of France is Paris."
    ids = tok.encode(text)
    assert len(ids) < len(text) // 2  # the trained merges work
    assert tok.decode(ids, skip_special_tokens=True) == text
    if cfg.model_type in ("llama", "mistral", "opt"):
        assert ids[0] == 1
    if arch == "llama":
        assert cfg.num_key_value_heads < cfg.num_attention_heads  # the GQA path


def test_make_random_model_reuses_an_existing_folder(tmp_path):
    path = make_random_model("gpt2", tmp_path / "m")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert make_random_model("gpt2", tmp_path / "m") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    make_random_model("gpt2", tmp_path / "m", seed=1)  # different arguments: rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_tokenizer_round_trips_unseen_text():
    tok = make_tokenizer(add_bos=False)
    text = "Zürich, 2026: naïve café ☕ — done."
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "gpt2"])
def test_cuda_model_matches_cpu_transformers(model_dir, arch, backend):
    """Built directly on the GPU (parameters and cos/sin there too), float32, same logits;
    "triton": our attention kernels and, for the Llama family, the fused layer kernels."""
    path = model_dir(arch, arch)
    ours = get_model(path, load_hf_config(path), "cuda", torch.float32, get_attn_backend(backend, torch.device("cuda")))
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    hf = load_hf(path)
    prompts = random_prompts(ours.vocab_size, PROMPT_LENS)
    kv_caches = make_kv_caches(ours, 16, BLOCK_SIZE, device="cuda")
    lens = [len(p) for p in prompts]
    meta = make_attention_metadata([0] * 3, lens, BLOCK_TABLES, BLOCK_SIZE, device="cuda")
    with torch.inference_mode():
        ids = torch.tensor(sum(prompts, []), device="cuda")
        logits = ours.compute_logits(ours(ids, flat_positions([0] * 3, lens, device="cuda"), kv_caches, meta)).cpu()
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
