"""LLM: the offline entry point, vLLM's `LLM` class.

`LLM(model=...)` builds an LLMEngine; `generate(...)` validates every prompt of the call
first (so a bad one raises before anything runs), queues them, steps the engine until all
are done and returns one RequestOutput per prompt, in input order.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Optional, Sequence, Union

from labengine.arg_utils import EngineArgs
from labengine.guided_decoding import GuidedDecodingRequest, get_guided_decoding_logits_processor
from labengine.llm_engine import LLMEngine
from labengine.outputs import RequestOutput
from labengine.sampling_params import SamplingParams
from labengine.utils import Counter


@contextlib.contextmanager
def _no_full_gc():
    """Python's full (generation 2) garbage collection paused for the duration.

    A generation keeps every request's tokens and logprob dicts alive, hundreds of thousands
    of tracked objects; each full collection walks all of them, 0.1-0.3 s with the engine's
    Python thread stopped (measured: 4 full collections, 423 ms, during a 256-request CPU
    run), which on a GPU is that long with the GPU idle. `generate` pauses them for its
    run: young collections still run (short-lived cyclic garbage is still freed), and full
    ones resume when the call returns."""
    old = gc.get_threshold()
    gc.set_threshold(old[0], old[1], 1_000_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*old)


class LLM:
    """An LLM for offline inference: `LLM(model).generate(prompts, sampling_params)`."""

    def __init__(self, model: str, tokenizer: Optional[str] = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 dtype="auto", quantization: Optional[str] = None, revision: Optional[str] = None,
                 tokenizer_revision: Optional[str] = None, seed: int = 0, gpu_memory_utilization: float = 0.9,
                 swap_space: float = 4, enforce_eager: bool = False, max_context_len_to_capture: Optional[int] = None,
                 max_seq_len_to_capture: int = 8192, disable_custom_all_reduce: bool = False, **kwargs) -> None:
        kwargs.setdefault("disable_log_stats", True)
        engine_args = EngineArgs(
            model=model, tokenizer=tokenizer, tokenizer_mode=tokenizer_mode, skip_tokenizer_init=skip_tokenizer_init,
            trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            quantization=quantization, revision=revision, tokenizer_revision=tokenizer_revision, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, swap_space=swap_space, enforce_eager=enforce_eager,
            max_context_len_to_capture=max_context_len_to_capture, max_seq_len_to_capture=max_seq_len_to_capture,
            disable_custom_all_reduce=disable_custom_all_reduce, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self.request_counter = Counter()

    # ------------------------------------------------------------------ tokenizer
    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        engine = self.llm_engine
        engine.tokenizer = tokenizer
        from labengine.detokenizer import Detokenizer

        engine.detokenizer = Detokenizer(tokenizer)
        engine.output_processor.detokenizer = engine.detokenizer

    # ------------------------------------------------------------------ generate
    def generate(self, prompts=None, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 prompt_token_ids: Optional[list[list[int]]] = None, use_tqdm: bool = True,
                 lora_request=None, guided_options_request=None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order.

        ``guided_options_request`` (a `GuidedDecodingRequest` or its dict form, vLLM v0.5.4's
        `LLMGuidedOptions`) constrains every prompt's output to a JSON schema, regex, choice
        or grammar; each request gets its own guided logits processor (the caller's
        SamplingParams are not changed).
        """
        if lora_request is not None:
            raise ValueError("lora_request is not supported: labengine has no LoRA adapters.")
        inputs = self._collect_inputs(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(inputs):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(inputs)
        engine = self.llm_engine
        guided = GuidedDecodingRequest.from_options(guided_options_request)
        if guided is not None and not guided.is_empty:
            params_list = [self._add_guided_processor(sp, guided) for sp in params_list]
        # Validate the whole call before any request starts: nothing runs, nothing leaks.
        processed = [engine.process_request(p, sp) for p, sp in zip(inputs, params_list)]
        ids = []
        for req in processed:
            request_id = str(next(self.request_counter))
            engine.add_processed_request(request_id, req)
            ids.append(request_id)
        return self._run_engine(ids, use_tqdm)

    def _add_guided_processor(self, params: SamplingParams, guided: GuidedDecodingRequest) -> SamplingParams:
        """A copy of `params` with one more logits processor: the guided one (a new one per request)."""
        engine = self.llm_engine
        processor = get_guided_decoding_logits_processor(
            guided, engine.tokenizer, engine.model_runner.vocab_size, engine.eos_token_ids,
            backend=guided.guided_decoding_backend or engine.guided_decoding_backend)
        params = params.clone()
        params.logits_processors = list(params.logits_processors or []) + [processor]
        return params

    @staticmethod
    def _collect_inputs(prompts, prompt_token_ids) -> list:
        if prompts is None and prompt_token_ids is None:
            raise ValueError("Either prompts or prompt_token_ids must be provided.")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if prompt_token_ids is not None and prompt_token_ids and isinstance(prompt_token_ids[0], int):
            prompt_token_ids = [prompt_token_ids]
        if prompts is not None and prompt_token_ids is not None:
            if len(prompts) != len(prompt_token_ids):
                raise ValueError("The lengths of prompts and prompt_token_ids must be the same.")
            return [{"prompt": p, "prompt_token_ids": t} for p, t in zip(prompts, prompt_token_ids)]
        if prompts is not None:
            return list(prompts)
        return [{"prompt_token_ids": t} for t in prompt_token_ids]

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                       postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        in_toks = out_toks = 0
        with _no_full_gc():
            try:
                while pending and engine.has_unfinished_requests():
                    for out in engine.step(final_only=True):
                        if out.finished and out.request_id in pending:
                            pending.discard(out.request_id)
                            finished[out.request_id] = out
                            if bar is not None:
                                in_toks += len(out.prompt_token_ids)
                                out_toks += sum(len(c.token_ids) for c in out.outputs)
                                rate = bar.format_dict["elapsed"] or 1e-9
                                bar.set_postfix_str(f"est. speed input: {in_toks / rate:.2f} toks/s, "
                                                    f"output: {out_toks / rate:.2f} toks/s", refresh=False)
                                bar.update(1)
                    errors = [engine.request_errors.pop(i) for i in request_ids if i in engine.request_errors]
                    if errors:
                        raise errors[0]
            except BaseException:
                # Leave the engine clean and usable: abort what this call started.
                engine.abort_request(list(pending))
                raise
            finally:
                if bar is not None:
                    bar.close()
        return sorted(finished.values(), key=lambda o: int(o.request_id))

    # ------------------------------------------------------------------ watching
    def trace(self):
        """`with llm.trace() as trace:` records the engine's events; `trace.to_dataframe()` tabulates them."""
        return self.llm_engine.trace()

    def add_event_listener(self, fn) -> None:
        self.llm_engine.add_event_listener(fn)

    def remove_event_listener(self, fn) -> None:
        self.llm_engine.remove_event_listener(fn)

    def __repr__(self) -> str:
        mc = self.llm_engine.model_config
        return f"LLM(model={mc.model!r}, dtype={mc.dtype}, device={self.llm_engine.config.device})"
