"""LLMEngine: requests in, one step at a time, RequestOutputs out.

`add_request` tokenizes and validates a prompt and queues it; `step` runs one
schedule -> forward -> sample -> process cycle and returns the outputs of every request
that took part. `LLM` (offline) and `AsyncLLMEngine` (online) are thin loops around it.
Every step is timed by part and published on the event bus.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Union

from labengine.arg_utils import EngineArgs
from labengine.config import EngineConfig
from labengine.detokenizer import Detokenizer, StopChecker
from labengine.events import EventBus, RequestAdded, RequestFinished, StepFinished
from labengine.model_runner import ModelRunner, StepTimings
from labengine.output_processor import OutputProcessor
from labengine.outputs import RequestOutput
from labengine.sampler import Sampler, SamplingMetadata, SequenceGroupToSample
from labengine.sampling_params import SamplingParams, SamplingParamsValueError, verify_max_logprobs
from labengine.scheduler import Scheduler, SchedulerOutputs
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus
from labengine.utils import Counter, cdiv, logger

PromptType = Union[str, dict, list]


class ProcessedRequest:
    """A prompt that passed validation: text, token ids and a private copy of the params."""

    __slots__ = ("prompt", "prompt_token_ids", "params")

    def __init__(self, prompt, prompt_token_ids, params):
        self.prompt, self.prompt_token_ids, self.params = prompt, prompt_token_ids, params


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        mc = config.model_config
        logger.info("Initializing an LLM engine with config: model=%r, dtype=%s, max_model_len=%d, device=%s, "
                    "block_size=%d, seed=%d", mc.model, mc.dtype, mc.max_model_len, config.device,
                    config.cache_config.block_size, mc.seed)
        self.tokenizer = None if mc.skip_tokenizer_init else _load_tokenizer(mc)
        self.event_bus = EventBus()
        if config.tensor_parallel_size > 1:  # rank 0 of a process group; workers run the other ranks
            from labengine.distributed import TensorParallelModelRunner

            self.model_runner = TensorParallelModelRunner(config)
        else:
            self.model_runner = ModelRunner(config)
        logger.info("Model weights loaded in %.2f s.", self.model_runner.load_time_s)
        num_gpu, num_cpu = self.model_runner.determine_num_blocks()
        config.cache_config.num_gpu_blocks, config.cache_config.num_cpu_blocks = num_gpu, num_cpu
        self.model_runner.allocate_kv_cache(num_gpu, num_cpu)
        logger.info("# GPU blocks: %d, # CPU blocks: %d (block_size=%d, %.1f KiB per block, attention backend: %s)",
                    num_gpu, num_cpu, config.cache_config.block_size, self.model_runner.block_bytes / 1024,
                    self.model_runner.attn_backend.name)
        self.model_runner.capture_graphs()
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config.block_size, num_gpu, num_cpu,
                                   self.event_bus, enable_caching=config.cache_config.enable_prefix_caching)
        self.seq_counter = Counter()
        self.eos_token_ids = _eos_token_ids(mc, self.tokenizer)
        self.sampler = Sampler(self.model_runner.vocab_size, self.eos_token_ids,
                               kernels=self.model_runner.attn_backend.kernels)
        self.sampler.warm_up(self.model_runner.device, self.model_runner.dtype)
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.stop_checker = StopChecker(mc.max_model_len, self.tokenizer, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.scheduler, self.detokenizer, self.stop_checker,
                                                self.seq_counter)
        self.request_errors: dict[str, BaseException] = {}
        self.async_scheduling = config.async_scheduling
        self.guided_decoding_backend = config.guided_decoding_backend
        self._inflight: Optional[_Inflight] = None  # a decode step launched, not yet completed
        # prompt tokens that went through the model (a prefix-cache hit spares some)
        self.num_prefill_tokens_computed = 0
        self.invariant_checker = None
        if config.check_invariants:
            from labengine.trace import InvariantChecker

            self.invariant_checker = InvariantChecker(self)
            self.invariant_checker.attach()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(engine_args.create_engine_config())

    # ------------------------------------------------------------------ requests
    def get_tokenizer(self):
        return self.tokenizer

    def process_request(self, prompt: PromptType, params: Optional[SamplingParams] = None) -> ProcessedRequest:
        """Tokenize and validate one prompt; raises ValueError and leaves nothing behind."""
        text, token_ids = None, None
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                text = prompt["prompt"]
            else:
                raise ValueError(f"A prompt dict needs a 'prompt' or 'prompt_token_ids' key, got keys {list(prompt)}")
        elif isinstance(prompt, (list, tuple)):
            token_ids = prompt
        else:
            raise TypeError(f"prompt must be a str, a dict with 'prompt' or 'prompt_token_ids', or a list of "
                            f"token ids; got {type(prompt).__name__}")
        if token_ids is None:
            if not isinstance(text, str):
                raise TypeError(f"prompt must be a str, got {type(text).__name__}")
            if text == "":
                raise ValueError("Prompt cannot be empty")
            if self.tokenizer is None:
                raise ValueError("prompts must be None if skip_tokenizer_init is True")
            token_ids = self.tokenizer.encode(text)
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("Prompt cannot be empty")
        vocab = self.model_runner.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids contains {t!r}; token ids must be ints in [0, {vocab}).")
        max_len = self.model_config.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(f"The decoder prompt (length {len(token_ids)}) is longer than the maximum model "
                             f"length of {max_len}. Make sure that `max_model_len` is no smaller than the "
                             "number of text tokens.")
        bs, total = self.config.cache_config.block_size, self.config.cache_config.num_gpu_blocks
        if cdiv(len(token_ids), bs) > total:
            raise ValueError(f"The prompt (length {len(token_ids)}) needs {cdiv(len(token_ids), bs)} KV blocks but "
                             f"the cache has only {total} blocks of {bs} tokens.")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()
        verify_max_logprobs(params, self.config.max_logprobs)
        self._verify_fits(params, vocab)
        return ProcessedRequest(text, token_ids, params)

    def _verify_fits(self, params: SamplingParams, vocab: int) -> None:
        """Refuse what could never run: more sequences at once than max_num_seqs (the request
        would wait forever, and everything behind it), more logprobs than the vocabulary."""
        max_num_seqs = self.config.scheduler_config.max_num_seqs
        if params.best_of > max_num_seqs:
            what = ("the beam width best_of" if params.use_beam_search
                    else "n" if params.best_of == params.n else "best_of")
            raise SamplingParamsValueError(
                f"{what}={params.best_of} needs {params.best_of} sequences at once, more than this engine's "
                f"max_num_seqs={max_num_seqs}; use at most {max_num_seqs} (or raise max_num_seqs).",
                "n" if what == "n" else "best_of")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise SamplingParamsValueError(
                    f"{name}={k} is more than the vocabulary size ({vocab}); use at most {vocab}.", name)

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> None:
        self.add_processed_request(str(request_id), self.process_request(prompt, params), arrival_time)

    def add_processed_request(self, request_id: str, req: ProcessedRequest,
                              arrival_time: Optional[float] = None) -> None:
        seq = Sequence(next(self.seq_counter), req.prompt, req.prompt_token_ids)
        group = SequenceGroup(request_id, [seq], req.params, arrival_time or time.time())
        self.scheduler.add_seq_group(group)
        if self.event_bus.active:
            p = req.params
            self.event_bus.emit(RequestAdded, request_id=request_id, prompt_len=len(req.prompt_token_ids), n=p.n,
                                best_of=p.best_of, max_tokens=p.max_tokens, temperature=p.temperature,
                                use_beam_search=p.use_beam_search)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        for group in self.scheduler.abort_seq_group(request_id):
            self._finish(group, time.time())
        step = self._inflight
        if step is not None and all(g.is_finished() for g in step.groups):
            # Nothing of the step running ahead is wanted any more: wait for it and drop it,
            # so an idle engine has nothing in flight.
            self._inflight = None
            self._complete(step)

    def get_prefix_cache_hit_rate(self) -> float:
        """Full prompt blocks found in the prefix cache / looked up so far (vLLM's
        gpu_prefix_cache_hit_rate); -1.0 when enable_prefix_caching is off."""
        bm = self.scheduler.block_manager
        return bm.prefix_cache_hit_rate if bm.enable_caching else -1.0

    def has_unfinished_requests(self) -> bool:
        return self._inflight is not None or self.scheduler.has_unfinished_seqs()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_seq_groups()

    # ------------------------------------------------------------------ one step
    def step(self, *, final_only: bool = False) -> list[RequestOutput]:
        """One engine step: the RequestOutputs of the requests of the step that completed.

        Synchronous (the default off CUDA): schedule, run the model, sample, process; the
        outputs are this step's. With async scheduling (config.async_scheduling, the default
        on CUDA) a decode step is left running on the GPU and the next call schedules and
        launches the following decode step *before* waiting for it, so the GPU never waits
        for the host's output processing and scheduling: the outputs of a call are those
        of the step launched by the previous call (one step behind; the first call of a
        run of decode steps returns none). final_only=True returns only finished requests.
        """
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        if prev is not None:
            nxt = None
            bus = self.event_bus
            try:
                if prev.tokens is not None and self._can_run_ahead(prev):
                    # The next step is decided before `prev` is published: its events (blocks
                    # allocated for it) are held back and published as the next step's, so the
                    # trace's ledger is the same as with async scheduling off.
                    bus.hold()
                    try:
                        out = self.scheduler.schedule_lookahead()
                        if out is not None:
                            nxt = self._launch(out, t0, pending=(prev.tokens, prev.rows))
                    finally:
                        bus.end_hold()
            finally:
                try:
                    outputs = self._complete(prev, final_only)
                finally:
                    bus.release()
            self._inflight = nxt
            return outputs
        out = self.scheduler.schedule()
        if not out.scheduled_seq_groups:
            self.model_runner.apply_cache_ops(out)
            return self._complete(_Inflight(out=out, groups=[], t0=t0, schedule_s=time.perf_counter() - t0),
                                  final_only)
        step = self._launch(out, t0)
        if self.async_scheduling and not out.is_prefill and step.tokens is not None:
            self._inflight = step  # completed by the next call, after it launches the next step
            return []
        return self._complete(step, final_only)

    def _launch(self, out: SchedulerOutputs, t0: float, pending=None) -> "_Inflight":
        """Run the model on `out` and launch the sampler; nothing here waits for the GPU."""
        t1 = time.perf_counter()
        step = _Inflight(out=out, groups=[s.seq_group for s in out.scheduled_seq_groups], t0=t0, schedule_s=t1 - t0)
        logits, smeta = self.model_runner.execute_model(out, self.scheduler.block_manager.block_tables,
                                                        step.timings, pending)
        t2 = time.perf_counter()
        try:
            finish, tokens = self.sampler.launch(logits, smeta)
            step.finish = lambda: list(zip(smeta.groups, finish()))
            if not out.is_prefill:
                step.tokens = tokens
                step.rows = {sid: r for g in smeta.groups for sid, r in zip(g.seq_ids, g.sample_rows)}
        except Exception:  # find the requests at fault and fail only those (synchronously)
            pairs = self._sample(logits, smeta)
            step.finish = lambda: pairs
        step.sample_launch_s = time.perf_counter() - t2
        return step

    def _can_run_ahead(self, prev: "_Inflight") -> bool:
        """Whether the next decode step may be launched before `prev`'s tokens are known:
        only when no request of it needs those tokens on the host to be sampled (penalties,
        logits processors, min_tokens still masking EOS, beam search)."""
        if prev.out.is_prefill:
            return False
        for group in self.scheduler.running:  # each running sequence's input is in prev.tokens
            for sid, seq in group.seqs_dict.items():
                if sid not in prev.rows and not seq.status.finished:
                    return False
        for group in prev.groups:
            p = group.sampling_params
            if p.use_beam_search or p.logits_processors or (
                    p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0):
                return False
            # The sampler's min_tokens mask counts the tokens on the host, which in a step
            # launched ahead lack prev's token: run ahead only once the mask is off either way.
            if p.min_tokens and min(s.get_output_len() for s in group.seqs_dict.values()) < p.min_tokens:
                return False
            # A seeded request draws one number per running sequence from its own generator:
            # a sequence that ends in this step must not draw in the next one, or the
            # others' samples would differ from a synchronous run.
            if p.seed is not None and len(group.seqs_dict) > 1:
                return False
        return True

    def _complete(self, step: "_Inflight", final_only: bool = False) -> list[RequestOutput]:
        """Wait for a launched step, apply its samples, finish requests, publish the step."""
        bus = self.event_bus
        out, timings = step.out, step.timings
        # Groups that finished in an earlier step and were launched again ahead of knowing it
        # (async scheduling) are neither reported again nor timed again.
        groups = [g for g in step.groups if g.metrics.finished_time is None]
        sample_s = detok_s = 0.0
        if step.finish is not None:
            t3 = time.perf_counter()
            to_process = step.finish()
            t4 = time.perf_counter()
            sample_s = step.sample_launch_s + t4 - t3
            bm = self.scheduler.block_manager
            caching = bm.enable_caching  # (hoisted: this loop runs for every sequence of every step)
            for sched in out.scheduled_seq_groups:
                group = sched.seq_group
                if group.metrics.finished_time is not None:
                    continue
                sizes = sched.chunk_sizes
                for seq in group.get_seqs(SequenceStatus.RUNNING):
                    if sizes is None:
                        seq.num_computed_tokens = seq.get_len()
                    else:  # a prompt chunk (chunked prefill): the rest comes in later steps
                        seq.num_computed_tokens += sizes[seq.seq_id]
                    if caching:
                        bm.mark_blocks_computed(seq)
            for group_to_sample, group_output in to_process:
                try:
                    self.output_processor.process_outputs([group_to_sample], [group_output])
                except Exception as e:  # a failure in one request must not take down the others
                    self._fail_request(group_to_sample.seq_group, e)
            detok_s = time.perf_counter() - t4
        now = time.time()
        step_s = time.perf_counter() - step.t0
        for group in groups:
            m = group.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now - step_s
                m.time_in_queue = m.first_scheduled_time - m.arrival_time
            if m.first_token_time is None and any(s.get_output_len() for s in group.get_seqs()):
                m.first_token_time = now
            m.last_token_time = now
            m.scheduler_time += step.schedule_s
            m.model_forward_time += timings.forward_s
            m.model_execute_time += timings.prepare_s + timings.forward_s + sample_s
        self.num_prefill_tokens_computed += out.num_prefill_tokens
        finished = self.scheduler.free_finished_seq_groups()
        for group in finished + out.ignored_seq_groups:
            self._finish(group, now)
        shown = finished + out.ignored_seq_groups if final_only else groups + out.ignored_seq_groups
        outputs = [RequestOutput.from_seq_group(g) for g in shown]
        if bus.active:
            bm = self.scheduler.block_manager
            num_prefill = out.num_prefill_tokens
            bus.emit(StepFinished, latency_s=step_s, schedule_s=step.schedule_s, prepare_s=timings.prepare_s,
                     forward_s=timings.forward_s, sample_s=sample_s, detokenize_s=detok_s,
                     batch_size=sum(s.seq_group.num_seqs(SequenceStatus.RUNNING) or 1
                                    for s in out.scheduled_seq_groups),
                     num_prefill_tokens=num_prefill, num_decode_tokens=out.num_batched_tokens - num_prefill,
                     kv_blocks_used=bm.get_num_used_gpu_blocks()
                     - len(bus.held_blocks(kinds=("block_allocated", "block_reused"))),
                     kv_blocks_total=bm.num_gpu_blocks,
                     num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                     num_swapped=len(self.scheduler.swapped), rank_forward_s=timings.rank_forward_s,
                     rank_comm_s=timings.rank_comm_s)
        bus.step += 1
        return outputs

    def _sample(self, logits, smeta: SamplingMetadata):
        """Sample the whole batch at once; if that fails, find and fail only the requests at fault."""
        try:
            return list(zip(smeta.groups, self.sampler(logits, smeta)))
        except Exception:
            if len(smeta.groups) == 1:
                self._fail_request(smeta.groups[0].seq_group, _current_exception())
                return []
        ok = []
        for g in smeta.groups:
            rows = g.prompt_logprob_rows + g.sample_rows
            k = len(g.prompt_logprob_rows)
            sub = SequenceGroupToSample(seq_group=g.seq_group, seq_ids=g.seq_ids, is_prompt=g.is_prompt,
                                        prompt_logprob_rows=list(range(k)), sample_rows=list(range(k, len(rows))))
            try:
                ok.append((g, self.sampler(logits[rows], SamplingMetadata(groups=[sub]))[0]))
            except Exception as e:
                self._fail_request(g.seq_group, e)
        return ok

    def _fail_request(self, group: SequenceGroup, exc: BaseException) -> None:
        logger.error("Request %s failed and was aborted: %r", group.request_id, exc)
        self.request_errors[group.request_id] = exc
        for seq in group.get_seqs():
            if not seq.is_finished():
                self.scheduler.free_seq(seq, "aborted")
                seq.status = SequenceStatus.FINISHED_ABORTED

    def _finish(self, group: SequenceGroup, now: float) -> None:
        group.metrics.finished_time = now
        if self.event_bus.active:
            m = group.metrics
            seqs = group.get_seqs()
            reasons = [SequenceStatus.get_finished_reason(s.status) for s in seqs]
            self.event_bus.emit(RequestFinished, request_id=group.request_id, finish_reason=reasons[0],
                                prompt_len=len(group.prompt_token_ids),
                                output_len=max(s.get_output_len() for s in seqs),
                                ttft_s=None if m.first_token_time is None else m.first_token_time - m.arrival_time,
                                latency_s=now - m.arrival_time)

    # ------------------------------------------------------------------ watching
    def add_event_listener(self, fn) -> None:
        self.event_bus.subscribe(fn)

    def remove_event_listener(self, fn) -> None:
        self.event_bus.unsubscribe(fn)

    def trace(self):
        """`with engine.trace() as trace:` records every event of the block into a Trace."""
        from labengine.trace import Trace

        return Trace(self)


class _Inflight:
    """A launched step: what was scheduled, and how to get its samples."""

    __slots__ = ("out", "groups", "t0", "schedule_s", "timings", "finish", "tokens", "rows", "sample_launch_s")

    def __init__(self, out: SchedulerOutputs, groups: list, t0: float, schedule_s: float) -> None:
        self.out, self.groups, self.t0, self.schedule_s = out, groups, t0, schedule_s
        self.timings = StepTimings()
        self.finish = None  # () -> [(SequenceGroupToSample, SequenceGroupOutput)], waits for the GPU
        self.tokens = None  # decode steps: sampled tokens on the device, one per sample row
        self.rows: dict[int, int] = {}  # seq_id -> its row in `tokens`
        self.sample_launch_s = 0.0


def _current_exception() -> BaseException:
    import sys

    return sys.exc_info()[1]


def _load_tokenizer(mc):
    from transformers import AutoTokenizer

    # tokenizer_path is a local folder by now (config.resolve_model took it from the cache or the Hub)
    return AutoTokenizer.from_pretrained(str(mc.tokenizer_path), use_fast=mc.tokenizer_mode == "auto",
                                         trust_remote_code=mc.trust_remote_code, local_files_only=True)


def _eos_token_ids(mc, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation_config.json (which may list several)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(str(mc.model_path), local_files_only=True)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    except Exception:  # no generation_config.json: the tokenizer's EOS is all there is
        pass
    if not ids and getattr(mc.hf_config, "eos_token_id", None) is not None:
        eos = mc.hf_config.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids
