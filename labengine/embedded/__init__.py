"""The lab's own small model, shipped inside the package (see tinylab/README.md).

`DEFAULT_MODEL` is the absolute path of its Hugging Face folder, so
`LLM(model=labengine.DEFAULT_MODEL)` and
`transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)` work offline.
The short names in `MODEL_ALIASES` ("tinylab", "labengine/tinylab") mean the same;
`resolve_alias(name)` turns an alias into the path and leaves any other name as it is.
"""
import os

MODEL_NAME = "tinylab"
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODEL_NAME)

MODEL_ALIASES = {
    "tinylab": DEFAULT_MODEL,
    "labengine/tinylab": DEFAULT_MODEL,
}


def resolve_alias(name):
    """'tinylab' or 'labengine/tinylab' -> DEFAULT_MODEL; any other name (a path, a hub id) unchanged."""
    if isinstance(name, (str, os.PathLike)):
        return MODEL_ALIASES.get(os.fspath(name), name)
    return name


__all__ = ["DEFAULT_MODEL", "MODEL_ALIASES", "MODEL_NAME", "resolve_alias"]
