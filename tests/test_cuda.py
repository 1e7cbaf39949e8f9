"""The CUDA path on a real device: registered shared memory, side-stream copies, events.

Every test here needs a CUDA device and is skipped without one; ``python bench.py gpu`` runs
them (``pytest -m cuda``) wherever a GPU exists.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.gpu import overlap_share
from pipeline import schema
from pipeline.policies import TinyVLA
from tests.helpers import TOY, assert_identical, make_engine


def needs_cuda(test):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


def _vla() -> TinyVLA:
    torch.manual_seed(0)
    return TinyVLA(state_dim=TOY["state_dim"], cameras=TOY["cameras"], chunk_len=4).eval().cuda()


@needs_cuda
def test_cuda_rollouts_repeat_bitwise_and_chunks_come_back_to_the_host():
    outs = []
    for _ in range(2):
        with make_engine(_vla()) as e:
            assert e.device.type == "cuda" and e._cuda.registered
            outs.append(e.rollout(4))
    assert_identical(*outs)
    chunk = outs[0][schema.ACTION_CHUNK]
    assert chunk.device.type == "cpu" and torch.isfinite(chunk).all()


@needs_cuda
def test_cuda_policy_inputs_equal_the_hosts():
    """What the policy reads on the device is what the workers wrote: the copy on the side
    stream is complete before inference reads it (the compute stream waits on its event)."""
    seen: list = []

    class Spy(torch.nn.Module):
        chunk_len = 4

        def __init__(self) -> None:
            super().__init__()
            self.inner = _vla()

        def forward(self, td):
            assert td[schema.STATE].is_cuda
            # A copy: the host side of a batch is a view of shared memory, reused next turn.
            seen.append(td.select(schema.STATE, schema.image_key("cam")).to("cpu").clone())
            return self.inner(td)

    with make_engine(Spy(), num_stages=1) as e:
        td = e.rollout(3)
    states = td[schema.STATE]  # [envs, T, ...] as recorded from shared memory
    images = td[schema.image_key("cam")]
    assert len(seen) == 3
    for t, batch in enumerate(seen):
        torch.testing.assert_close(batch[schema.STATE], states[:, t], rtol=0, atol=0)
        torch.testing.assert_close(batch[schema.image_key("cam")], images[:, t], rtol=0, atol=0)


@needs_cuda
def test_cuda_profile_times_copies_and_inference_from_events():
    with make_engine(_vla()) as e:
        e.rollout(2)
        with e.profile() as prof:
            e.rollout(6)
    report = prof.report()
    s = report.summary
    assert s["gpu_source"].startswith("CUDA events")
    assert {"h2d", "inference"} <= set(report.device_kinds)
    assert 0 < s["gpu_utilization"] <= 1


def test_gpu_bench_stops_at_once_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench.py gpu would run in full")
    done = subprocess.run(
        [sys.executable, "bench.py", "gpu"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr and "nothing was run" in done.stderr


def test_copy_overlap_is_the_share_of_copy_time_under_inference():
    # Copies [0,10) and [20,30); inference [5,25): half of each copy ran under it.
    iv = np.array([[0, 10], [5, 25], [20, 30]], np.int64)
    assert overlap_share(iv, ["h2d", "inference", "h2d"], "h2d", "inference") == 0.5
    assert overlap_share(iv, ["h2d", "h2d", "h2d"], "h2d", "inference") is None
