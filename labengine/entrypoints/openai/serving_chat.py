"""POST /v1/chat/completions (vLLM's `serving_chat.py`).

The messages are rendered into one prompt by the chat template (chat_utils.py); `n`
completions come back as choices. `stream` sends first one role chunk per choice, in index
order, then each choice's new text as it comes, and each choice's `finish_reason` exactly
once (the order OpenAI's SDK `chat.completions.stream()` helper relies on); `echo` prefixes
the last message when it is the assistant's (vLLM's extra).

Tools as vLLM 0.5.4 has them: `tool_choice` naming a function constrains the output to that
function's JSON schema (guided decoding) and returns it as the `arguments` of a tool call;
`"auto"`/`"required"`, a `tool_choice` without `tools` and a name not in `tools` are 400s
with vLLM 0.5.4's messages. `tools` with `tool_choice="none"` (the default) are ignored.
"""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from labengine.entrypoints.openai.protocol import (ChatCompletionNamedToolChoiceParam, ChatCompletionRequest,
                                                   ChatCompletionResponse, ChatCompletionResponseChoice,
                                                   ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse,
                                                   ChatMessage, DeltaMessage, FunctionCall, ToolCall, UsageInfo,
                                                   random_id)
from labengine.entrypoints.openai.serving_engine import (ChoiceDeltas, OpenAIError, OpenAIServing, chat_logprobs,
                                                         check_streamable, indexed_outputs, merge_outputs, sse,
                                                         sse_stream, unless_disconnected, usage_of)


class OpenAIServingChat(OpenAIServing):

    def __init__(self, engine, served_model_name: str, *, chat_template=None, metrics=None,
                 return_tokens_as_token_ids: bool = False) -> None:
        super().__init__(engine, served_model_name, metrics=metrics,
                         return_tokens_as_token_ids=return_tokens_as_token_ids)
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
        tool = self.named_tool(req)
        guided = self.guided_of(req, tool.parameters if tool is not None else None)
        check_streamable(req)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        prompt = await self.render_chat_prompt(messages, req, self.chat_template)
        rename = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            rename["max_tokens"] = "max_completion_tokens"
        params = self.make_params(req.sampling_kwargs(), req.logit_bias, rename, guided=guided)
        arrival = time.time()
        request_id = random_id("chatcmpl")
        created = int(arrival)
        gen = self.start(prompt, params, request_id, arrival)
        firsts = await self.first_outputs([gen], "messages", rename)
        num_top = req.top_logprobs or 0
        echo = messages[-1]["content"] if (req.echo and messages and req.messages[-1].role == "assistant") else ""

        if req.stream:
            opts = req.stream_options
            include_usage = bool(opts and opts.include_usage)
            continuous = bool(include_usage and opts.continuous_usage_stats)
            num_choices = params.n
            call_ids = {}  # choice -> its tool call's id (named tool choice)

            def chunk(choices, usage=None) -> str:
                return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=self.served_model_name,
                                                        choices=choices, usage=usage))

            def usage_so_far(out, o=None) -> UsageInfo:
                p = len(out.prompt_token_ids or ())
                c = len(o.token_ids) if o is not None else 0
                return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

            def delta_of(idx: int, text: str) -> DeltaMessage:
                if tool is None:
                    return DeltaMessage(content=text)
                call = {"index": 0, "function": {"arguments": text}}
                if idx not in call_ids:
                    call_ids[idx] = random_id("chatcmpl-tool")
                    call.update(id=call_ids[idx], type="function")
                    call["function"]["name"] = tool.name
                return DeltaMessage(tool_calls=[call])

            async def chunks():
                deltas = ChoiceDeltas()
                finish_sent = set()
                last = None
                async for _i, out in merge_outputs([gen], firsts):
                    if last is None:  # one role chunk per choice, in index order, before any text
                        for idx in range(num_choices):
                            deltas.is_new(idx)
                            yield chunk([ChatCompletionResponseStreamChoice(
                                index=idx, delta=DeltaMessage(role="assistant", content=""))],
                                usage_so_far(out) if continuous else None)
                        if echo:
                            for idx in range(num_choices):
                                yield chunk([ChatCompletionResponseStreamChoice(
                                    index=idx, delta=DeltaMessage(content=echo))],
                                    usage_so_far(out) if continuous else None)
                    last = out
                    for o in sorted(out.outputs, key=lambda o: o.index):
                        idx = o.index
                        if idx in finish_sent:
                            continue
                        deltas.is_new(idx)
                        delta, new_tokens, new_logprobs = deltas.take(idx, o)
                        if not (delta or o.finish_reason or new_tokens):
                            continue
                        lp = None
                        if req.logprobs and new_logprobs is not None:
                            lp = chat_logprobs(new_tokens, new_logprobs, num_top, self.text_of)
                        if o.finish_reason is not None:
                            finish_sent.add(idx)
                        yield chunk([ChatCompletionResponseStreamChoice(
                            index=idx, delta=delta_of(idx, delta), logprobs=lp,
                            finish_reason=o.finish_reason, stop_reason=o.stop_reason)],
                            usage_so_far(out, o) if continuous else None)
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
        for j, o in indexed_outputs(final.outputs):
            lp = chat_logprobs(o.token_ids, o.logprobs, num_top, self.text_of) if (req.logprobs and o.logprobs) else None
            if tool is not None:
                message = ChatMessage(role="assistant", content="", tool_calls=[
                    ToolCall(function=FunctionCall(name=tool.name, arguments=o.text))])
            else:
                message = ChatMessage(role="assistant", content=echo + o.text)
            choices.append(ChatCompletionResponseChoice(
                index=j, message=message, logprobs=lp, finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return ChatCompletionResponse(id=request_id, created=created, model=self.served_model_name, choices=choices,
                                      usage=usage_of([final])).model_dump()

    @staticmethod
    def named_tool(req: ChatCompletionRequest):
        """The function a named `tool_choice` picks (None for "none"); vLLM 0.5.4's rules and messages."""
        choice = req.tool_choice
        if choice == "none" or (choice is None and "tool_choice" not in req.model_fields_set):
            return None
        if not isinstance(choice, ChatCompletionNamedToolChoiceParam):  # "auto", "required", null, ...
            raise OpenAIError("Currently only named tools are supported.", param="tool_choice")
        if req.tools is None:
            raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if any(getattr(req, k) is not None for k in ("guided_json", "guided_regex", "guided_choice",
                                                     "guided_grammar")):
            raise OpenAIError("You can only either use guided decoding or tools, not both.", param="tool_choice")
        tools = {t.function.name: t.function for t in req.tools}
        name = choice.function.name
        if name not in tools:
            raise OpenAIError(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
        return tools[name]
