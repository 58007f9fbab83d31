"""Finding a model (on disk, in the HF cache, or on the Hub) and reading its config and weights.

- `resolve_model_path`: a local folder; else a Hugging Face hub id, taken from the local HF
  cache when it is there and otherwise downloaded from the Hub, as vLLM does (config,
  tokenizer files and one weight format: safetensors when the repo has them, else `.bin`).
  `download_dir` replaces the HF cache folder, `revision` picks a branch, tag or commit.
  With `HF_HUB_OFFLINE=1` (read when the model is resolved) nothing is downloaded, and a
  model that is not cached is an error that points at the embedded model, which works
  offline. `HF_ENDPOINT` (read at the same time) picks the Hub, as huggingface_hub does.
- `load_hf_config`: transformers' AutoConfig on that folder.
- `iterate_weights`: `(name, tensor)` pairs from safetensors (single or sharded) or
  PyTorch `.bin`/`.pt` files, one file at a time so a big checkpoint is never all in memory.
  `.bin` files are read with `torch.load(weights_only=True)`: no pickled code runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

LOAD_FORMATS = ("auto", "pt", "safetensors")

# files next to the weights that are not weights (trainer state), skipped by the .bin/.pt glob
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"}


class ModelNotFoundError(ValueError, FileNotFoundError):
    """The model is neither a local folder nor in the local HF cache.

    A ValueError (the engine's argument errors are) that is also a FileNotFoundError/OSError,
    which is what transformers raises for the same situation.
    """


class WeightsNotFoundError(ValueError, FileNotFoundError):
    """The model folder has no weight files of the requested format."""


def _hf_cache_dir(download_dir) -> str:
    if download_dir is not None:
        return str(download_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now: a notebook may set it after import."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value is not None:
            if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
                return True
    return bool(constants.HF_HUB_OFFLINE)


# what a model folder needs besides its weights: config, generation config, tokenizer files
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# one weight format, the first the repo has (vLLM's order)
_HUB_WEIGHTS = (["*.safetensors"], ["*.bin"], ["*.pt"])


def download_model(model: str, revision: str | None = None, download_dir: str | None = None,
                   weights: bool = True) -> Path:
    """Download `model` from the Hub into the HF cache (or `download_dir`); its snapshot folder.

    Only what the engine reads comes down: config and tokenizer files and one weight format
    (no weights for a tokenizer-only lookup, `weights=False`).
    """
    import fnmatch

    from huggingface_hub import HfApi, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    info = HfApi(endpoint=endpoint).model_info(model, revision=revision)
    names = [s.rfilename for s in (info.siblings or [])]
    weight_patterns = next((pats for pats in _HUB_WEIGHTS
                            if any(fnmatch.fnmatch(n, p) for n in names for p in pats)), [])
    patterns = _HUB_FILES + (weight_patterns if weights else [])
    path = snapshot_download(repo_id=model, revision=revision, cache_dir=download_dir,
                             allow_patterns=patterns, endpoint=endpoint)
    return Path(path)


def resolve_model_path(model: str, revision: str | None = None, download_dir: str | None = None,
                       weights: bool = True) -> Path:
    """The local folder holding `model`: the path itself, its snapshot in the HF cache, or a download."""
    model = os.fspath(model)
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ModelNotFoundError(
            f"model={model!r} is a file ({local.resolve()}); expected a folder with config.json and weights, "
            "or a Hugging Face hub id"
        )
    cache_dir = _hf_cache_dir(download_dir)
    reason = ""
    try:
        from huggingface_hub import try_to_load_from_cache

        # the cache first: no network call for a model that is already here. Its snapshot
        # folder is the one holding config.json (a download takes only the files the engine
        # reads, so the snapshot need not hold the whole repo).
        for name in ("config.json", "tokenizer_config.json") if not weights else ("config.json",):
            found = try_to_load_from_cache(model, name, cache_dir=download_dir, revision=revision)
            if isinstance(found, str) and Path(found).is_file():
                folder = Path(found).parent
                # a snapshot fetched for its tokenizer only has no weights: not enough for a model
                if not weights or any(folder.glob(p) for pats in _HUB_WEIGHTS for p in pats):
                    return folder
        reason = " (not in the cache)"
    except Exception as exc:  # invalid repo id, ...
        reason = f" ({type(exc).__name__})"
    rev = f" at revision {revision!r}" if revision else ""
    # "org/name" or "name" may be on the Hub; "/x", "./x", "~/x" or "a/b/c" can only be a folder
    looks_like_path = model.startswith(("/", ".", "~", "\\")) or model.count("/") > 1 or "\\" in model
    if not hub_offline() and not looks_like_path:
        try:
            return download_model(model, revision=revision, download_dir=download_dir, weights=weights)
        except Exception as exc:  # no network, no such repo or revision, gated repo, ...
            raise ModelNotFoundError(
                f"model {model!r}{rev} is not a local folder, not in the HF cache {cache_dir}, and could not be "
                f"downloaded from the Hugging Face Hub: {type(exc).__name__}: {exc}. Check the name (and "
                "revision), or, with no network, use the lab's embedded model, which works offline: "
                "LLM(model=labengine.DEFAULT_MODEL)"
            ) from None
    offline = ("HF_HUB_OFFLINE is set, so nothing is downloaded: download the model into that cache while online "
               f"(`huggingface-cli download {model}`, or unset HF_HUB_OFFLINE), " if not looks_like_path else
               "It is a path, not a Hugging Face hub id: check it, ")
    raise ModelNotFoundError(
        f"model {model!r}{rev} was not found locally{reason}. Looked for a local folder at {local.resolve()} "
        f"and for a Hugging Face hub id in the local HF cache {cache_dir}. {offline}pass a local folder, or "
        "use the lab's embedded model, which works offline: LLM(model=labengine.DEFAULT_MODEL)"
    )


def load_hf_config(path, trust_remote_code: bool = False, revision: str | None = None):
    """The transformers config of the model folder `path` (already local: resolve_model_path fetched it)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"no config.json in model folder {path}; a Hugging Face model folder needs one")
    return AutoConfig.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, revision=revision, local_files_only=True
    )


