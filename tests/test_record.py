"""The record room: where decisions land (Dest), the trajectory memory reused across calls
(BufferPool) and what a result keeps (record_obs)."""

import numpy as np
import pytest
import torch
from helpers import TOY, assert_identical, latency_policy, make_engine


def test_stage_rows_land_in_their_own_episode_rows_in_any_order():
    # A stage's envs hold episodes in any order; rows [17, 16, 19, 20] span 17..20 like a
    # block but are not one (this once wrote episode 16's decision into row 18).
    from pipeline.record.store import Dest

    rows = np.array([17, 16, 19, 20])
    dest = Dest(rows, np.zeros(4, np.int64), np.arange(4), stage_len=4)
    dst = np.full((24, 2), -1)
    dest.put(dst, np.array([170, 160, 190, 200]))
    assert dst[rows, 0].tolist() == [170, 160, 190, 200] and (dst[18] == -1).all()
    block = Dest(np.array([4, 5, 6, 7]), np.ones(4, np.int64), np.arange(4), stage_len=4)
    assert block.block == (4, 1)


@pytest.mark.parametrize("row_shape", [(3,), (64, 96, 3)])  # a fancy index, a memcpy each
def test_a_gathered_batch_lands_row_by_row_from_its_own_slots(row_shape):
    # Dynamic batching records a batch of envs each in its own slot with one scatter:
    # batch row j is src[slots[j], envs[j]] and goes to [rows[j], ts[j]]; src picks the rows
    # that are recorded at all (a parked env's is not).
    from pipeline.record.store import Dest

    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (2, 6, *row_shape), dtype=np.uint8)
    slots, envs = np.array([1, 0, 1, 0]), np.array([5, 2, 0, 3])
    dest = Dest.scatter(np.array([7, 1, 4]), np.array([0, 3, 2]), np.array([0, 2, 3]))
    assert dest.block is None and dest.n == 3
    dst = np.zeros((8, 4, *row_shape), np.uint8)
    dest.put_from(dst, src, slots, envs)
    assert (dst[7, 0] == src[1, 5]).all() and (dst[1, 3] == src[1, 0]).all()
    assert (dst[4, 2] == src[0, 3]).all()
    assert np.count_nonzero(dst.reshape(32, -1).any(1)) == 3  # nothing else written


def test_buffer_pool_reuses_only_what_nobody_references():
    from pipeline.record.store import BufferPool

    pool = BufferPool(keep=2)
    a = pool.take((4, 3), np.float32)
    view = a[1:]
    del a
    b = pool.take((4, 3), np.float32)  # a view keeps the first buffer busy: a new one
    assert pool.allocated == 2 and pool.reused == 0
    del view, b
    c = pool.take((4, 3), np.float32)
    d = pool.take((4, 3), np.float32)
    assert pool.reused == 2 and c is not d
    e = pool.take((4, 3), np.float32)  # both pooled ones in use, the cap is 2: not pooled
    assert pool.allocated == 3 and pool.reused == 2
    del e
    pool.take((4, 3), np.float32)  # e was never pooled, so nothing comes back
    assert pool.allocated == 4


def test_cameras_of_one_size_are_all_reused():
    # Three cameras of one size take three buffers of one shape in each call. The pool once
    # kept two per shape, so every call allocated (and faulted in) the third afresh: 132 ms
    # a call for 300 decisions of three 224x224 cameras.
    three = dict(TOY, cameras=("a", "b", "c"))
    with make_engine(latency_policy(), env_kwargs=three) as e:
        e.rollout(4)
        allocated = e._buffers.allocated
        for _ in range(3):
            out = e.rollout(4)
            del out
        assert e._buffers.allocated == allocated
        kept = e.rollout(4)
        again = e.rollout(4)  # `kept` is held: its three image buffers must not be reused
        images = [("observation", "image", c) for c in "abc"]
        assert all(kept[k].data_ptr() != again[k].data_ptr() for k in images)


def test_a_result_still_held_is_never_overwritten_and_a_dropped_one_is_reused():
    with make_engine(latency_policy()) as e:
        first = e.rollout(4)
        kept = first.clone()
        second = e.rollout(4)  # must record into other memory: `first` is alive
        assert_identical(first, kept)
        assert not torch.equal(first["observation", "state"], second["observation", "state"])
        reused = e._buffers.reused
        image = first["observation", "image", "cam"]  # one tensor of it is enough to hold it
        del first, second
        third = e.rollout(4)  # `second`'s memory comes back; `first`'s image does not
        assert e._buffers.reused > reused
        assert torch.equal(image, kept["observation", "image", "cam"])
        assert third["mask"].all()
        eps = e.collect_episodes(2, 4)
        again = eps.clone()
        del eps
        fresh = e.collect_episodes(2, 4)  # reused memory; padding is zeroed, not stale
        assert not torch.equal(fresh["episode_id"], again["episode_id"])
        pad = ~fresh["mask"]
        assert (fresh["observation", "state"][pad] == 0).all()


def test_record_obs_keeps_only_the_named_observations(backend):
    with make_engine(latency_policy(), record_obs=["state"], **backend) as e:
        td = e.rollout(3)
    assert ("observation", "state") in td.keys(include_nested=True)
    assert ("observation", "image", "cam") not in td.keys(include_nested=True)
    with make_engine(latency_policy()) as e:
        full = e.rollout(3)
    assert torch.equal(full["observation", "state"], td["observation", "state"])
    with pytest.raises(ValueError, match=r"record_obs=\['state', 'image/nope'\].*unknown"):
        make_engine(latency_policy(), record_obs=["state", "image/nope"])
