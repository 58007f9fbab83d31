"""Models from the Hub: `LLM("facebook/opt-125m")` downloads when online, as vLLM does; no network.

A loopback stand-in for the Hugging Face Hub (the routes huggingface_hub uses:
`/api/models/<repo>[/revision/<rev>]` for the commit and file list, `/api/models/<repo>/tree/<rev>`
for the file tree, and `/<repo>/resolve/<rev>/<file>` for the files) serves fixture repos built from small
random-weight configs; `HF_ENDPOINT` points at it and `HF_HOME` at a temporary folder. Each
LLM runs in a fresh Python process, so huggingface_hub reads the environment as a learner's
process does. Checked: the download (config, tokenizer, one weight format only), that
`download_dir` and `revision` are honoured, that a cached model loads with the network gone,
and that `HF_HUB_OFFLINE=1` with a model not cached keeps the clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from labengine.testing import make_random_model

REPO = "facebook/opt-125m"
MAIN, OTHER = "a" * 40, "b" * 40  # commits of the fixture repo: main, and a tag "v2"


class FakeHub:
    """repo id -> {commit -> {file name -> bytes}}, refs (branch/tag -> commit), and a request log."""

    def __init__(self) -> None:
        self.repos: dict = {}
        self.refs: dict = {}
        self.log: list = []

    def add(self, repo: str, commit: str, folder: Path, refs=("main",), extra=None) -> None:
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        files.update(extra or {})
        self.repos.setdefault(repo, {})[commit] = files
        for ref in refs:
            self.refs[(repo, ref)] = commit

    def commit_of(self, repo: str, rev: str):
        if rev in self.repos.get(repo, {}):
            return rev
        return self.refs.get((repo, rev))

    def handler(hub):  # noqa: N805 - the handler class closes over the hub
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", headers=None, head=False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head):
                path = unquote(self.path.split("?")[0])
                hub.log.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    repo, commit = "/".join(parts[2:4]), hub.commit_of("/".join(parts[2:4]), parts[5])
                    if commit is None:
                        return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
                    body = json.dumps([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                       for f, d in hub.repos[repo][commit].items()]).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                    commit = hub.commit_of(repo, rev)
                    if commit is None:
                        return self._send(404, b'{"error": "Repository not found"}',
                                          {"X-Error-Code": "RepositoryNotFound"}, head)
                    body = json.dumps({"id": repo, "modelId": repo, "sha": commit, "private": False,
                                       "siblings": [{"rfilename": f} for f in hub.repos[repo][commit]]}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    commit = hub.commit_of(repo, rev)
                    if commit is None:
                        return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
                    data = hub.repos[repo][commit].get(name)
                    if data is None:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                    return self._send(200, data, {"X-Repo-Commit": commit, "ETag": etag,
                                                  "Content-Type": "application/octet-stream"}, head)
                return self._send(404, b"", {}, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        return Handler


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    fake = FakeHub()
    base = tmp_path_factory.mktemp("hub_fixture")
    main = make_random_model("opt", base / "main", num_hidden_layers=2)
    v2 = make_random_model("opt", base / "v2", seed=1, num_hidden_layers=3)
    # a second weight format and a file the engine never reads: neither may be downloaded
    fake.add(REPO, MAIN, main, extra={"pytorch_model.bin": b"not-read", "flax_model.msgpack": b"not-read"})
    fake.add(REPO, OTHER, v2, refs=("v2",))
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    thread.join(timeout=10)


SCRIPT = r"""
import json, sys
from labengine import LLM, SamplingParams
kwargs = json.loads(sys.argv[1])
llm = LLM(num_gpu_blocks_override=32, **kwargs)
out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
mc = llm.llm_engine.model_config
print(json.dumps({"path": str(mc.model_path), "tokenizer_path": str(mc.tokenizer_path),
                  "layers": mc.hf_config.num_hidden_layers,
                  "tokens": list(out.outputs[0].token_ids)}))
"""


def run_llm(tmp_path, hub_url, offline=False, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kwargs)], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc


def result_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_model_downloads_then_loads_from_the_cache(hub, tmp_path):
    hub.log.clear()
    first = result_of(run_llm(tmp_path, hub.url, model=REPO))
    path = Path(first["path"])
    assert path.is_relative_to(tmp_path / "hf_home") and path.name == MAIN
    assert first["layers"] == 2 and len(first["tokens"]) == 3
    got = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= got
    assert "pytorch_model.bin" not in got and "flax_model.msgpack" not in got  # one weight format, nothing else
    assert not any("pytorch_model.bin" in p for _, p in hub.log)
    # cached: the same model loads with HF_HUB_OFFLINE=1, and online it asks the Hub nothing
    assert result_of(run_llm(tmp_path, hub.url, offline=True, model=REPO)) == first
    hub.log.clear()
    assert result_of(run_llm(tmp_path, hub.url, model=REPO)) == first
    assert hub.log == []


def test_revision_and_download_dir(hub, tmp_path):
    target = tmp_path / "models"
    out = result_of(run_llm(tmp_path, hub.url, model=REPO, revision="v2", download_dir=str(target)))
    path = Path(out["path"])
    assert path.is_relative_to(target) and path.name == OTHER and out["layers"] == 3
    assert not (tmp_path / "hf_home" / "hub").exists()  # download_dir replaces the HF cache
    # a tokenizer from another revision: its files come down, its weights do not
    out = result_of(run_llm(tmp_path, hub.url, model=REPO, tokenizer=REPO, tokenizer_revision="v2"))
    tok_path = Path(out["tokenizer_path"])
    assert Path(out["path"]).name == MAIN and tok_path.name == OTHER
    assert (tok_path / "tokenizer.json").is_file() and not (tok_path / "model.safetensors").exists()


def test_offline_and_not_cached_keeps_the_clear_message(hub, tmp_path):
    hub.log.clear()
    proc = run_llm(tmp_path, hub.url, offline=True, model=REPO)
    assert proc.returncode != 0
    assert "was not found locally" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "LLM(model=labengine.DEFAULT_MODEL)" in proc.stderr
    assert hub.log == []  # offline means no request at all


def test_unknown_repo_online_names_the_model_and_the_offline_choice(hub, tmp_path):
    proc = run_llm(tmp_path, hub.url, model="no-such-org/no-such-model")
    assert proc.returncode != 0
    assert "no-such-org/no-such-model" in proc.stderr and "could not be downloaded" in proc.stderr
    assert "LLM(model=labengine.DEFAULT_MODEL)" in proc.stderr


def test_embedded_model_stays_the_default():
    import labengine
    from labengine.entrypoints.openai.cli import default_model

    assert labengine.DEFAULT_MODEL.endswith("tinylab") and default_model() == "labengine/tinylab"


def test_a_missing_folder_is_never_looked_up_on_the_hub(hub, tmp_path):
    hub.log.clear()
    proc = run_llm(tmp_path, hub.url, model=str(tmp_path / "no" / "such" / "folder"))
    assert proc.returncode != 0 and "was not found locally" in proc.stderr and "It is a path" in proc.stderr
    assert hub.log == []
