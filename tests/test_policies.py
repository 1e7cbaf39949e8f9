"""Reference policies: shapes and dtypes, exact log-probs, batch invariance, latency model."""

import time

import numpy as np
import pytest
import torch

import envs
from pipeline import schema
from pipeline.policies import ExpertPolicy, LatencyPolicy, TinyVLA
from pipeline.policies.layers import (
    BatchInvariant,
    RowConv2d,
    RowGroupNorm,
    SpatialSoftmax,
    batched_kernels,
)
from pipeline.policies.sampling import row_normal, row_uniform


def _batch(name="tabletop/pick-place", n=4, cameras=("head",), seeds=None, size=64, resets=None):
    """``n`` first observations (reset seeds ``resets``, default 0..n-1) with sample seeds."""
    env = envs.make(name, cameras=cameras, image_size=size)
    obs, instr = [], []
    for s in range(n) if resets is None else resets:
        o, _ = env.reset(seed=s)
        obs.append(o)
        instr.append(env.instruction)
    seeds = list(range(100, 100 + n)) if seeds is None else seeds
    return env, schema.make_batch(obs, instr, sample_seeds=seeds)


@pytest.mark.parametrize("head", ["tokens", "flow"])
def test_tinyvla_output_shapes(head):
    env, td = _batch()
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(env.spec, head=head, chunk_len=6, flow_steps=3).eval()
    out = policy(td.clone())
    chunk = out[schema.ACTION_CHUNK]
    assert chunk.shape == (4, 6, 7) and chunk.dtype == torch.float32
    assert torch.isfinite(chunk).all() and chunk.abs().max() <= 1.0
    if head == "tokens":
        tokens = out[schema.ACTION_TOKENS]
        assert tokens.shape == (4, 6, 7) and tokens.dtype == torch.long
        assert tokens.min() >= 0 and tokens.max() < 256
        assert out[schema.SAMPLE_LOG_PROB].shape == (4,)
        # Chunk values are the bin centres of the tokens.
        torch.testing.assert_close(chunk, torch.linspace(-1, 1, 256)[tokens])
    else:
        assert schema.ACTION_TOKENS not in out.keys(include_nested=True)


def test_log_prob_is_exact():
    env, td = _batch(n=3)
    torch.manual_seed(1)
    policy = TinyVLA.from_spec(env.spec, head="tokens", chunk_len=5, temperature=1.6).eval()
    out = policy(td.clone())
    with torch.no_grad():
        logits = policy.action_logits(td.clone())
    ref = torch.log_softmax(logits / 1.6, -1).gather(-1, out[schema.ACTION_TOKENS].unsqueeze(-1))
    torch.testing.assert_close(out[schema.SAMPLE_LOG_PROB], ref.squeeze(-1).sum((1, 2)))
    with torch.no_grad():
        again = policy.log_prob(td.clone(), out[schema.ACTION_TOKENS])
    torch.testing.assert_close(again, out[schema.SAMPLE_LOG_PROB])


def test_sampling_depends_on_seed_and_temperature():
    env, td = _batch(n=2, seeds=[5, 5])
    torch.manual_seed(2)
    policy = TinyVLA.from_spec(env.spec, chunk_len=8).eval()
    a = policy(td.clone())[schema.ACTION_TOKENS]
    td2 = td.clone()
    td2[schema.SAMPLE_SEED] = torch.tensor([6, 7])
    b = policy(td2)[schema.ACTION_TOKENS]
    assert not torch.equal(a, b)
    policy.deterministic = True
    c = policy(td.clone())[schema.ACTION_TOKENS]
    d = policy(td2.clone())[schema.ACTION_TOKENS]
    assert torch.equal(c, d)  # argmax ignores the seeds


