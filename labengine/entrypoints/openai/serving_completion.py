"""POST /v1/completions (vLLM's `serving_completion.py`).

A request holds one prompt or a batch of them (text or token ids); each becomes one engine
request, and choice `i * n + j` is completion j of prompt i. `echo` prefixes the prompt;
`stream` sends each choice's new text as it is generated.
"""
from __future__ import annotations

import time
from typing import Any, Dict

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from labengine.entrypoints.openai.protocol import (CompletionRequest, CompletionResponse,
                                                   CompletionResponseChoice, CompletionStreamResponse,
                                                   random_id)
from labengine.entrypoints.openai.serving_engine import (ChoiceDeltas, OpenAIError, OpenAIServing,
                                                         check_streamable, completion_logprobs,
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
            raise OpenAIError("suffix is not supported", param="suffix")
        if req.echo and req.logprobs is not None:
            raise OpenAIError("echo together with logprobs is not supported", param="echo")
        check_streamable(req)
        prompts = normalize_prompt(req.prompt)
        params = self.make_params(req.sampling_kwargs(), req.logit_bias)
        arrival = time.time()
        request_id = random_id("cmpl")
        created = int(arrival)
        gens = [self.start(p, params, f"{request_id}-{i}", arrival) for i, p in enumerate(prompts)]
        firsts = await self.first_outputs(gens, "prompt")
        n = params.n
        tokenizer = self.tokenizer

        def echo_text(out) -> str:
            if not req.echo:
                return ""
            if out.prompt is not None:
                return out.prompt
            return tokenizer.decode(out.prompt_token_ids) if tokenizer is not None else ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage=None) -> str:
                return sse(CompletionStreamResponse(id=request_id, created=created, model=self.served_model_name,
                                                    choices=choices, usage=usage))

            async def chunks():
                deltas = ChoiceDeltas()
                offsets: Dict[int, int] = {}  # choice -> text_offset of its next token
                finished: Dict[int, Any] = {}
                async for i, out in merge_outputs(gens, firsts):
                    for o in out.outputs:
                        idx = i * n + o.index
                        prefix = echo_text(out) if deltas.is_new(idx) else ""
                        offsets.setdefault(idx, len(prefix))
                        delta, new_tokens, new_logprobs = deltas.take(idx, o)
                        if not (prefix or delta or o.finish_reason or new_tokens):
                            continue
                        lp = None
                        if req.logprobs is not None and new_logprobs is not None:
                            lp = completion_logprobs(new_tokens, new_logprobs, req.logprobs, self.text_of,
                                                     offsets[idx])
                            offsets[idx] += sum(len(t) for t in lp.tokens)
                        yield chunk([CompletionResponseChoice(index=idx, text=prefix + delta, logprobs=lp,
                                                              finish_reason=o.finish_reason,
                                                              stop_reason=o.stop_reason)])
                    if out.finished:
                        finished[i] = out
                if include_usage:
                    yield chunk([], usage=usage_of(finished.values()))

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
            prefix = echo_text(out)
            # outputs come best first; beam search / best_of may hand out any sequence index
            for j, o in enumerate(out.outputs):
                lp = None
                if req.logprobs is not None and o.logprobs is not None:
                    lp = completion_logprobs(o.token_ids, o.logprobs, req.logprobs, self.text_of, len(prefix))
                choices.append(CompletionResponseChoice(index=i * n + j, text=prefix + o.text, logprobs=lp,
                                                        finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return CompletionResponse(id=request_id, created=created, model=self.served_model_name, choices=choices,
                                  usage=usage_of(finals.values())).model_dump()
