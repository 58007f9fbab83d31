"""Request state: Sequence, SequenceGroup and their status, in plain Python.

A request (SequenceGroup) starts as one Sequence holding the prompt; n > 1, best_of and
beam search fork it into several that share the prompt's KV blocks. The scheduler, the
block manager and the output processor all work on these objects; nothing here knows
about tensors.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()

    @staticmethod
    def is_finished(status: "SequenceStatus") -> bool:
        return status in _FINISH_REASONS

    @staticmethod
    def get_finished_reason(status: "SequenceStatus") -> Optional[str]:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_IGNORED: "length",
}
# A plain attribute per member: the hot paths ask "finished?" millions of times, and an
# enum's hash (for the dict lookup) is a Python-level call.
for _status in SequenceStatus:
    _status.finished = _status in _FINISH_REASONS


@dataclass
class Logprob:
    """The log probability of one token, its rank in the vocabulary, and its text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class RequestMetrics:
    """Timestamps (time.time()) of one request's life, plus the engine's own time spent on it.

    scheduler_time, model_forward_time and model_execute_time add up the wall time of every
    step the request took part in: scheduling, the forward pass, and prepare+forward+sample.
    """

    arrival_time: float
    last_token_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    time_in_queue: Optional[float] = None
    finished_time: Optional[float] = None
    scheduler_time: float = 0.0
    model_forward_time: float = 0.0
    model_execute_time: float = 0.0


class Sequence:
    """One token stream: the prompt plus what has been generated so far."""

    def __init__(self, seq_id: int, prompt: Optional[str], prompt_token_ids: list[int]):
        self.seq_id = seq_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[dict[int, Logprob]] = []
        self.output_text = ""
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        # Tokens whose keys/values are in the KV cache. A recompute preemption resets it to 0.
        self.num_computed_tokens = 0
        # Prefix caching: the hash of each full block (its tokens and all before), filled lazily.
        self.block_hashes: list[int] = []
        # Incremental detokenizer state (see detokenizer.py).
        self.tokens: Optional[list[str]] = None
        self.prefix_offset = 0
        self.read_offset = 0

    # lengths and tokens
    def get_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def get_prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def get_output_len(self) -> int:
        return len(self.output_token_ids)

    def get_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def get_last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def get_num_uncomputed_tokens(self) -> int:
        return self.get_len() - self.num_computed_tokens

    def append_token_id(self, token_id: int, logprobs: dict[int, Logprob], logprob: float) -> None:
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprobs)
        self.cumulative_logprob += logprob

    def is_finished(self) -> bool:
        return self.status.finished

    def reset_for_recompute(self) -> None:
        """After a recompute preemption the whole sequence is prefilled again."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0

    def fork(self, new_seq_id: int) -> "Sequence":
        child = Sequence.__new__(Sequence)
        child.__dict__ = {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}
        child.seq_id = new_seq_id
        return child

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, status={self.status.name}, "
                f"prompt_len={self.get_prompt_len()}, output_len={self.get_output_len()})")


class SequenceGroup:
    """All the sequences generated from one prompt: one request."""

    def __init__(self, request_id: str, seqs: list[Sequence], sampling_params, arrival_time: float):
        self.request_id = request_id
        self.seqs_dict: dict[int, Sequence] = {s.seq_id: s for s in seqs}
        self.sampling_params = sampling_params
        self.metrics = RequestMetrics(arrival_time=arrival_time, last_token_time=arrival_time)
        self.prompt_logprobs: Optional[list] = None
        # Set when the group was preempted by recompute: its prompt logprobs are already known.
        self.num_preemptions = 0

    @property
    def seqs(self) -> list[Sequence]:
        return list(self.seqs_dict.values())

    @property
    def first_seq(self) -> Sequence:
        return next(iter(self.seqs_dict.values()))

    @property
    def prompt(self) -> Optional[str]:
        return self.first_seq.prompt

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.first_seq.prompt_token_ids

    @property
    def arrival_time(self) -> float:
        return self.metrics.arrival_time

    def get_seqs(self, status: Optional[SequenceStatus] = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs_dict.values())
        return [s for s in self.seqs_dict.values() if s.status == status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs_dict.values() if not s.status.finished]

    def num_seqs(self, status: Optional[SequenceStatus] = None) -> int:
        return len(self.get_seqs(status))

    def get_max_num_running_seqs(self) -> int:
        """The most sequences this group can have running at once (its budget footprint)."""
        params = self.sampling_params
        if params.use_beam_search:
            return params.best_of
        if params.best_of > self.num_seqs():
            # Still in the prompt phase: it will fork into best_of sequences.
            return params.best_of
        return len(self.get_unfinished_seqs())

    def find(self, seq_id: int) -> Sequence:
        return self.seqs_dict[seq_id]

    def add(self, seq: Sequence) -> None:
        self.seqs_dict[seq.seq_id] = seq

    def remove(self, seq_id: int) -> None:
        del self.seqs_dict[seq_id]

    def is_prefill(self) -> bool:
        """True until the group's prompt (or recomputed tokens) has gone through the model."""
        # (a prompt chunked up to its last token is still in its prefill: nothing sampled yet)
        return any(s.num_computed_tokens < s.get_len() - 1 or s.get_output_len() == 0
                   for s in self.get_unfinished_seqs())

    def is_finished(self) -> bool:
        for s in self.seqs_dict.values():
            if not s.status.finished:
                return False
        return True

    def __repr__(self) -> str:
        return f"SequenceGroup(request_id={self.request_id!r}, num_seqs={len(self.seqs_dict)})"
