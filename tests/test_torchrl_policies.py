"""TorchRL's own VLA policies (``torchrl.modules.vla``) as the engine's policy, through
``pipeline.torchrl.TorchRLPolicy``, and TorchRL's losses (``ClipPPOLoss``, ``BCLoss``) training
them on what the engine collects."""

import warnings

import pytest
import torch
from helpers import assert_identical

from pipeline import RolloutEngine, schema
from pipeline.record.views import steps

pytest.importorskip("torchrl")  # the [torchrl] extra; make test installs it
from tensordict.nn import InteractionType, set_interaction_type  # noqa: E402
from torchrl.modules.vla import LeRobotPolicyWrapper, TinyVLA  # noqa: E402

from pipeline.torchrl import TorchRLPolicy  # noqa: E402

CAMERA_TOY = {"task": "reach", "state_dim": 8, "episode_len": 20, "cameras": ("head", "wrist"),
              "image_size": 16}  # fmt: skip
ENGINE = dict(num_envs=8, num_workers=2, seed=3, env_kwargs=CAMERA_TOY, inference_threads=1)


def _vla(head: str = "tokens", seed: int = 0) -> TinyVLA:
    torch.manual_seed(seed)
    return TinyVLA(action_dim=7, chunk_size=4, action_head=head, vocab_size=32)


def _run(policy, **kw) -> list:
    with RolloutEngine("toy", policy, **{**ENGINE, **kw}) as e:
        return [e.rollout(3), e.collect_episodes(3, 4)]


def test_tinyvla_of_torchrl_gives_lock_steps_rollouts_on_every_schedule():
    # Each row samples from its own seed, in batches of a fixed size: a schedule that
    # batches differently (two stages of 4, dynamic batches of any size) changes nothing.
    policy = TorchRLPolicy(_vla(), image="head", wrist_image="wrist")
    ref = _run(policy, mode="sync")
    tokens = ref[1].get(schema.ACTION_TOKENS)[ref[1]["mask"]]
    assert len(tokens) >= 12 and len(tokens.unique(dim=0)) == len(tokens)  # sampled, per row
    for schedule in (dict(num_stages=2), dict(schedule="dynamic", min_batch=1)):
        for a, b in zip(ref, _run(policy, **schedule), strict=True):
            assert_identical(a, b)


def test_the_recorded_tokens_and_log_probs_are_torchrls_own():
    vla = _vla()
    policy = TorchRLPolicy(vla, image="head", wrist_image="wrist")
    with RolloutEngine("toy", policy, **ENGINE) as e:
        eps = e.collect_episodes(2, 4)
        policy.deterministic = True
        greedy = steps(e.collect_episodes(2, 4))
    flat = steps(eps)
    x = policy.to_torchrl(flat)
    assert x.get(("observation", "image")).shape == (len(flat), 3, 16, 16)
    assert torch.equal(x.get(("observation", "wrist_image")), flat.get(schema.image_key("wrist")))
    tokens = flat.get(schema.ACTION_TOKENS)
    with torch.no_grad():
        logp = vla.get_dist(x).log_prob(tokens)  # what ClipPPOLoss recomputes
        torch.testing.assert_close(logp, flat.get(schema.SAMPLE_LOG_PROB), rtol=0, atol=1e-4)
        # the deterministic readout is TorchRL's greedy forward, the actions its tokens decoded
        with set_interaction_type(InteractionType.DETERMINISTIC):
            mine = policy.to_torchrl(greedy)
            theirs = vla(mine).get(("vla_action", "tokens"))
    assert torch.equal(greedy.get(schema.ACTION_TOKENS), theirs)
    torch.testing.assert_close(
        greedy.get(schema.ACTION_CHUNK), policy.tokenizer.decode(theirs), rtol=0, atol=1e-6
    )
    assert policy.to_torchrl(flat) is not flat and (schema.OBSERVATION, "image", "head") in flat


def test_stacked_cameras_and_missing_cameras():
    vla = TinyVLA(action_dim=7, chunk_size=4, action_head="tokens", vocab_size=32)
    stacked = TorchRLPolicy(vla, image=("head", "wrist"))
    with RolloutEngine("toy", stacked, **ENGINE) as e:
        out = e.rollout(2)
    x = stacked.to_torchrl(out[:, 0])
    assert x.get(("observation", "image")).shape == (8, 6, 16, 16)  # channels stacked in order
    with pytest.raises(KeyError, match=r"cameras \['head', 'wrist'\].*'side'"):
        TorchRLPolicy(vla, image="side").to_torchrl(out[:, 0])
    blind = {**CAMERA_TOY, "cameras": ()}
    with pytest.raises(Exception, match="make the env with cameras="):
        with RolloutEngine("toy", TorchRLPolicy(vla), **{**ENGINE, "env_kwargs": blind}) as e:
            e.rollout(1)


def test_torchrls_own_sampler_is_recorded_as_not_reproducible():
    policy = TorchRLPolicy(_vla(), sampling="torchrl")
    assert not policy.reproducible and TorchRLPolicy(_vla()).reproducible
    assert not TorchRLPolicy(_vla(), fixed_batch=None).reproducible  # last bits move
    with RolloutEngine("toy", policy, **ENGINE) as e:
        with pytest.warns(UserWarning, match="not reproducible across schedules"):
            out = e.rollout(2)
        assert e.describe()["policy_reproducible"] is False
        policy.deterministic = True  # argmax: nothing random left
        assert e.describe()["policy_reproducible"] is True
    assert out.get(schema.SAMPLE_LOG_PROB).isfinite().all()


