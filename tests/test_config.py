"""EngineConfig: every option checked at once, with the option named, before any worker starts."""

import os

import pytest
import torch
from helpers import latency_policy, make_engine

from pipeline import EngineConfig, RolloutEngine


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divide"):
        make_engine(latency_policy(), num_envs=7)
    with pytest.raises(ValueError, match="every stage"):
        make_engine(latency_policy(), num_envs=4, num_stages=4, num_workers=2)
    with pytest.raises(ValueError, match="exec_len"):
        make_engine(latency_policy(), exec_len=5)
    with pytest.raises(ValueError, match="mode"):
        make_engine(latency_policy(), mode="async")
    with pytest.raises(ValueError, match="policy's parameters are on cpu"):
        make_engine(latency_policy(), device="meta")
    with pytest.raises(ValueError, match="inference_threads"):
        make_engine(latency_policy(), inference_threads=0)


def test_auto_inference_threads_leave_the_workers_their_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    threads = lambda value, workers, device: EngineConfig(
        num_envs=16, num_workers=workers, inference_threads=value
    ).threads_for(torch.device(device))
    assert threads("auto", 2, "cpu") == 6
    assert threads("auto", 8, "cpu") == 1  # never fewer than one
    assert threads("auto", 2, "cuda") == 1  # the host only launches
    assert threads(None, 2, "cpu") is None
    with pytest.raises(ValueError, match="inference_threads=0"):
        threads(0, 2, "cpu")


def test_config_is_frozen_reusable_and_overridable():
    cfg = EngineConfig(num_envs=8, num_workers=2, schedule="dynamic", max_batch=4)
    with pytest.raises(AttributeError):
        cfg.num_envs = 4  # frozen
    assert EngineConfig.build(cfg, {"max_batch": 2}).max_batch == 2
    assert EngineConfig.build(cfg, {}) is cfg
    assert cfg.stage_count == 8 and cfg.batching().max_batch == 4  # dynamic: a stage per env
    assert EngineConfig(num_envs=8, record_obs="state").record_obs == ("state",)
    with pytest.raises(TypeError, match=r"unknown engine options \['num_env'\]"):
        EngineConfig.build(None, {"num_env": 8})
    with pytest.raises(TypeError, match="num_envs"):
        RolloutEngine("toy", latency_policy())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_envs=0), "num_envs=0 must be an int >= 1"),
        (dict(num_envs=4, num_workers=5), "num_workers=5 > num_envs=4"),
        (dict(num_envs=4, hang_timeout_s=0), "hang_timeout_s=0 must be > 0"),
        (dict(num_envs=4, max_restarts=-1), "max_restarts=-1"),
        (dict(num_envs=4, on_worker_failure="retry"), "on_worker_failure='retry'"),
        (dict(num_envs=4, chunk_len=4, exec_len=5), "exec_len=5"),
        (dict(num_envs=4, lookahead="soon"), "int >= 0 or 'auto'"),
        (dict(num_envs=4, max_staleness=-2), "max_staleness=-2"),
    ],
)
def test_each_bad_option_is_named_by_the_config_alone(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)
