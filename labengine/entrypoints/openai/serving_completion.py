"""POST /v1/completions (vLLM's `serving_completion.py`).

A request holds one prompt or a batch of them (text or token ids); each becomes one engine
request, and choice `i * n + j` is completion j of prompt i. `stream` sends each choice's
new text as it is generated.

`echo` prefixes the prompt, and as in vLLM 0.5.4 its tokens' logprobs when `logprobs` is set
(the first token's entry is None: nothing comes before it); `echo` with `max_tokens=0`
returns the prompt alone. That is how lm-evaluation-harness scores a continuation
(loglikelihood and multiple-choice tasks). `allowed_token_ids`, `logit_bias` and the
guided-decoding fields become logits processors (logits_processors.py).
"""
from __future__ import annotations

import time
from typing import Any, Dict

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from labengine.entrypoints.openai.protocol import (CompletionRequest, CompletionResponse,
                                                   CompletionResponseChoice, CompletionStreamResponse,
                                                   UsageInfo, random_id)
from labengine.entrypoints.openai.serving_engine import (ChoiceDeltas, OpenAIError, OpenAIServing,
                                                         check_streamable, completion_logprobs, indexed_outputs,
                                                         merge_outputs, sse, sse_stream, unless_disconnected,
                                                         usage_of)


def normalize_prompt(prompt) -> list:
    """The request's prompt field as a list of engine prompts (str or {"prompt_token_ids": [...]})."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": list(p)} for p in prompt]
    raise OpenAIError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                      "of token ids", param="prompt")


class OpenAIServingCompletion(OpenAIServing):

    async def create_completion(self, req: CompletionRequest, raw_request: Request):
        self.check_model(req.model)
        if req.suffix:
            raise OpenAIError("suffix is not currently supported", param="suffix")
        check_streamable(req)
        prompts = normalize_prompt(req.prompt)
        guided = self.guided_of(req)
        # one SamplingParams per prompt: a guided processor follows one request's sequences
        params_list = [self.make_params(req.sampling_kwargs(), req.logit_bias,
                                        allowed_token_ids=req.allowed_token_ids, guided=guided)
                       for _ in (prompts if guided is not None else prompts[:1])]
        params_list = params_list * (len(prompts) // len(params_list))
        arrival = time.time()
        request_id = random_id("cmpl")
        created = int(arrival)
        gens = [self.start(p, sp, f"{request_id}-{i}", arrival) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        firsts = await self.first_outputs(gens, "prompt")
        n = params_list[0].n
        tokenizer = self.tokenizer
        echo_only = req.echo_without_generation
        want_logprobs = req.logprobs is not None

        def prompt_text(out) -> str:
            if out.prompt is not None:
                return out.prompt
            return tokenizer.decode(out.prompt_token_ids) if tokenizer is not None else ""

        def prompt_part(out):
            """(text, token ids, logprobs) that echo puts before a choice's output."""
            if not req.echo:
                return "", [], []
            return prompt_text(out), list(out.prompt_token_ids), list(out.prompt_logprobs or [])

        def logprobs_of(token_ids, logprobs, offset):
            if not want_logprobs or logprobs is None:
                return None
            return completion_logprobs(token_ids, logprobs, req.logprobs, self.text_of, offset)

        if req.stream:
            opts = req.stream_options
            include_usage = bool(opts and opts.include_usage)
            continuous = bool(include_usage and opts.continuous_usage_stats)

            def chunk(choices, usage=None) -> str:
                return sse(CompletionStreamResponse(id=request_id, created=created, model=self.served_model_name,
                                                    choices=choices, usage=usage))

            async def chunks():
                deltas = ChoiceDeltas()
                offsets: Dict[int, int] = {}  # choice -> text_offset of its next token
                finished: Dict[int, Any] = {}
                done = set()
                async for i, out in merge_outputs(gens, firsts):
                    for o in out.outputs:
                        idx = i * n + o.index
                        if idx in done:
                            continue
                        text, token_ids, logprobs = prompt_part(out) if deltas.is_new(idx) else ("", [], [])
                        offsets.setdefault(idx, 0)
                        delta, new_tokens, new_logprobs = deltas.take(idx, o)
                        if not echo_only:  # echo with max_tokens=0: the one generated token is not shown
                            text += delta
                            token_ids = token_ids + list(new_tokens)
                            logprobs = logprobs + list(new_logprobs or []) if new_logprobs is not None else None
                        if not (text or o.finish_reason or token_ids):
                            continue
                        lp = logprobs_of(token_ids, logprobs, offsets[idx])
                        if lp is not None:
                            offsets[idx] += sum(len(t) for t in lp.tokens)
                        if o.finish_reason is not None:
                            done.add(idx)
                        usage = None
                        if continuous:
                            usage = usage_of_choice(out, o, echo_only)
                        yield chunk([CompletionResponseChoice(index=idx, text=text, logprobs=lp,
                                                              finish_reason=o.finish_reason,
                                                              stop_reason=o.stop_reason)], usage)
                    if out.finished:
                        finished[i] = out
                if include_usage:
                    yield chunk([], usage=usage_of(finished.values(), count_completion=not echo_only))

            return StreamingResponse(sse_stream(chunks(), gens, "completion"), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect():
            finals: Dict[int, Any] = {}
            try:
                async for i, out in merge_outputs(gens, firsts):
                    finals[i] = out
            finally:
                for g in gens:
                    await g.aclose()
            return finals

        finals = await unless_disconnected(raw_request, collect())
        if finals is None:
            return Response(status_code=499)
        choices = []
        for i in range(len(prompts)):
            out = finals[i]
            p_text, p_ids, p_logprobs = prompt_part(out)
            for j, o in indexed_outputs(out.outputs):
                if echo_only:
                    text, token_ids, logprobs = p_text, p_ids, p_logprobs
                else:
                    text, token_ids = p_text + o.text, p_ids + list(o.token_ids)
                    logprobs = p_logprobs + list(o.logprobs) if o.logprobs is not None else None
                choices.append(CompletionResponseChoice(index=i * n + j, text=text,
                                                        logprobs=logprobs_of(token_ids, logprobs, 0),
                                                        finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return CompletionResponse(id=request_id, created=created, model=self.served_model_name, choices=choices,
                                  usage=usage_of(finals.values(), count_completion=not echo_only)).model_dump()


def usage_of_choice(out, o, echo_only: bool) -> UsageInfo:
    """One choice's usage so far (stream_options.continuous_usage_stats)."""
    prompt_tokens = len(out.prompt_token_ids or ())
    completion_tokens = 0 if echo_only else len(o.token_ids)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