def test_a_continuous_head_and_torchrls_lerobot_wrapper_run_in_the_engine():
    # LeRobot cannot be installed beside torch 2.13 (issue 23): TorchRL's wrapper runs here
    # around a torch module standing in for a LeRobot checkpoint.
    class ChunkNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 4 * 7)

        def predict_action_chunk(self, batch):
            assert batch["observation.images.image"].shape[1:] == (3, 16, 16)
            return torch.tanh(self.net(batch["observation.state"])).view(-1, 4, 7)

    continuous = TorchRLPolicy(_vla("continuous"), image="head")
    lerobot = TorchRLPolicy(LeRobotPolicyWrapper(ChunkNet(), action_dim=7, chunk_size=4))
    for policy in (continuous, lerobot):
        with RolloutEngine("toy", policy, **ENGINE) as e:
            a, b = e.rollout(2), e.rollout(2)
        chunk = a.get(schema.ACTION_CHUNK)
        assert chunk.shape == (8, 2, 4, 7) and chunk.isfinite().all()
        assert schema.SAMPLE_LOG_PROB not in a.keys() and not torch.equal(
            chunk, b[schema.ACTION_CHUNK]
        )


def test_bad_adapters_are_named():
    with pytest.raises(TypeError, match="wraps a VLAWrapperBase, got Linear"):
        TorchRLPolicy(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="continuous head is a regressor"):
        TorchRLPolicy(_vla("continuous"), deterministic=False)
    with pytest.raises(ValueError, match="sampling='greedy'"):
        TorchRLPolicy(_vla(), sampling="greedy")
    with pytest.raises(ValueError, match="fixed_batch=0"):
        TorchRLPolicy(_vla(), fixed_batch=0)
    from torchrl.data.vla import UniformActionTokenizer

    with pytest.raises(ValueError, match="tokenizer has 16 tokens, the policy 32"):
        TorchRLPolicy(_vla(), tokenizer=UniformActionTokenizer(16, low=-1.0, high=1.0))


def test_fixed_batches_make_a_rows_output_independent_of_its_batch():
    policy = TorchRLPolicy(_vla(), deterministic=True)
    with RolloutEngine("toy", policy, **ENGINE) as e:
        batch = e.rollout(1)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = policy(batch)
        alone = [policy(batch[i : i + 1]) for i in range(len(batch))]
    for i, row in enumerate(alone):
        assert torch.equal(
            row.get(schema.SAMPLE_LOG_PROB), whole.get(schema.SAMPLE_LOG_PROB)[i : i + 1]
        )


def test_state_stats_normalise_what_the_policy_reads_and_travel_with_the_weights():
    identity = (torch.zeros(8), torch.ones(8))
    policy = TorchRLPolicy(_vla(), deterministic=True, state_stats=identity)
    with RolloutEngine("toy", policy, **ENGINE) as e:
        batch = e.rollout(1)[:, 0]
        assert torch.equal(policy.to_torchrl(batch).get(schema.STATE), batch.get(schema.STATE))
        mean, std = torch.arange(8.0), torch.full((8,), 2.0)
        trained = TorchRLPolicy(_vla(), deterministic=True, state_stats=(mean, std))
        trained(batch)  # its lazy layers take their shapes
        e.update_weights(trained, version=1)  # the stats are buffers: they go with the weights
        after = e.rollout(1)
        assert torch.equal(e.policy.state_mean, mean) and (after["policy_version"] == 1).all()
    x = trained.to_torchrl(batch)
    assert torch.equal(x.get(schema.STATE), (batch.get(schema.STATE) - mean) / 2)
    with pytest.raises(ValueError, match=r"std > 0, got \[8\] and \[3\]"):
        policy.set_state_stats(mean, torch.ones(3))


def test_a_lazy_policys_first_call_is_not_counted_as_new_weights():
    # TorchRL's TinyVLA creates its weights at its first forward; the engine counts in-place
    # weight changes as new policy versions, and must not count that one.
    policy = TorchRLPolicy(_vla())
    assert any(
        isinstance(p, torch.nn.parameter.UninitializedParameter) for p in policy.parameters()
    )
    with RolloutEngine("toy", policy, **ENGINE) as e:
        first, second = e.rollout(1), e.rollout(1)
        with torch.no_grad():
            policy.vla.head.bias.add_(1.0)
        third = e.rollout(1)
    assert (first["policy_version"] == 0).all() and (second["policy_version"] == 0).all()
    assert (third["policy_version"] == 1).all()


@pytest.mark.slow
def test_torchrl_native_grpo_learns_toy_reach(tmp_path):
    # TorchRL's TinyVLA, warm-started with TorchRL's BCLoss on expert episodes collected
    # through the collector, trained with TorchRL's ClipPPOLoss on what the collector returns,
    # weights handed back with update_policy_weights_. Held-out success on fixed seeds must
    # end above the warm start's (seed 0: 0.24 -> 0.67 here, against ~0.05 of noise).
    from trainer.torchrl_grpo import toy_reach_config, train

    curve = train(toy_reach_config(out=str(tmp_path)), log=lambda m: None)
    before, after = curve["evals"][0]["sampled"], curve["evals"][-1]["sampled"]
    assert after > before, curve["evals"]
    bc = curve["warm_start"]["bc_loss"]
    assert bc[-1] < bc[0] / 2  # BCLoss fitted the demonstrations
    its = curve["iterations"]
    # batch k was collected with version k: update_policy_weights_ reached the rollout copy
    assert [r["behaviour_versions"] for r in its] == [[r["iteration"]] for r in its]
    # ClipPPOLoss's recomputed log-probs of the recorded tokens are the engine's recorded ones
    assert max(r["behaviour_gap"] for r in its if r["steps"]) < 1e-3
    assert (tmp_path / "curve.json").exists() and (tmp_path / "curve.png").exists()
