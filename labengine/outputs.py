"""What the engine returns: RequestOutput and CompletionOutput (vLLM v0.5.4 layout).

``Logprob`` and ``RequestMetrics`` are defined in labengine.sequence (the shared request
state) and re-exported here, as vLLM exposes them from ``vllm.outputs``/``vllm.sequence``.
"""
from __future__ import annotations

from typing import Optional, Union

from labengine.sequence import Logprob, RequestMetrics, SequenceGroup, SequenceStatus

__all__ = ["CompletionOutput", "RequestOutput", "Logprob", "RequestMetrics"]

PromptLogprobs = list[Optional[dict[int, Logprob]]]
SampleLogprobs = list[dict[int, Logprob]]


class CompletionOutput:
    """One completion of a request.

    Args:
        index: The position of the sequence in its request (creation order of the
            sequence within the group, not its rank).
        text: The generated text (without the stop string unless
            include_stop_str_in_output; EOS text is never included).
        token_ids: Every generated token id, including EOS / stop token / the tokens of a
            stop string.
        cumulative_logprob: Sum of the sampled tokens' processed logprobs.
            DELIBERATE DIFFERENCE from vLLM v0.5.4 (decided for the lab): it is always the
            float sum, as in vLLM <= 0.5.3, even when ``logprobs`` was not requested
            (v0.5.4 returns None then). The lesson prints
            ``completion.cumulative_logprob:.2f`` without requesting logprobs.
        logprobs: One dict per generated token (sampled token first, then the top-k), or
            None when ``SamplingParams.logprobs`` is None.
        finish_reason: "stop", "length", "abort", or None while unfinished.
        stop_reason: The stop string or stop token id that ended the sequence; None for
            EOS, length, or while unfinished.
    """

    __slots__ = ("index", "text", "token_ids", "cumulative_logprob", "logprobs",
                 "finish_reason", "stop_reason", "lora_request")

    def __init__(self, index: int, text: str, token_ids: list[int],
                 cumulative_logprob: Optional[float],
                 logprobs: Optional[SampleLogprobs],
                 finish_reason: Optional[str] = None,
                 stop_reason: Union[int, str, None] = None,
                 lora_request=None) -> None:
        self.index = index
        self.text = text
        self.token_ids = token_ids
        self.cumulative_logprob = cumulative_logprob
        self.logprobs = logprobs
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.lora_request = lora_request

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, "
                f"text={self.text!r}, "
                f"token_ids={self.token_ids}, "
                f"cumulative_logprob={self.cumulative_logprob}, "
                f"logprobs={self.logprobs}, "
                f"finish_reason={self.finish_reason}, "
                f"stop_reason={self.stop_reason})")


class RequestOutput:
    """The output of one request: its prompt and its completions so far.

    Args:
        request_id: The request's id (a str).
        prompt: The prompt text, or None for token prompts.
        prompt_token_ids: The prompt's token ids.
        prompt_logprobs: None unless requested; otherwise one entry per prompt token,
            ``[0]`` being None.
        outputs: The completions (top n by cumulative logprob when the request has more
            than one sequence).
        finished: Whether the whole request is finished.
        metrics: The request's RequestMetrics (timestamps and engine time).
    """

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 prompt_logprobs: Optional[PromptLogprobs],
                 outputs: list[CompletionOutput], finished: bool,
                 metrics: Optional[RequestMetrics] = None, lora_request=None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.lora_request = lora_request

    @classmethod
    def from_seq_group(cls, seq_group: SequenceGroup) -> "RequestOutput":
        params = seq_group.sampling_params
        if params is None:
            raise ValueError("Sampling parameters are missing for a CompletionRequest.")
        seqs = seq_group.get_seqs()
        if len(seqs) == 1:
            top_n_seqs = seqs
        else:
            n = params.n
            if params.use_beam_search:
                length_penalty = params.length_penalty
                eos = getattr(seq_group, "beam_eos_token_id", None)
                sorting_key = lambda seq: beam_search_score(seq, length_penalty, eos)  # noqa: E731
            else:
                sorting_key = lambda seq: seq.cumulative_logprob  # noqa: E731
            top_n_seqs = sorted(seqs, key=sorting_key, reverse=True)[:n]

        # Sequences always record the sampled token's logprob; omit them unless requested.
        include_logprobs = params.logprobs is not None
        text_buffer_length = params.output_text_buffer_length
        outputs = []
        for seq in top_n_seqs:
            text = seq.output_text
            if text_buffer_length and not seq.is_finished():
                # Hold back characters that may be the start of a stop string, so streamed
                # text never backtracks.
                text = text[:-text_buffer_length]
            outputs.append(CompletionOutput(
                seqs.index(seq),
                text,
                list(seq.output_token_ids),
                seq.cumulative_logprob,
                list(seq.output_logprobs) if include_logprobs else None,
                SequenceStatus.get_finished_reason(seq.status),
                seq.stop_reason))
        prompt_logprobs = seq_group.prompt_logprobs
        return cls(seq_group.request_id, seq_group.prompt, list(seq_group.prompt_token_ids),
                   list(prompt_logprobs) if prompt_logprobs is not None else None,
                   outputs, seq_group.is_finished(), seq_group.metrics)

    def __eq__(self, other) -> bool:
        if not isinstance(other, RequestOutput):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in (
            "request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "outputs",
            "finished", "metrics"))

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, "
                f"prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, "
                f"prompt_logprobs={self.prompt_logprobs}, "
                f"outputs={self.outputs}, "
                f"finished={self.finished}, "
                f"metrics={self.metrics})")


def beam_search_score(seq, length_penalty: float = 1.0, eos_token_id: Optional[int] = None,
                      seq_len: Optional[int] = None) -> float:
    """vLLM's Sequence.get_beam_search_score: ``cum_logprob / seq_len**length_penalty``.

    ``seq_len`` is prompt + output length, minus 1 when the last token is EOS (as HF does).
    """
    if seq_len is None:
        seq_len = seq.get_len()
        if eos_token_id is not None and seq.get_last_token_id() == eos_token_id:
            seq_len -= 1
    return seq.cumulative_logprob / (seq_len ** length_penalty)
