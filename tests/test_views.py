"""steps(): engine outputs as one row per decision, ready for a PPO/GRPO loss."""

import torch
from helpers import TOY

import envs
from pipeline import RolloutEngine, schema
from pipeline.policies import TinyVLA
from pipeline.record.views import steps

VIEWED = dict(TOY, image_size=16, episode_len=9)


def test_steps_of_episodes_and_rollouts(backend):
    spec = envs.make("toy", **VIEWED).spec
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(spec, chunk_len=4).eval()
    with RolloutEngine(
        "toy", policy, num_envs=4, num_workers=2, num_stages=2, env_kwargs=VIEWED, seed=1, **backend
    ) as e:
        eps = e.collect_episodes(num_groups=2, group_size=2)
        td = e.rollout(3)
    batch = steps(eps)
    assert batch.batch_size == (int(eps["length"].sum()),)
    rows, ts = eps["mask"].nonzero().unbind(1)
    assert torch.equal(batch["row"], rows)
    texts = eps.get(schema.INSTRUCTION).tolist()
    for j, (r, t) in enumerate(zip(rows.tolist(), ts.tolist(), strict=True)):
        assert torch.equal(batch["observation", "state"][j], eps["observation", "state"][r, t])
        assert torch.equal(batch[schema.ACTION_TOKENS][j], eps[schema.ACTION_TOKENS][r, t])
        assert torch.equal(batch["next", "reward"][j], eps["next", "reward"][r, t])
        for key in ("success", "group_id", "length", "env_steps", "restarts"):
            assert batch[key][j] == eps[key][r], key  # per-episode fields, on every step
        assert batch[schema.INSTRUCTION][j] == texts[r][t]
    assert batch["observation", "image", "cam"].shape[1:] == (3, 16, 16)
    # The loss recipe: the policy's log-prob of the recorded tokens is the recorded
    # behaviour log-prob (same weights), so the ratio starts at 1.
    with torch.no_grad():
        new = policy.log_prob(batch, batch[schema.ACTION_TOKENS])
    torch.testing.assert_close(new, batch[schema.SAMPLE_LOG_PROB], rtol=1e-4, atol=1e-3)
    flat = steps(td)
    assert flat.batch_size == (int(td["mask"].sum()),)
    assert torch.equal(flat["env_id"], flat["row"])  # rollout rows are envs
    # A selection with no valid step (every mask entry off) gives an empty batch with every
    # key, its instructions an empty column (an empty NonTensorStack could not be set).
    td.set("mask", torch.zeros_like(td["mask"]))
    none = steps(td)
    assert none.batch_size == (0,) and schema.instructions(none) == []
    assert none["observation", "state"].shape[0] == 0
