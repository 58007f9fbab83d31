"""Incremental detokenization and the stop checker (vLLM v0.5.4).

Decoding the whole output after every token would be quadratic, and decoding each token
alone is wrong (byte-level BPE splits characters across tokens; SentencePiece decides
spaces from neighbours). So, like vLLM (after HF text-generation-inference), each sequence
keeps its tokens as strings plus two offsets:

* ``prefix_offset``: where the context window used for decoding starts,
* ``read_offset``: how far the text has already been emitted.

Each step decodes ``tokens[prefix_offset:]`` and ``tokens[prefix_offset:read_offset]`` and
emits the difference; when the text ends in U+FFFD (an unfinished UTF-8 byte sequence)
nothing is emitted and the offsets do not move, so the character comes out whole later.

The StopChecker then decides, after each new token, whether the sequence is finished.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

from labengine.sequence import Logprob, Sequence, SequenceGroup, SequenceStatus

# 5 is an arbitrary value that should work for all tokenizers (bigger = more conservative).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
INVALID_TOKEN_ID = -1


class _TokenizerInfo:
    """Per-tokenizer values that are slow to recompute on every token."""

    def __init__(self, tokenizer) -> None:
        self.all_special_tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
        get_added = getattr(tokenizer, "get_added_vocab", None)
        self.added_vocab = dict(get_added()) if get_added is not None else {}
        self.is_fast = bool(getattr(tokenizer, "is_fast", False))
        self.length = len(tokenizer)


_INFO_CACHE: dict[int, tuple[object, _TokenizerInfo]] = {}


def _info(tokenizer) -> _TokenizerInfo:
    entry = _INFO_CACHE.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        entry = (tokenizer, _TokenizerInfo(tokenizer))
        _INFO_CACHE[id(tokenizer)] = entry
    return entry[1]


def _replace_none_with_empty(tokens: list) -> None:
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i] = ""


def _convert_tokens_to_string_with_added_encoders(tokenizer, output_tokens: list[str],
                                                  skip_special_tokens: bool,
                                                  spaces_between_special_tokens: bool) -> str:
    # Adapted from HF transformers' slow-tokenizer decode: added tokens are kept as they
    # are and (optionally) separated by spaces.
    info = _info(tokenizer)
    sub_texts: list[str] = []
    current_sub_text: list[str] = []
    for token in output_tokens:
        if skip_special_tokens and token in info.all_special_tokens:
            continue
        if token in info.added_vocab:
            if current_sub_text:
                sub_texts.append(tokenizer.convert_tokens_to_string(current_sub_text))
                current_sub_text = []
            sub_texts.append(token)
        else:
            current_sub_text.append(token)
    if current_sub_text:
        sub_texts.append(tokenizer.convert_tokens_to_string(current_sub_text))
    if spaces_between_special_tokens:
        return " ".join(sub_texts)
    return "".join(sub_texts)


def convert_prompt_ids_to_tokens(tokenizer, prompt_ids: list[int],
                                 skip_special_tokens: bool = False
                                 ) -> tuple[list[str], int, int]:
    """Converts the last few prompt ids to tokens and returns (tokens, prefix, read) offsets.

    Only the tail of the prompt matters for incremental detokenization.
    """
    new_tokens = tokenizer.convert_ids_to_tokens(
        prompt_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET - 2:],
        skip_special_tokens=skip_special_tokens)
    new_tokens = list(new_tokens)
    read_offset = len(new_tokens)
    prefix_offset = max(read_offset - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
    # Guard against out-of-vocab prompt ids.
    _replace_none_with_empty(new_tokens)
    return new_tokens, prefix_offset, read_offset


def detokenize_incrementally(tokenizer, all_input_ids: list[int],
                             prev_tokens: Optional[list[str]], prefix_offset: int,
                             read_offset: int, skip_special_tokens: bool = False,
                             spaces_between_special_tokens: bool = True
                             ) -> tuple[list[str], str, int, int]:
    """Detokenizes the last id of ``all_input_ids`` given the previous tokens.

    Returns (new_tokens, new_text, new_prefix_offset, new_read_offset).
    """
    new_token_id = all_input_ids[-1]
    is_first_iter = prev_tokens is None
    if is_first_iter:
        prev_tokens, prefix_offset, read_offset = convert_prompt_ids_to_tokens(
            tokenizer, all_input_ids[:-1], skip_special_tokens=skip_special_tokens)
    assert prev_tokens is not None
    info = _info(tokenizer)

    if new_token_id >= info.length or new_token_id < 0:
        # Out-of-vocabulary id: no text.
        new_tokens = [""]
    else:
        # A list so that skip_special_tokens is respected.
        new_tokens = tokenizer.convert_ids_to_tokens(
            [new_token_id], skip_special_tokens=skip_special_tokens)
        if isinstance(new_tokens, str):
            new_tokens = [new_tokens]
        new_tokens = ["" if t is None else t for t in new_tokens]
    output_tokens = prev_tokens + new_tokens

    # On the first iteration, every token is new.
    if is_first_iter:
        new_tokens = output_tokens

    # The prefix text only serves to defeat the decoders' clean-up rules, which add a space
    # or not depending on the neighbouring ids.
    if info.is_fast or not info.added_vocab:
        prefix_text = tokenizer.convert_tokens_to_string(output_tokens[prefix_offset:read_offset])
        new_text = tokenizer.convert_tokens_to_string(output_tokens[prefix_offset:])
    else:
        prefix_text = _convert_tokens_to_string_with_added_encoders(
            tokenizer, output_tokens[prefix_offset:read_offset],
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens)
        new_text = _convert_tokens_to_string_with_added_encoders(
            tokenizer, output_tokens[prefix_offset:],
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens)

    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
        # A U+FFFD at the end is probably an unfinished UTF-8 byte sequence (byte
        # fallback); wait for the next token.
        return new_tokens, "", prefix_offset, read_offset

    new_text = new_text[len(prefix_text):]
    return new_tokens, new_text, read_offset, len(output_tokens)


class Detokenizer:
    """Appends the text of each new token to ``seq.output_text`` (vLLM's Detokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def get_tokenizer_for_seq(self, seq: Sequence):
        return self.tokenizer

    def decode_prompt_logprobs_inplace(self, seq_group: SequenceGroup,
                                       prompt_logprobs: list[Optional[dict[int, Logprob]]],
                                       position_offset: int = 0) -> None:
        """Fills ``decoded_token`` of each prompt-logprob entry, in place.

        ``prompt_logprobs[i]`` belongs to prompt position ``position_offset + i``
        (None entries, such as position 0, are skipped).
        """
        params = seq_group.sampling_params
        if not params.detokenize:
            return
        seq = seq_group.first_seq
        tokenizer = self.get_tokenizer_for_seq(seq)
        prompt_token_ids = list(seq.prompt_token_ids)
        prefix_offset = 0
        read_offset = 0
        next_iter_prefix_offset = 0
        next_iter_read_offset = 0
        next_iter_tokens: list[str] = []
        prev_tokens: Optional[list[str]] = None

        for position_in_list, logprobs_for_token in enumerate(prompt_logprobs):
            token_position = position_in_list + position_offset
            if not logprobs_for_token:
                continue
            for token_id, sample_logprob in logprobs_for_token.items():
                if sample_logprob.decoded_token is None and token_id != INVALID_TOKEN_ID:
                    ids_with_token = prompt_token_ids[:token_position] + [token_id]
                    new_tokens, new_text, new_prefix_offset, new_read_offset = \
                        detokenize_incrementally(
                            tokenizer, ids_with_token,
                            prev_tokens=prev_tokens,
                            prefix_offset=prefix_offset, read_offset=read_offset,
                            skip_special_tokens=params.skip_special_tokens,
                            spaces_between_special_tokens=params.spaces_between_special_tokens)
                    sample_logprob.decoded_token = new_text
                    # Carry the offsets of the real prompt token to the next position.
                    if token_id == prompt_token_ids[token_position]:
                        next_iter_prefix_offset = new_prefix_offset
                        next_iter_read_offset = new_read_offset
                        next_iter_tokens = new_tokens
            prefix_offset = next_iter_prefix_offset
            read_offset = next_iter_read_offset
            if prev_tokens is None:
                prev_tokens = next_iter_tokens
            else:
                prev_tokens.extend(next_iter_tokens)

    def decode_sequence_inplace(self, seq: Sequence, params) -> int:
        """Decodes the sequence's last token: appends its text to ``seq.output_text``,
        fills ``decoded_token`` in the last logprob dict, and returns the number of new
        characters."""
        all_input_ids = seq.get_token_ids()
        token_id_generated_this_iteration = all_input_ids[-1]
        tokenizer = self.get_tokenizer_for_seq(seq)

        # Convert the prompt's tail to tokens once, so that each logprob below reuses it.
        if seq.tokens is None:
            seq.tokens, seq.prefix_offset, seq.read_offset = convert_prompt_ids_to_tokens(
                tokenizer, all_input_ids[:-1], skip_special_tokens=params.skip_special_tokens)

        new_tokens, new_decoded_token_text, prefix_offset, read_offset = \
            detokenize_incrementally(
                tokenizer, all_input_ids, prev_tokens=seq.tokens,
                prefix_offset=seq.prefix_offset, read_offset=seq.read_offset,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens)

        # Decode the alternatives of the logprob dict.
        logprobs = seq.output_logprobs[-1] if seq.output_logprobs else None
        if logprobs:
            previous_tokens = all_input_ids[:-1]
            for token_id, sample_logprob in logprobs.items():
                if token_id == token_id_generated_this_iteration:
                    sample_logprob.decoded_token = new_decoded_token_text
                    continue
                if sample_logprob.decoded_token is None and token_id != INVALID_TOKEN_ID:
                    _, new_text, _, _ = detokenize_incrementally(
                        tokenizer, previous_tokens + [token_id], prev_tokens=seq.tokens,
                        prefix_offset=seq.prefix_offset, read_offset=seq.read_offset,
                        skip_special_tokens=params.skip_special_tokens,
                        spaces_between_special_tokens=params.spaces_between_special_tokens)
                    sample_logprob.decoded_token = new_text

        seq.tokens.extend(new_tokens)
        seq.prefix_offset = prefix_offset
        seq.read_offset = read_offset
        seq.output_text += new_decoded_token_text
        return len(new_decoded_token_text)


class StopChecker:
    """Decides after each new token whether a sequence is finished (vLLM v0.5.4 order).

    1. fewer than ``min_tokens`` generated: nothing is checked;
    2. EOS (unless ignore_eos): "stop", stop_reason None, its text removed;
    3. a ``stop_token_ids`` token: "stop", stop_reason = the id, its text removed unless
       include_stop_str_in_output;
    4. a stop string in the new text (plus ``len(stop)`` characters before it, so matches
       that span tokens are found): "stop", stop_reason = the string, text cut before the
       match (after it with include_stop_str_in_output);
    5. ``seq_len > max_model_len``: "length";
    6. ``output_len == max_tokens``: "length".

    Args:
        max_model_len: The model's context length.
        tokenizer_or_getter: A tokenizer, or a function seq -> tokenizer (vLLM's
            get_tokenizer_for_seq), or None; its ``eos_token_id`` is the EOS.
        eos_token_ids: More ids treated as EOS (e.g. generation_config's eos_token_id).
    """

    def __init__(self, max_model_len: int,
                 tokenizer_or_getter: Union[Callable, object, None] = None,
                 eos_token_ids: Optional[Iterable[int]] = None) -> None:
        self.max_model_len = max_model_len
        if tokenizer_or_getter is None:
            self.get_tokenizer_for_seq = lambda seq: None
        elif hasattr(tokenizer_or_getter, "convert_ids_to_tokens") or hasattr(
                tokenizer_or_getter, "eos_token_id"):
            tok = tokenizer_or_getter
            self.get_tokenizer_for_seq = lambda seq: tok
        else:
            self.get_tokenizer_for_seq = tokenizer_or_getter
        self.eos_token_ids: set[int] = set(eos_token_ids or ())

    def get_eos_token_ids(self, seq: Optional[Sequence] = None) -> set[int]:
        """The ids that count as EOS: the tokenizer's eos_token_id plus eos_token_ids."""
        tokenizer = self.get_tokenizer_for_seq(seq)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            return self.eos_token_ids
        return self.eos_token_ids | {eos}

    def primary_eos_token_id(self, seq: Optional[Sequence] = None) -> Optional[int]:
        tokenizer = self.get_tokenizer_for_seq(seq)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None and len(self.eos_token_ids) == 1:
            eos = next(iter(self.eos_token_ids))
        return eos

    def maybe_stop_sequence(self, seq: Sequence, new_char_count: int, sampling_params,
                            eos_token_ids: Optional[set[int]] = None) -> None:
        params = sampling_params
        # 1. Not enough tokens yet: skip every stop check.
        if seq.get_output_len() < params.min_tokens:
            return

        last_token_id = seq.get_last_token_id()
        # 2. EOS.
        if not params.ignore_eos:
            eos_ids = self.get_eos_token_ids(seq) if eos_token_ids is None else eos_token_ids
            if last_token_id in eos_ids:
                # Never expose the EOS text (unless explicitly asked).
                if new_char_count and not params.include_stop_str_in_output:
                    seq.output_text = seq.output_text[:-new_char_count]
                seq.status = SequenceStatus.FINISHED_STOPPED
                return

        # 3. Stop token ids (one token per step).
        if last_token_id in params.stop_token_ids:
            if new_char_count and not params.include_stop_str_in_output:
                seq.output_text = seq.output_text[:-new_char_count]
            seq.status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = last_token_id
            return

        # 4. Stop strings.
        stop_str = self._check_stop_strings(seq, new_char_count, params)
        if stop_str is not None:
            seq.status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = stop_str
            return

        # 5. The context is full (V0: prompt + output may reach max_model_len + 1).
        if seq.get_len() > self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            return

        # 6. max_tokens.
        if seq.get_output_len() == params.max_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            return

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_char_count: int, params) -> Optional[str]:
        """Finds a stop string in the new text (or spanning into it); truncates the text.

        The first string in list order that matches wins.
        """
        if not new_char_count:
            return None
        for stop_str in params.stop:
            stop_string_len = len(stop_str)
            # Search only the new characters and the len(stop_str) before them.
            stop_index = seq.output_text.find(stop_str, -new_char_count - stop_string_len)
            if stop_index == -1:
                continue
            if params.include_stop_str_in_output:
                # Truncate after the stop string.
                stop_index += stop_string_len
                if stop_index >= len(seq.output_text):
                    return stop_str
            # Truncate before (or after) the stop string: characters after it are dropped.
            seq.output_text = seq.output_text[:stop_index]
            return stop_str
        return None
