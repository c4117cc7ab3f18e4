"""rollout.py's engine pieces without a model: the BlockPool's counts, the Scheduler's prefix sharing,
copy on write, admission headroom and preemption (each checked by hand, then in a simulated run over
many pools), and the Lanes' tables against the host's block lists."""

import random

import pytest
import torch

from rollout import BLOCK_SIZE, TRASH, BlockPool, Lanes, Scheduler, Sequence, blocks_for

# ---------------------------------------------------------------------------------------------------
# BlockPool


def test_the_pool_counts_holders_and_never_hands_out_the_trash_block():
    pool = BlockPool(6)
    a = pool.take(3)
    assert a == [1, 2, 3] and TRASH not in a
    pool.share(a[:2])  # a second holder of two of them
    b = a[:2]
    pool.check([a, b])
    pool.release(a)
    assert pool.available() == 3  # block 3 is free again; 1 and 2 are still held by b
    pool.check([b])
    assert sorted(pool.take(3)) == [3, 4, 5] and pool.available() == 0
    with pytest.raises(AssertionError):
        pool.take(1)


@pytest.mark.parametrize("damage,message", [
    (lambda pool: pool.refs.__setitem__(1, 2), "reference count"),
    (lambda pool: pool.free.append(1), "free and held"),
    (lambda pool: pool.free.append(TRASH), "trash"),
    (lambda pool: pool.free.pop(), "neither free nor held"),
])
def test_the_pool_check_finds_each_broken_invariant(damage, message):
    pool = BlockPool(5)
    held = pool.take(2)
    pool.check([held])
    damage(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check([held])


# ---------------------------------------------------------------------------------------------------
# Scheduler, by hand


def test_samples_share_the_prefix_full_blocks_and_copy_its_partial_block():
    # A 20-token prompt: its first 19 tokens (the prefix) fill one block and 3 positions of a second.
    prompt = list(range(20))
    scheduler = Scheduler([prompt], counts=[3], budgets=[40], sync_every=1, blocks=20)
    first = scheduler.admit(running=0, step=0)
    prefix_blocks = first.prefill[1]
    assert first.prefill[0] == prompt[:-1] and len(prefix_blocks) == 2 and first.next_token == 19
    full, partial = prefix_blocks
    s1 = first.sequence
    assert first.copy == (partial, s1.blocks[1]) and s1.blocks[0] == full and s1.length == 19
    assert len(s1.blocks) == 2  # position 19, the first it writes, lies in its own copy of the partial block
    second = scheduler.admit(running=1, step=0)
    s2 = second.sequence
    assert second.prefill is None and s2.blocks[0] == full and second.copy == (partial, s2.blocks[1])
    assert s2.blocks[1] != s1.blocks[1]  # a copy of its own
    scheduler.pool.check(scheduler.holders([s1, s2]))
    assert scheduler.pool.refs[full] == 3  # the prefix and two samples
    third = scheduler.admit(running=2, step=0)
    s3 = third.sequence
    assert scheduler.prefixes[0] is None  # the last sample: the prefix is let go...
    assert scheduler.pool.refs[full] == 3  # ...and its full block lives on in the three tables
    scheduler.pool.check(scheduler.holders([s1, s2, s3]))
    assert scheduler.admit(running=3, step=0) is None  # nothing left


def test_admission_keeps_headroom_for_the_running_sequences_to_grow():
    # 3-token prompts of one sample each, a prefix of 2 positions: admitting a sample takes its prompt's
    # prefix block and its own copy of it (2 blocks), then lets the prefix go (1 block held). Headroom:
    # a quarter block per running sequence, ceil(4k / 16) blocks with k running.
    prompts = [[1, 2, 3]] * 8
    scheduler = Scheduler(prompts, counts=[1] * 8, budgets=[64] * 8, sync_every=1, blocks=1 + 10)
    admitted = []
    while (a := scheduler.admit(running=len(admitted), step=0)) is not None:
        admitted.append(a.sequence)
        scheduler.pool.check(scheduler.holders(admitted))
    # sample k needs 2 + ceil(4k / 16) of the 10 - k free blocks: k = 0..6 fit (2 of 10, 3 of 9, 3 of 8,
    # 3 of 7, 3 of 6, 4 of 5, 4 of 4), k = 7 does not (4 of 3)
    assert len(admitted) == 7 and scheduler.pool.available() == 3
    assert all(scheduler.prefixes[p] is None for p in range(7))


def test_preemption_takes_the_newest_and_a_resumed_sample_is_recomputed_in_blocks_of_its_own():
    prompt = list(range(1, 18))  # a 16-position prefix: one full block, no partial one
    scheduler = Scheduler([prompt], counts=[2], budgets=[100], sync_every=16, blocks=1 + 4)
    old = scheduler.admit(running=0, step=0).sequence
    new = scheduler.admit(running=1, step=0).sequence
    assert old.blocks[0] == new.blocks[0]  # the shared full block
    old.length += 16
    new.length += 16  # one sync later each needs another block; one is free
    running = [old, new]
    preempted = scheduler.make_room(running)
    assert preempted == [new] and running == [old] and new.blocks == []
    scheduler.requeue(new, tokens=[7] * 16, logprobs=[-1.0] * 16)
    assert scheduler.grow(old) and scheduler.pool.available() == 1
    scheduler.pool.check(scheduler.holders([old]))
    old.blocks, freed = [], old.blocks  # the old one finishes
    scheduler.pool.release(freed)
    again = scheduler.admit(running=0, step=20)
    assert again.sequence is new and again.prefill[0] == prompt + [7] * 15 and again.next_token == 7
    assert again.copy is None and new.length == 17 + 15 and new.deadline == 20 + 100 - 16  # 32 positions written
    assert scheduler.pool.refs[new.blocks[0]] == 1  # not the prompt's shared block: its own
    scheduler.pool.check(scheduler.holders([new]))


# ---------------------------------------------------------------------------------------------------
# Scheduler, in a simulated run


def simulate(prompts, counts, budgets, sync_every, blocks, lanes, seed=0, full=False):
    """Drive a Scheduler as the engine does, with decoding replaced by arithmetic: every round each
    running sequence writes up to sync_every positions and stops at its own length (drawn here; with
    `full`, its budget). The pool's invariants are checked after every change, and no sequence writes
    past its blocks. Returns (finished samples, preemptions)."""
    rng = random.Random(seed)
    target = {(p, j): budgets[p] if full else rng.randint(1, budgets[p])
              for p in range(len(prompts)) for j in range(counts[p])}
    scheduler = Scheduler(prompts, counts, budgets, sync_every, blocks)
    running, done, preemptions, step = [], set(), 0, 0

    def generated(s):
        return s.length - (len(prompts[s.prompt]) - 1)

    while scheduler.work or running:
        running.sort(key=lambda s: s.admitted)
        for s in scheduler.make_room(running):
            scheduler.requeue(s, [0] * generated(s), [0.0] * generated(s))
            preemptions += 1
        for s in running:
            scheduler.grow(s)
        while len(running) < lanes and (a := scheduler.admit(len(running), step)) is not None:
            running.append(a.sequence)
        scheduler.pool.check(scheduler.holders(running))
        assert running, "nothing runs and nothing can start"
        for s in running:  # one sync's decode steps
            s.length += min(sync_every, target[s.prompt, s.sample] - generated(s))
            assert s.length <= len(s.blocks) * BLOCK_SIZE, "a sequence wrote past its blocks"
        step += sync_every
        for s in [s for s in running if generated(s) == target[s.prompt, s.sample]]:
            running.remove(s)
            scheduler.pool.release(s.blocks)
            done.add((s.prompt, s.sample))
            scheduler.pool.check(scheduler.holders(running))
    return done, preemptions


@pytest.mark.parametrize("sync_every", [1, 4, 16])
def test_every_pool_that_holds_one_sequence_runs_every_sample_to_its_end(sync_every):
    # The engine accepts a pool that holds one sequence at its full budget with its prompt's partial
    # block alongside (blocks_for(longest) + 1): from there up, every sample must finish.
    prompts = [[1] * 40, [2] * 7, [3] * 16, [4]]
    counts, budgets = [4, 3, 2, 5], [200, 60, 90, 30]
    longest = max(len(p) - 1 + b for p, b in zip(prompts, budgets))
    smallest = blocks_for(longest) + 1
    for blocks in range(smallest, smallest + 12):
        for lanes in (2, 5):
            done, preemptions = simulate(prompts, counts, budgets, sync_every, 1 + blocks, lanes, seed=blocks)
            assert done == {(p, j) for p in range(4) for j in range(counts[p])}, (blocks, lanes)
    assert simulate(prompts, counts, budgets, sync_every, 1 + smallest, 5)[1] > 0  # the small pools preempt


@pytest.mark.parametrize("sync_every", [1, 16])
def test_a_preempted_sample_fits_while_its_prompt_waits_for_others(sync_every):
    # Issue 26's crash: one 40-token prompt, 4 samples that all run to their 200-token budget, 2 lanes,
    # a pool of 16 or 17 blocks. A preempted sample is recomputed without its prompt's shared blocks,
    # so with nothing running it needs room its own prompt's waiting prefix holds.
    for blocks in range(16, 21):
        done, preemptions = simulate([[5] * 40], [4], [200], sync_every, 1 + blocks, lanes=2, full=True)
        assert len(done) == 4 and (preemptions > 0 or blocks > 16), blocks


# ---------------------------------------------------------------------------------------------------
# Lanes


def test_lanes_keep_their_tables_equal_to_the_block_lists_through_load_clear_and_compact():
    lanes = Lanes(4, max_blocks=5, max_new=8, device=torch.device("cpu"))
    seqs = [Sequence(0, j, blocks=[3 * j + 1, 3 * j + 2], length=5 + j) for j in range(4)]
    for lane, s in enumerate(seqs):
        lanes.load(lane, s, next_token=10 + lane, budget=8, stream=lane, sample_id=lane)
    lanes.check()
    seqs[3].blocks.append(99)
    lanes.extend(seqs[3], [99])
    lanes.clear(0)
    lanes.clear(2)
    lanes.check()
    assert lanes.top() == 4
    lanes.compact()
    assert lanes.sequences == [seqs[3], seqs[1], None, None] and lanes.top() == 2
    lanes.check()
    assert lanes.token[:2].tolist() == [13, 11] and lanes.pos[:2].tolist() == [8, 6]
    assert lanes.pos[2:].tolist() == [0, 0] and not lanes.active[2:].any()
    lanes.table[1, 3] = 7  # a table that no longer matches its sequence's blocks
    with pytest.raises(AssertionError, match="lane 1"):
        lanes.check()
