"""POST /tokenize and POST /detokenize (vLLM 0.5.4's `serving_tokenization.py`).

`/tokenize` takes a completion-style `{"prompt"}` (special tokens added by default, as the
completions endpoint does) or a chat-style `{"messages"}` (rendered by the chat template,
no extra special tokens by default) and answers the token ids, their count and the
server's max_model_len; `/detokenize` turns `{"tokens"}` back into `{"prompt"}`.
Out-of-vocabulary ids are a 400 naming `tokens`. The template renders and the prompt
tokenizes on the server's worker threads, as for the other endpoints (serving_engine.py).
"""
from __future__ import annotations

import asyncio

from labengine.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                                                   TokenizeResponse)
from labengine.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing


class OpenAIServingTokenization(OpenAIServing):

    def __init__(self, engine, served_model_name: str, *, chat_template=None, max_model_len=None) -> None:
        super().__init__(engine, served_model_name)
        self.chat_template = chat_template
        self._max_model_len = max_model_len   # the base class's property reads it from the engine otherwise

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise OpenAIError("this server has no tokenizer (skip_tokenizer_init=True)")
        return self.tokenizer

    async def tokenize(self, req) -> dict:
        self.check_model(req.model)
        tokenizer = self._need_tokenizer()
        if isinstance(req, TokenizeChatRequest):
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as e:
                raise OpenAIError(str(e), param="messages") from None
            prompt = await self.render_chat_prompt(messages, req, self.chat_template)
        else:
            prompt = req.prompt
        own = self.state.own_tokenizer(tokenizer)
        ids = await asyncio.get_running_loop().run_in_executor(
            self.state.tokenize_pool, lambda: own.encode(prompt, add_special_tokens=req.add_special_tokens))
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self._max_model_len or self.max_model_len).model_dump()

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        tokenizer = self._need_tokenizer()
        bad = [t for t in req.tokens if not 0 <= t < len(tokenizer)]
        if bad:
            raise OpenAIError(f"tokens holds ids outside the vocabulary [0, {len(tokenizer)}): {bad[:10]}",
                              param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(req.tokens)).model_dump()
