"""Device-dependent defaults (issue 20 item 2): what LLM(model) chooses on a GPU, checked on the
CPU by passing the device's facts. Explicit values always win; CPU defaults are vLLM 0.5.4's."""
import pytest
import torch

from labengine import EngineArgs
from labengine import config as config_mod
from labengine.config import default_max_num_batched_tokens
from labengine.testing import make_random_model

GiB = 1 << 30
H200 = ("NVIDIA H200", 143771 * (1 << 20))
H100 = ("NVIDIA H100 80GB HBM3", 80 * GiB)
A100_80 = ("NVIDIA A100-SXM4-80GB", 80 * GiB)
L4 = ("NVIDIA L4", 24 * GiB)


@pytest.mark.parametrize("gpu,max_model_len,expected", [
    (H200, 4096, 16384),
    (H200, 2048, 16384),
    (H100, 40960, 40960),  # never below max_model_len: a whole prompt fits one step
    (A100_80, 4096, 8192),  # vLLM leaves the A100 out of its large-GPU defaults
    (L4, 4096, 8192),
    (L4, 1024, 8192),
])
def test_gpu_budget_from_the_device(gpu, max_model_len, expected):
    assert default_max_num_batched_tokens(max_model_len, *gpu) == expected


@pytest.mark.parametrize("max_model_len,expected", [(64, 2048), (2048, 2048), (4096, 4096)])
def test_cpu_budget_is_vllm_054s(max_model_len, expected):
    assert default_max_num_batched_tokens(max_model_len) == expected
    assert default_max_num_batched_tokens(max_model_len, None, None) == expected


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model("llama", tmp_path_factory.mktemp("m")))


@pytest.fixture
def pretend_h200(monkeypatch):
    """EngineConfig.from_engine_args as on an H200 (nothing in it touches the device but its facts)."""
    monkeypatch.setattr(config_mod, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(config_mod, "_cuda_facts", lambda device: H200)


def test_engine_config_on_a_large_gpu_chooses_the_tuned_budget(pretend_h200, model_path):
    cfg = EngineArgs(model=model_path, max_model_len=64).create_engine_config()
    assert cfg.device.type == "cuda"
    assert cfg.scheduler_config.max_num_batched_tokens == 16384
    assert cfg.scheduler_config.max_num_seqs == 256
    assert cfg.cache_config.gpu_memory_utilization == 0.9


def test_explicit_values_win_on_a_gpu(pretend_h200, model_path):
    cfg = EngineArgs(model=model_path, max_model_len=64, max_num_batched_tokens=512, max_num_seqs=8,
                     gpu_memory_utilization=0.5).create_engine_config()
    assert cfg.scheduler_config.max_num_batched_tokens == 512
    assert cfg.scheduler_config.max_num_seqs == 8
    assert cfg.cache_config.gpu_memory_utilization == 0.5


def test_cpu_engine_config_unchanged(model_path):
    cfg = EngineArgs(model=model_path, max_model_len=64, device="cpu").create_engine_config()
    assert cfg.scheduler_config.max_num_batched_tokens == 2048
    assert config_mod._cuda_facts(torch.device("cpu")) == (None, None)