def _from_index(path: Path, index_name: str) -> list[Path] | None:
    """Shard files named by a `*.index.json` weight map, in order, or None if there is no index."""
    index = path / index_name
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text())["weight_map"]
    return [path / f for f in sorted(set(weight_map.values()))]


def weight_files(path, load_format: str = "auto") -> tuple[str, list[Path]]:
    """("safetensors" or "pt", the weight files to read) for the model folder `path`."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; allowed: {', '.join(LOAD_FORMATS)}")
    path = Path(path)
    if load_format in ("auto", "safetensors"):
        files = _from_index(path, "model.safetensors.index.json") or sorted(path.glob("*.safetensors"))
        if files:
            return "safetensors", files
    if load_format in ("auto", "pt"):
        files = _from_index(path, "pytorch_model.bin.index.json")
        if files is None:
            files = [f for f in sorted(path.glob("*.bin")) if f.name not in _NOT_WEIGHTS]
            files = files or [f for f in sorted(path.glob("*.pt")) if f.name not in _NOT_WEIGHTS]
        if files:
            return "pt", files
    wanted = {"auto": "*.safetensors, *.bin or *.pt", "safetensors": "*.safetensors", "pt": "*.bin or *.pt"}
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise WeightsNotFoundError(
        f"no weight files for load_format={load_format!r} in {path}: looked for {wanted[load_format]}; "
        f"the folder holds {present[:20] or 'nothing'}"
    )


def iterate_weights(path, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, CPU tensor) for every weight of the model folder `path`.

    "auto" prefers safetensors (sharded via model.safetensors.index.json or not), then
    .bin (pytorch_model.bin.index.json or *.bin), then *.pt; "safetensors"/"pt" force one.
    """
    kind, files = weight_files(path, load_format)  # validates now, not at the first next()
    return _iterate(kind, files)


def _iterate(kind, files):
    for f in files:
        if not f.is_file():
            raise WeightsNotFoundError(f"weight file {f} is listed in the index but missing")
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"{f} does not hold a state dict (got {type(state).__name__})")
            yield from state.items()
            del state
