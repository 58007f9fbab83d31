"""BlockManager and Scheduler on plain Python objects: no model, milliseconds each."""
import random
from types import SimpleNamespace

import pytest

from labengine.block_manager import AllocStatus, BlockManager
from labengine.config import SchedulerConfig
from labengine.events import EventBus
from labengine.scheduler import Scheduler
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus


def params(n=1, best_of=None, beam=False):
    return SimpleNamespace(n=n, best_of=best_of or n, use_beam_search=beam)


_ids = iter(range(10**9))


def group(request_id, prompt_len, **kw):
    seq = Sequence(next(_ids), None, list(range(1, prompt_len + 1)))
    return SequenceGroup(str(request_id), [seq], params(**kw), arrival_time=float(request_id))


def check_conservation(bm: BlockManager):
    for alloc in (bm.gpu_allocator, bm.cpu_allocator):
        used = sum(1 for r in alloc.ref_counts if r > 0)
        assert used + alloc.get_num_free_blocks() == alloc.num_blocks
        assert all(r >= 0 for r in alloc.ref_counts)
        assert len(set(alloc.free_blocks)) == len(alloc.free_blocks)
        assert all(alloc.ref_counts[b] == 0 for b in alloc.free_blocks)
    # reference counts equal the number of tables that hold each block
    counts = {}
    for seq_id, table in bm.block_tables.items():
        dev = "cpu" if seq_id in bm.swapped_seqs else "gpu"
        for b in set(table):
            counts[(dev, b)] = counts.get((dev, b), 0) + table.count(b)
    for (dev, b), c in counts.items():
        alloc = bm.cpu_allocator if dev == "cpu" else bm.gpu_allocator
        assert alloc.ref_counts[b] == c, (dev, b)
    # a physical block belongs to one request only
    owner = {}
    for seq_id, table in bm.block_tables.items():
        dev = "cpu" if seq_id in bm.swapped_seqs else "gpu"
        for b in table:
            assert owner.setdefault((dev, b), bm.seq_request[seq_id]) == bm.seq_request[seq_id]


def test_allocate_append_free_events():
    bus = EventBus()
    events = []
    bus.subscribe(events.append)
    bm = BlockManager(block_size=4, num_gpu_blocks=8, num_cpu_blocks=4, watermark=0, event_bus=bus)
    g = group(0, 6)
    assert bm.can_allocate(g) == AllocStatus.OK
    bm.allocate(g)
    seq = g.first_seq
    assert bm.block_tables[seq.seq_id] == [0, 1]
    # two more tokens fit in block 1; the ninth token needs a third block
    for _ in range(2):
        seq.output_token_ids.append(7)
        assert bm.append_slots(seq) is None
    assert len(bm.block_tables[seq.seq_id]) == 2
    seq.output_token_ids.append(7)
    assert bm.append_slots(seq) is None
    assert bm.block_tables[seq.seq_id] == [0, 1, 2]
    bm.free(seq)
    assert bm.get_num_free_gpu_blocks() == 8
    kinds = [e.kind for e in events]
    assert kinds.count("block_allocated") == 3 and kinds.count("block_freed") == 3
    assert {e.request_id for e in events} == {"0"}


def test_never_and_later():
    bm = BlockManager(block_size=4, num_gpu_blocks=4, num_cpu_blocks=0, watermark=0)
    assert bm.can_allocate(group(0, 17)) == AllocStatus.NEVER
    a = group(1, 12)
    bm.allocate(a)
    assert bm.can_allocate(group(2, 5)) == AllocStatus.LATER
    assert bm.can_allocate(group(3, 4)) == AllocStatus.OK


def test_fork_shares_and_copy_on_write():
    bus = EventBus()
    events = []
    bus.subscribe(events.append)
    bm = BlockManager(block_size=4, num_gpu_blocks=8, num_cpu_blocks=0, watermark=0, event_bus=bus)
    g = group(0, 6)
    bm.allocate(g)
    parent = g.first_seq
    child = parent.fork(next(_ids))
    g.add(child)
    bm.fork(parent, child)
    assert bm.gpu_allocator.ref_counts[0] == 2 and bm.gpu_allocator.ref_counts[1] == 2
    check_conservation(bm)
    # both sequences write their 7th token into shared block 1: the first one copies it
    parent.output_token_ids.append(5)
    child.output_token_ids.append(9)
    assert bm.append_slots(parent) == (1, 2)
    assert bm.append_slots(child) is None  # block 1 is now the child's alone
    assert bm.block_tables[parent.seq_id] == [0, 2] and bm.block_tables[child.seq_id] == [0, 1]
    assert [e for e in events if e.kind == "block_copied"][0].src == 1
    check_conservation(bm)
    bm.free(parent)
    bm.free(child)
    assert bm.get_num_free_gpu_blocks() == 8
    check_conservation(bm)


