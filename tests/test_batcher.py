"""StageBatcher without processes: what a batch holds is what the slot rows hold."""

import numpy as np
import pytest

import envs
from pipeline import schema
from pipeline.runtime.layout import Layout
from pipeline.schedule.stages import Stage, StageBatcher


def _write(a, slot: int, env: int, episode: int, text: str, is_init: bool) -> None:
    """What a worker leaves in a slot row for an observation of ``episode``."""
    raw = np.frombuffer(text.encode(), np.uint8)
    a["instruction"][slot, env, : len(raw)] = raw
    a["instruction_len"][slot, env] = len(raw)
    a["episode_id"][slot, env] = episode
    a["is_init"][slot, env] = is_init


@pytest.fixture
def cells():
    layout = Layout(envs.make("toy", state_dim=8).spec, num_envs=2, chunk_len=2)
    a = layout.views(bytearray(layout.nbytes))
    batcher = StageBatcher(layout, a, seed=0)
    batcher.new_call()
    # dynamic batching's cells: one single-env stage per env
    return a, batcher, [Stage(i, i, i + 1, [0]) for i in range(2)]


def _texts(td) -> list[str]:
    return td.get(schema.INSTRUCTION).tolist()


def test_a_solo_batch_after_a_gathered_episode_start_sees_the_new_instruction(cells):
    """Env 0 decides alone in episode A, starts episode B inside a gathered batch, then
    decides alone again: that decision is B's, whatever batch met B's first observation
    (the cache keyed by is_init alone gave it A's text)."""
    a, batcher, (c0, c1) = cells
    _write(a, 0, 0, episode=2, text="pick the red cube", is_init=True)
    _write(a, 0, 1, episode=4, text="open the drawer", is_init=True)
    assert _texts(batcher.batch(c0)) == ["pick the red cube"]
    c0.slot = c1.slot = 1  # both stepped; env 0's episode A ended, B began
    _write(a, 1, 0, episode=6, text="stack it", is_init=True)
    _write(a, 1, 1, episode=4, text="open the drawer", is_init=False)
    assert _texts(batcher.gather([c1, c0])) == ["open the drawer", "stack it"]
    c0.slot = 0  # env 0 stepped again, still in episode B
    _write(a, 0, 0, episode=6, text="stack it", is_init=False)
    assert _texts(batcher.batch(c0)) == ["stack it"]
    assert {e: t.data for e, t in batcher.episode_text.items()} == {
        2: "pick the red cube",
        4: "open the drawer",
        6: "stack it",
    }


def test_a_stage_batch_follows_its_episodes_not_the_is_init_flags(cells):
    """The texts follow the episode ids the rows hold: an episode seen first elsewhere (its
    is_init flag met by another batch) still changes the stage's texts."""
    a, batcher, _ = cells
    stage = Stage(0, 0, 2, [0])
    _write(a, 0, 0, episode=2, text="a", is_init=True)
    _write(a, 0, 1, episode=4, text="bb", is_init=True)
    assert _texts(batcher.batch(stage)) == ["a", "bb"]
    a["is_init"][0] = 0
    assert _texts(batcher.batch(stage)) == ["a", "bb"]
    _write(a, 0, 1, episode=8, text="a longer instruction", is_init=False)
    assert _texts(batcher.batch(stage)) == ["a", "a longer instruction"]


def test_text_stacks_match_the_public_constructor():
    # schema.text_stack takes tensordict's unchecked constructor where it exists: the same
    # stacks as NonTensorStack's own, rows of one shared item, nested, and empty.
    from tensordict import NonTensorData, NonTensorStack, TensorDict

    pick, place = NonTensorData("pick the cube"), NonTensorData("place it")
    row = [pick, place, pick]
    fast, public = schema.text_stack(row), NonTensorStack(*row)
    assert isinstance(fast, NonTensorStack) and fast.batch_size == public.batch_size == (3,)
    assert fast.tolist() == public.tolist() == ["pick the cube", "place it", "pick the cube"]
    grid = schema.text_stack([schema.text_stack(row), schema.text_stack(row[::-1])])
    assert grid.batch_size == (2, 3) and grid[1, 0].data == "pick the cube"
    assert grid.tolist()[1] == ["pick the cube", "place it", "pick the cube"][::-1]
    empty = TensorDict({}, batch_size=[0])  # what record.views sets when no step is valid
    empty.set(schema.INSTRUCTION, schema.text_stack([]))
    assert schema.instructions(empty) == []
