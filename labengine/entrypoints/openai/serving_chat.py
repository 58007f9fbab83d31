"""POST /v1/chat/completions (vLLM's `serving_chat.py`).

The messages are rendered into one prompt by the chat template (chat_utils.py); `n`
completions come back as choices. `stream` sends, per choice, a first chunk with the
role, then the new text of each step; `echo` prefixes the last message when it is the
assistant's (vLLM's extra).
"""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from labengine.entrypoints.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                                   ChatCompletionResponseChoice,
                                                   ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse,
                                                   ChatMessage, DeltaMessage, random_id)
from labengine.entrypoints.openai.serving_engine import (ChoiceDeltas, OpenAIError, OpenAIServing, chat_logprobs,
                                                         check_streamable, merge_outputs, sse, sse_stream,
                                                         unless_disconnected, usage_of)


class OpenAIServingChat(OpenAIServing):

    def __init__(self, engine, served_model_name: str, *, chat_template=None, metrics=None) -> None:
        super().__init__(engine, served_model_name, metrics=metrics)
        self.chat_template = chat_template

    async def create_chat_completion(self, req: ChatCompletionRequest, raw_request: Request):
        self.check_model(req.model)
        if not req.messages:
            raise OpenAIError("messages must contain at least one message", param="messages")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise OpenAIError("when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise OpenAIError(f"top_logprobs must be between 0 and 20, got {req.top_logprobs}.",
                                  param="top_logprobs")
        check_streamable(req)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        prompt = await self.render_chat_prompt(messages, req, self.chat_template)
        rename = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            rename["max_tokens"] = "max_completion_tokens"
        params = self.make_params(req.sampling_kwargs(), req.logit_bias, rename)
        arrival = time.time()
        request_id = random_id("chatcmpl")
        created = int(arrival)
        gen = self.start(prompt, params, request_id, arrival)
        firsts = await self.first_outputs([gen], "messages", rename)
        num_top = req.top_logprobs or 0
        echo = messages[-1]["content"] if (req.echo and messages and req.messages[-1].role == "assistant") else ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage=None) -> str:
                return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=self.served_model_name,
                                                        choices=choices, usage=usage))

            async def chunks():
                deltas = ChoiceDeltas()
                last = None
                async for _i, out in merge_outputs([gen], firsts):
                    last = out
                    for o in out.outputs:
                        idx = o.index
                        if deltas.is_new(idx):
                            yield chunk([ChatCompletionResponseStreamChoice(
                                index=idx, delta=DeltaMessage(role="assistant", content=echo))])
                        delta, new_tokens, new_logprobs = deltas.take(idx, o)
                        if not (delta or o.finish_reason or new_tokens):
                            continue
                        lp = None
                        if req.logprobs and new_logprobs is not None:
                            lp = chat_logprobs(new_tokens, new_logprobs, num_top, self.text_of)
                        yield chunk([ChatCompletionResponseStreamChoice(
                            index=idx, delta=DeltaMessage(content=delta), logprobs=lp,
                            finish_reason=o.finish_reason, stop_reason=o.stop_reason)])
                if include_usage:
                    yield chunk([], usage=usage_of([last] if last is not None else []))

            return StreamingResponse(sse_stream(chunks(), [gen], "chat completion"),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def collect():
            final = None
            try:
                async for _i, out in merge_outputs([gen], firsts):
                    final = out
            finally:
                await gen.aclose()
            return final

        final = await unless_disconnected(raw_request, collect())
        if final is None:
            return Response(status_code=499)
        choices = []
        for j, o in enumerate(final.outputs):
            lp = chat_logprobs(o.token_ids, o.logprobs, num_top, self.text_of) if (req.logprobs and o.logprobs) else None
            choices.append(ChatCompletionResponseChoice(
                index=j, message=ChatMessage(role="assistant", content=echo + o.text), logprobs=lp,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return ChatCompletionResponse(id=request_id, created=created, model=self.served_model_name, choices=choices,
                                      usage=usage_of([final])).model_dump()
