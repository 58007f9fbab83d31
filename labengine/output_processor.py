"""OutputProcessor: applies the sampler's output to the sequences (vLLM V0 single step).

For every request of the step:

* stores the prompt logprobs (``[None]`` first) when the sampler computed them;
* appends each sampled token to its parent sequence; at the prompt step of a request with
  ``best_of > 1`` the parent takes the first sample and new child sequences (forks that
  share the parent's KV blocks) take the others;
* detokenizes the new token and runs the StopChecker; finished sequences give their blocks
  back to the scheduler (they stay in the group as candidate outputs);
* for beam search, keeps the best ``best_of`` running beams, ranks finished candidates by
  ``cum_logprob / seq_len**length_penalty`` and decides when the search stops
  (``early_stopping`` True / False / "never").

The engine sets ``num_computed_tokens`` and the request metrics; this module only touches
tokens, text, logprobs and status.
"""
from __future__ import annotations

from typing import Optional

from labengine.outputs import beam_search_score
from labengine.sampler import SequenceGroupOutput, SequenceGroupToSample, SequenceOutput
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus


class OutputProcessor:
    """Args:
        scheduler: provides ``fork_seq(parent, child)`` and ``free_seq(seq)``.
        detokenizer: a Detokenizer, or None (no text: skip_tokenizer_init).
        stop_checker: a StopChecker.
        seq_counter: gives new sequence ids through ``next()``.
    """

    def __init__(self, scheduler, detokenizer, stop_checker, seq_counter) -> None:
        self.scheduler = scheduler
        self.detokenizer = detokenizer
        self.stop_checker = stop_checker
        self.seq_counter = seq_counter

    # ------------------------------------------------------------------ entry point
    def process_outputs(self, seq_groups_to_sample: list[SequenceGroupToSample],
                        outputs: list[SequenceGroupOutput]) -> None:
        assert len(seq_groups_to_sample) == len(outputs), (
            f"{len(seq_groups_to_sample)} groups but {len(outputs)} sampler outputs")
        for sg, out in zip(seq_groups_to_sample, outputs):
            seq_group = sg.seq_group
            if out.prompt_logprobs is not None:
                self.process_prompt_logprobs(seq_group, out.prompt_logprobs)
            if seq_group.is_finished():
                # Aborted while the step ran.
                continue
            if not out.samples and not sg.sample_rows:
                continue
            self._process_group_samples(sg, out.samples)

    def _adopt(self, seq_group: SequenceGroup, pairs) -> None:
        """(seq, parent) pairs of this step: new children join the group (forked in the block
        manager while running); finished parents give their blocks back, after the forks,
        but stay in the group as candidate outputs."""
        for seq, parent in pairs:
            if seq is not parent:
                if not seq.is_finished():
                    seq.status = SequenceStatus.RUNNING
                seq_group.add(seq)
                if not seq.is_finished():
                    self.scheduler.fork_seq(parent, seq)
        for seq, parent in pairs:
            if seq is parent and seq.is_finished():
                self.scheduler.free_seq(seq)

    def process_prompt_logprobs(self, seq_group: SequenceGroup, prompt_logprobs: list) -> None:
        """Stores prompt logprobs on the group; the first chunk gets a leading None (the
        first prompt token has no logprob)."""
        prompt_logprobs = list(prompt_logprobs)
        if not seq_group.prompt_logprobs:
            prompt_logprobs = [None] + prompt_logprobs
            seq_group.prompt_logprobs = []
        if self.detokenizer is not None:
            self.detokenizer.decode_prompt_logprobs_inplace(
                seq_group, prompt_logprobs, position_offset=len(seq_group.prompt_logprobs))
        seq_group.prompt_logprobs.extend(prompt_logprobs)

    # ------------------------------------------------------------------ samples
    def _process_group_samples(self, sg: SequenceGroupToSample,
                               samples: list[SequenceOutput]) -> None:
        seq_group = sg.seq_group
        params = seq_group.sampling_params
        if len(samples) == 1 and len(sg.seq_ids) == 1 and not params.use_beam_search:
            # The common case (one running sequence, one sample): append, check stops, and
            # free the blocks of a sequence that just finished; the same rules as below.
            seq = seq_group.seqs_dict.get(sg.seq_ids[0])
            sample = samples[0]
            if seq is not None and not seq.is_finished() and sample.parent_seq_id == seq.seq_id:
                seq.append_token_id(sample.output_token, sample.logprobs, sample.logprob)
                self._detokenize_and_check_stop(seq, params)
                if seq.is_finished():
                    self.scheduler.free_seq(seq)
                return
        parent_seqs = [seq_group.seqs_dict[sid] for sid in sg.seq_ids
                       if sid in seq_group.seqs_dict
                       and not seq_group.seqs_dict[sid].is_finished()]
        existing_finished_seqs = [s for s in seq_group.get_seqs() if s.is_finished()]
        parent_child: dict[int, list[SequenceOutput]] = {p.seq_id: [] for p in parent_seqs}
        for sample in samples:
            child_list = parent_child.get(sample.parent_seq_id)
            if child_list is not None:
                child_list.append(sample)

        # (child, parent) pairs; the parent itself continues with its last sample.
        child_seqs: list[tuple[Sequence, Sequence]] = []
        for parent in parent_seqs:
            child_samples = parent_child[parent.seq_id]
            if not child_samples:
                # No continuation for this parent (a beam that fell out): drop it.
                parent.status = SequenceStatus.FINISHED_ABORTED
                seq_group.remove(parent.seq_id)
                self.scheduler.free_seq(parent)
                continue
            # The parent continues with the first sample; each other sample goes to a new
            # child forked from the parent's state before this step's token. (vLLM gives the
            # parent the last sample instead; only the indices of the completions differ.)
            children = []
            for child_sample in child_samples[1:]:
                child = parent.fork(next(self.seq_counter))
                child.append_token_id(child_sample.output_token, child_sample.logprobs,
                                      child_sample.logprob)
                children.append((child, parent))
            first = child_samples[0]
            parent.append_token_id(first.output_token, first.logprobs, first.logprob)
            child_seqs.append((parent, parent))
            child_seqs.extend(children)

        for seq, _ in child_seqs:
            self._detokenize_and_check_stop(seq, params)

        if not params.use_beam_search:
            self._adopt(seq_group, child_seqs)
            return

        self._process_beam_search(seq_group, child_seqs, existing_finished_seqs)

    def _detokenize_and_check_stop(self, seq: Sequence, params) -> None:
        """Decode the sequence's new token (when asked) and apply the stop rules to it."""
        new_char_count = 0
        if params.detokenize and self.detokenizer is not None:
            new_char_count = self.detokenizer.decode_sequence_inplace(seq, params)
        self.stop_checker.maybe_stop_sequence(seq, new_char_count, params)

    # ------------------------------------------------------------------ beam search
    def _eos(self, seq: Optional[Sequence] = None) -> Optional[int]:
        getter = getattr(self.stop_checker, "primary_eos_token_id", None)
        return getter(seq) if getter is not None else None

    def _score(self, seq: Sequence, length_penalty: float) -> float:
        return beam_search_score(seq, length_penalty, self._eos(seq))

    def _process_beam_search(self, seq_group: SequenceGroup,
                             child_seqs: list[tuple[Sequence, Sequence]],
                             existing_finished_seqs: list[Sequence]) -> None:
        params = seq_group.sampling_params
        beam_width = params.best_of
        length_penalty = params.length_penalty
        # Let RequestOutput rank the final beams with the same EOS rule.
        seq_group.beam_eos_token_id = self._eos()

        selected: list[tuple[Sequence, Optional[Sequence]]] = []
        unselected: list[tuple[Sequence, Optional[Sequence]]] = []

        # Finished candidates: existing ones and the new ones, best beam_width kept.
        all_finished = ([(s, None, False) for s in existing_finished_seqs]
                        + [(s, p, True) for s, p in child_seqs if s.is_finished()])
        all_finished.sort(key=lambda x: self._score(x[0], length_penalty), reverse=True)
        for seq, parent, is_new in all_finished[:beam_width]:
            if is_new:
                selected.append((seq, parent))
        for seq, parent, is_new in all_finished[beam_width:]:
            if is_new:
                unselected.append((seq, parent))
            else:
                seq_group.remove(seq.seq_id)

        running = [(s, p) for s, p in child_seqs if not s.is_finished()]
        running.sort(key=lambda x: self._score(x[0], length_penalty), reverse=True)

        if not running:
            stop_beam_search = True
        elif len(all_finished) < beam_width:
            stop_beam_search = False
        else:
            best_running = running[0][0]
            current_worst = all_finished[beam_width - 1][0]
            stop_beam_search = self._check_beam_search_early_stopping(
                params.early_stopping, params, best_running, current_worst)

        if stop_beam_search:
            unselected.extend(running)
        else:
            selected.extend(running[:beam_width])
            unselected.extend(running[beam_width:])

        self._adopt(seq_group, selected)
        for seq, parent in unselected:
            if seq is parent:
                # The parent continued in a beam that was not kept: drop it.
                if not seq.is_finished():
                    seq.status = SequenceStatus.FINISHED_ABORTED
                seq_group.remove(seq.seq_id)
                self.scheduler.free_seq(seq)

    def _check_beam_search_early_stopping(self, early_stopping, params,
                                          best_running_seq: Sequence,
                                          current_worst_seq: Sequence) -> bool:
        length_penalty = params.length_penalty
        if early_stopping is True:
            return True
        current_worst_score = self._score(current_worst_seq, length_penalty)
        if early_stopping is False:
            highest_attainable_score = self._score(best_running_seq, length_penalty)
        else:
            assert early_stopping == "never"
            if length_penalty > 0.0:
                # Longer is better: the best score is reached at the longest length.
                max_model_len = self.stop_checker.max_model_len
                max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len
                max_possible_length = max(best_running_seq.get_prompt_len() + max_tokens,
                                          max_model_len)
                highest_attainable_score = beam_search_score(
                    best_running_seq, length_penalty, self._eos(best_running_seq),
                    seq_len=max_possible_length)
            else:
                highest_attainable_score = self._score(best_running_seq, length_penalty)
        return current_worst_score >= highest_attainable_score