def test_swap_out_and_in_keeps_sharing():
    bm = BlockManager(block_size=4, num_gpu_blocks=8, num_cpu_blocks=8, watermark=0)
    g = group(0, 8)
    bm.allocate(g)
    parent = g.first_seq
    child = parent.fork(next(_ids))
    g.add(child)
    bm.fork(parent, child)
    for s in g.get_seqs():
        s.status = SequenceStatus.RUNNING
    assert bm.can_swap_out(g)
    pairs = bm.swap_out(g)
    assert len(pairs) == 2  # shared blocks move once
    for s in g.get_seqs():
        s.status = SequenceStatus.SWAPPED
    assert bm.get_num_free_gpu_blocks() == 8 and bm.get_num_free_cpu_blocks() == 6
    check_conservation(bm)
    assert bm.can_swap_in(g)
    back = bm.swap_in(g)
    assert len(back) == 2
    assert bm.block_tables[parent.seq_id] == bm.block_tables[child.seq_id]
    assert bm.get_num_free_cpu_blocks() == 8
    check_conservation(bm)


def test_double_free_raises():
    bm = BlockManager(block_size=4, num_gpu_blocks=2, num_cpu_blocks=0)
    with pytest.raises(RuntimeError, match="Double free"):
        bm.gpu_allocator.decref(0)


class FakeModel:
    """Stands in for model + sampler + output processor: appends a token to every running seq."""

    def __init__(self, sched: Scheduler, rng: random.Random, max_len: int):
        self.sched, self.rng, self.max_len = sched, rng, max_len

    def step(self):
        out = self.sched.schedule()
        for s in out.scheduled_seq_groups:
            g = s.seq_group
            for seq in g.get_seqs(SequenceStatus.RUNNING):
                seq.num_computed_tokens = seq.get_len()
            running = g.get_seqs(SequenceStatus.RUNNING)
            if out.is_prefill and g.sampling_params.best_of > g.num_seqs():
                parent = running[0]
                for _ in range(g.sampling_params.best_of - 1):
                    child = parent.fork(next(_ids))
                    child.output_token_ids.append(3)
                    g.add(child)
                    self.sched.fork_seq(parent, child)
                parent.output_token_ids.append(3)
            else:
                for seq in running:
                    seq.output_token_ids.append(3)
            for seq in g.get_seqs(SequenceStatus.RUNNING):
                if seq.get_len() >= self.max_len or self.rng.random() < 0.05:
                    seq.status = SequenceStatus.FINISHED_STOPPED
                    self.sched.free_seq(seq)
        self.sched.free_finished_seq_groups()
        return out


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_randomized_scheduler_conserves_blocks(mode):
    rng = random.Random(1 if mode == "swap" else 2)
    max_len = 48
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=max_len, preemption_mode=mode)
    sched = Scheduler(cfg, block_size=4, num_gpu_blocks=16, num_cpu_blocks=32, watermark=0)
    model = FakeModel(sched, rng, max_len)
    preemptions = 0
    next_id = 0
    for step in range(20000):
        if next_id < 300 and rng.random() < 0.3:
            n = rng.choice([1, 1, 2, 3])
            sched.add_seq_group(group(next_id, rng.randint(1, 40), n=n, best_of=n + rng.choice([0, 1])))
            next_id += 1
        if rng.random() < 0.02 and sched.running:
            sched.abort_seq_group(rng.choice(list(sched.running)).request_id)
        out = model.step()
        preemptions += len(out.preempted)
        check_conservation(sched.block_manager)
        if next_id >= 300 and not sched.has_unfinished_seqs():
            break
    assert not sched.has_unfinished_seqs()
    assert preemptions > 0, "the tiny cache should have forced preemption"
    bm = sched.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_cpu_blocks
    assert not bm.block_tables