def test_row_noise_is_a_function_of_each_row_seed_alone():
    seeds = torch.tensor([3, 4, 3, 2**62])
    z = row_normal(seeds, (8, 7))
    assert z.shape == (4, 8, 7) and z.dtype == torch.float32
    assert torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])
    assert torch.equal(row_normal(seeds[1:2], (8, 7))[0], z[1])  # batch composition is irrelevant
    u = row_uniform(seeds, (8, 7))
    assert not torch.equal(u[0], u[1]) and ((u >= 0) & (u < 1)).all()
    many = row_normal(torch.arange(4000), (7,))  # a sanity check on the distribution
    assert abs(many.mean().item()) < 0.02 and abs(many.std().item() - 1) < 0.02
    assert abs(row_uniform(torch.arange(4000), (7,)).mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("head", ["tokens", "flow"])
def test_batch_invariance(head):
    """A row's action does not change when the other rows of the batch change."""
    env, td = _batch(n=4, seeds=[10, 11, 12, 13])
    _, other = _batch("tabletop/pick-place", n=4, seeds=[20, 21, 22, 23], resets=[30, 31, 32, 33])
    assert not torch.equal(other[schema.STATE], td[schema.STATE])  # other scenes, other texts
    torch.manual_seed(3)
    policy = TinyVLA.from_spec(env.spec, head=head, chunk_len=4, flow_steps=2).eval()
    mixed = other.clone()
    mixed[2] = td[2]  # row 2 identical, every other row different
    out_a = policy(td.clone())
    out_b = policy(mixed)
    torch.testing.assert_close(
        out_a[schema.ACTION_CHUNK][2], out_b[schema.ACTION_CHUNK][2], rtol=0, atol=1e-5
    )
    if head == "tokens":
        assert torch.equal(out_a[schema.ACTION_TOKENS][2], out_b[schema.ACTION_TOKENS][2])
    # The row on its own (batch of one) samples the same tokens.
    single = policy(td[2:3].clone())
    torch.testing.assert_close(
        single[schema.ACTION_CHUNK][0], out_a[schema.ACTION_CHUNK][2], rtol=0, atol=1e-4
    )


def test_stochastic_policy_requires_seeds():
    env, td = _batch(n=2)
    del td[schema.SAMPLE_SEED]
    with pytest.raises(ValueError, match="sample_seed"):
        TinyVLA.from_spec(env.spec)(td)


def test_tinyvla_rejects_mismatched_inputs():
    env, td = _batch(n=2, cameras=("head", "wrist"))
    policy = TinyVLA(state_dim=27, cameras=("head",))
    with pytest.raises(ValueError, match="cameras"):
        policy(td)


def test_row_conv_is_torchs_conv_and_batch_invariant():
    torch.manual_seed(4)
    conv = RowConv2d(3, 8, 5, stride=2, padding=2)
    ref = torch.nn.Conv2d(3, 8, 5, stride=2, padding=2)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(5, 3, 17, 16)
    y = conv(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert y.shape == (5, 8, 9, 8)
    assert torch.equal(conv(x[2:3])[0], y[2])  # a row alone: the same bits
    with pytest.raises(NotImplementedError, match="groups"):
        RowConv2d(4, 4, 3, groups=2)(torch.zeros(1, 4, 8, 8))
    # Its GroupNorm companion: torch's numbers, a row's bits the same alone as in a batch.
    norm = RowGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    z = norm(y)
    want = torch.nn.functional.group_norm(y, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(norm(y[2:3])[0], z[2])


def test_spatial_softmax_finds_each_channels_peak():
    features = torch.zeros(2, 3, 9, 17)
    peaks = [(0, 0), (4, 8), (8, 16)]  # (row, column): the corners and the centre
    for k, (r, c) in enumerate(peaks):
        features[:, k, r, c] = 50.0  # sharp enough for the expectation to sit on the peak
    kp = SpatialSoftmax()(features)
    want = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])  # (x, y) in [-1, 1]
    torch.testing.assert_close(kp, want.expand(2, -1, -1), rtol=0, atol=1e-4)
    uniform = SpatialSoftmax()(torch.zeros(1, 1, 4, 6))
    torch.testing.assert_close(uniform, torch.zeros(1, 1, 2), rtol=0, atol=1e-6)


def test_keypoint_vision_reads_where_things_are():
    """The keypoint tower's tokens change with an object's position, and a pick-place
    policy built on it runs; an unknown vision tower is named."""
    env, td = _batch(n=2, resets=[0, 1])
    torch.manual_seed(5)
    policy = TinyVLA.from_spec(env.spec, chunk_len=4, vision="keypoints").eval()
    out = policy(td.clone())
    assert out[schema.ACTION_CHUNK].shape == (2, 4, 7)
    with torch.no_grad():
        image = td[schema.image_key("head")].float() / 255
        kp = policy.keypoints(policy.stem(image))
    assert kp.shape == (2, 32, 2) and kp.abs().max() <= 1
    assert not torch.equal(kp[0], kp[1])  # two scenes, two sets of keypoints
    with pytest.raises(ValueError, match="vision='cnn'"):
        TinyVLA(state_dim=27, vision="cnn")


def test_film_vision_starts_as_a_conv_net_and_listens_to_the_instruction():
    """The FiLM tower's maps start at zero (the instruction does not change the image
    tokens yet); once they are not, two instructions give two sets of tokens for one image."""
    env, td = _batch(n=2, resets=[0, 0])
    torch.manual_seed(5)
    policy = TinyVLA.from_spec(env.spec, chunk_len=4, vision="film").eval()
    assert policy(td.clone())[schema.ACTION_CHUNK].shape == (2, 4, 7)
    image = td[schema.image_key("head")].float() / 255
    texts = torch.randn(2, policy.cfg.dim)
    with torch.no_grad():
        tokens = policy.tower(image, texts)
        assert tokens.shape == (2, 1 + 64, policy.cfg.dim)
        torch.testing.assert_close(tokens[0], tokens[1], rtol=0, atol=0)
        for film in policy.tower.films:
            torch.nn.init.normal_(film.weight, std=0.1)
        tokens = policy.tower(image, texts)
    assert not torch.allclose(tokens[0], tokens[1])


@pytest.mark.parametrize("vision", ["patches", "keypoints", "film"])
def test_batched_kernels_compute_the_same_policy_for_training(vision):
    """Inside ``batched_kernels`` every batch-invariant layer uses torch's batched kernels:
    the same log-probs to about 1e-4 and gradients that train alike; after the block (an
    exception included) the layers compute row by row again, and another copy of the policy
    is never switched."""
    import copy

    env, td = _batch(n=3, resets=[0, 1, 2])
    torch.manual_seed(6)
    policy = TinyVLA.from_spec(env.spec, chunk_len=4, vision=vision).eval()
    other = copy.deepcopy(policy)
    tokens = policy(td.clone())[schema.ACTION_TOKENS]
    rows = policy.token_log_probs(td, tokens)
    rows.sum().backward()
    grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    layers = [m for m in policy.modules() if isinstance(m, BatchInvariant)]
    assert len(layers) >= 5
    with batched_kernels(policy):
        assert not any(m.batch_invariant for m in layers)
        assert all(m.batch_invariant for m in other.modules() if isinstance(m, BatchInvariant))
        batched = policy.token_log_probs(td, tokens)
        batched.sum().backward()
    torch.testing.assert_close(batched, rows, rtol=0, atol=1e-3)
    for g, p in zip(grads, [p for p in policy.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-2, atol=1e-3)
    assert all(m.batch_invariant for m in layers)
    with pytest.raises(RuntimeError, match="inside"), batched_kernels(policy):
        raise RuntimeError("inside")
    assert all(m.batch_invariant for m in layers)
    # Row by row again: a row alone has the same bits as in its batch.
    with torch.no_grad():
        assert torch.equal(policy.token_log_probs(td[1:2], tokens[1:2])[0], rows[1].detach())


def test_sizes():
    tiny = TinyVLA(state_dim=27, size="tiny")
    n = sum(p.numel() for p in tiny.parameters())
    assert 1e6 <= n <= 2e6
    with torch.device("meta"):
        base = TinyVLA(state_dim=27, size="base")
    nb = sum(p.numel() for p in base.parameters())
    assert 90e6 <= nb <= 120e6


def test_latency_policy_output_and_determinism():
    env, td = _batch("toy", n=3, cameras=())
    p = LatencyPolicy(state_dim=env.spec.state_dim, chunk_len=4, base_ms=1, per_item_ms=1)
    a = p(td.clone())[schema.ACTION_CHUNK]
    b = p(td.clone())[schema.ACTION_CHUNK]
    assert a.shape == (3, 4, 7) and torch.equal(a, b)
    assert len(p.device_intervals) == 2
    start, end = p.device_intervals[-1]
    assert end - start >= 4e6  # modelled 1 + 3 x 1 ms


def test_simulated_device_runs_inference_and_training_one_at_a_time():
    import copy
    import threading

    from pipeline.policies.latency import SimulatedDevice

    env, td = _batch("toy", n=2, cameras=())
    p = LatencyPolicy(state_dim=env.spec.state_dim, chunk_len=4, base_ms=30, train_base_ms=30)
    rollout = copy.deepcopy(p)
    assert rollout.device_sim is p.device_sim  # a copy stays on the same device

    def infer():
        for _ in range(3):
            rollout(td.clone())

    thread = threading.Thread(target=infer)
    thread.start()
    for _ in range(3):
        p.train_step(batch_size=8)
    thread.join()
    spans = sorted([*rollout.device_intervals, *p.train_intervals])
    assert len(spans) == 6
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    assert all(end - start >= 30e6 for start, end in spans)
    rollout.device_sim = SimulatedDevice()  # a second GPU: no longer shared
    assert rollout.device_sim is not p.device_sim


def test_latency_policy_timing_model():
    """Benchmark-style check: median measured latency tracks base + per_item * B."""
    env, td = _batch("toy", n=8, cameras=())
    p = LatencyPolicy(state_dim=env.spec.state_dim, chunk_len=4, base_ms=20, per_item_ms=5)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        p(td.clone())
        samples.append(time.perf_counter() - t0)
    model = p.latency_s(8)
    assert model == pytest.approx(0.060)
    # Sleeping never returns early; a loaded machine may add delay, so the bound above is loose.
    assert np.median(samples) >= model
    assert np.median(samples) < model * 3


def test_expert_policy_chunks_solve_pick_place():
    env = envs.make("tabletop/pick-place", cameras=())
    policy = ExpertPolicy("tabletop/pick-place", chunk_len=4)
    wins = 0
    for seed in range(10):
        obs, _ = env.reset(seed=seed)
        for _ in range(env.spec.max_steps):
            td = schema.make_batch([obs], [env.instruction])
            chunk = policy(td)[schema.ACTION_CHUNK][0].numpy()
            obs, _, term, trunc, _, info = env.step_chunk(chunk)
            if term or trunc:
                break
        wins += info["success"]
    assert wins >= 8, f"open-loop chunks of 4 succeeded on {wins}/10"
