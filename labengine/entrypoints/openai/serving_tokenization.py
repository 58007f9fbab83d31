"""POST /tokenize and POST /detokenize (vLLM 0.5.4's `serving_tokenization.py`).

`/tokenize` takes a completion-style `{"prompt"}` (special tokens added by default, as the
completions endpoint does) or a chat-style `{"messages"}` (rendered by the chat template,
no extra special tokens by default) and answers the token ids, their count and the
server's max_model_len; `/detokenize` turns `{"tokens"}` back into `{"prompt"}`.
Out-of-vocabulary ids are a 400 naming `tokens`.
"""
from __future__ import annotations

from labengine.entrypoints.openai.chat_utils import apply_chat_template
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

    def tokenize(self, req) -> dict:
        self.check_model(req.model)
        tokenizer = self._need_tokenizer()
        if isinstance(req, TokenizeChatRequest):
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as e:
                raise OpenAIError(str(e), param="messages") from None
            prompt = apply_chat_template(tokenizer, messages, req.add_generation_prompt, self.chat_template)
        else:
            prompt = req.prompt
        ids = tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self._max_model_len or self.max_model_len).model_dump()

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        tokenizer = self._need_tokenizer()
        bad = [t for t in req.tokens if not 0 <= t < len(tokenizer)]
        if bad:
            raise OpenAIError(f"tokens holds ids outside the vocabulary [0, {len(tokenizer)}): {bad[:10]}",
                              param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(req.tokens)).model_dump()
