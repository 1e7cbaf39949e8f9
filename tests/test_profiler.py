"""The profiler reports the truth on a workload whose truth is known (toy + LatencyPolicy)."""

import json

import numpy as np
import pytest
from factories import failing_env
from helpers import BACKENDS, TOY, backend_args, latency_policy, make_engine

from pipeline import EngineError, EnvError, RolloutEngine
from pipeline.policies import LatencyPolicy
from pipeline.runtime.spans import PHASE_ID, PHASES, PhaseClock, SpanRing, union_ns

BUSY_TOY = dict(state_dim=8, step_cost_us=1500, episode_len=400)


def _profile(**backend):
    policy = LatencyPolicy(state_dim=8, chunk_len=4, base_ms=4.0, per_item_ms=1.0)
    kw = dict(num_envs=8, num_workers=2, num_stages=2, env_kwargs=BUSY_TOY, **backend)
    with RolloutEngine("toy", policy, **kw) as e:
        e.rollout(2)
        with e.profile() as prof:
            e.rollout(12)
        report = prof.report()
    return policy, report


@pytest.fixture(scope="module", params=BACKENDS)
def profiled(request):
    return _profile(**backend_args(request))


def test_simulated_gpu_busy_matches_the_model(profiled):
    policy, report = profiled
    s = report.summary
    assert "simulated" in s["gpu_source"]
    # The report's device intervals are exactly the policy's record inside the window:
    # 12 rounds x 2 stages, each at least the modelled 4 + 1 x 4 ms (a sleep never ends early).
    recorded = np.array(policy.device_intervals, np.int64)
    inside = recorded[(recorded[:, 1] > report.t0) & (recorded[:, 0] < report.t1)]
    np.testing.assert_array_equal(report.device_intervals, inside)
    assert len(inside) == 12 * 2
    assert ((inside[:, 1] - inside[:, 0]) >= int(policy.latency_s(4) * 1e9)).all()
    # One loop makes the calls, so the intervals never overlap: busy time is their sum.
    assert (inside[1:, 0] >= inside[:-1, 1]).all()
    clipped = np.clip(inside, report.t0, report.t1)
    busy = int((clipped[:, 1] - clipped[:, 0]).sum())
    assert busy == union_ns(inside, report.t0, report.t1)
    assert s["gpu_utilization"] == busy / (report.t1 - report.t0)


# thread_time_ns and perf_counter_ns tick separately: allow one scheduler tick per span.
_TICK_NS = 4_000_000


def test_worker_spans_add_up_and_cpu_never_exceeds_wall(profiled):
    _, report = profiled
    for p in report.processes:
        spans = p.spans
        inside = spans[(spans["t1"] > report.t0) & (spans["t0"] < report.t1)]
        # Each phase's wall time is the sum of its (clipped) spans, and the phases tile the
        # window: a process is in exactly one phase at a time.
        lo = np.clip(inside["t0"], report.t0, report.t1)
        hi = np.clip(inside["t1"], report.t0, report.t1)
        assert (hi >= lo).all()
        assert p.attributed_ns == int((hi - lo).sum())
        assert (inside["t0"][1:] >= inside["t1"][:-1]).all(), p.name  # no overlaps
        assert (inside["cpu"] <= inside["t1"] - inside["t0"] + _TICK_NS).all(), p.name
        for name, ph in p.phases.items():
            spans_of = int((inside["phase"] == PHASE_ID[name]).sum()) if name in PHASE_ID else 0
            assert ph["cpu_ns"] <= ph["wall_ns"] + _TICK_NS * spans_of, (p.name, name)
    for p in report.processes[1:]:  # "worker 1", or "node 1 worker 1" on Ray
        physics = report.phase(p.name, "physics")
        assert physics["wall_s"] > 0 and physics["cpu_s"] > 0  # real work was recorded


def test_every_process_is_covered(profiled):
    _, report = profiled
    assert len(report.processes) == 3
    for p in report.processes:
        assert p.coverage >= 0.95, (p.name, p.coverage)
    assert report.summary["min_coverage"] >= 0.95


def test_outputs_are_valid(profiled, tmp_path):
    _, report = profiled
    paths = report.save(str(tmp_path))
    trace = json.load(open(paths["trace"]))
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {p.name for p in report.processes} <= names  # "worker 1" or "node 1 worker 1"
    assert any(n.startswith("GPU") for n in names)
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all({"name", "pid", "tid", "ts", "dur"} <= set(e) for e in spans)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    timed = [e["ts"] for e in events if e["ph"] != "M"]
    assert timed == sorted(timed)
    assert {e["pid"] for e in spans} >= {p.pid for p in report.processes}
    assert any(e["ph"] == "C" for e in events)  # utilisation counters
    assert {e["name"] for e in spans} <= set(PHASES) | {"busy"}
    summary = json.load(open(paths["summary"]))
    assert summary["summary"]["decisions"] == 12 * 8
    html = open(paths["html"]).read()
    assert "data:image/png;base64," in html and "worker 0" in html
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_profile_from_creation_includes_env_init(backend):
    policy = LatencyPolicy(state_dim=8, chunk_len=4)
    kw = dict(num_envs=4, num_workers=2, num_stages=2, env_kwargs=BUSY_TOY, profile=True, **backend)
    with RolloutEngine("toy", policy, **kw) as e:
        e.rollout(3)
        with pytest.raises(EngineError, match="already running"):
            with e.profile():
                pass
        report = e.profile_report()
    # Spans the workers actually recorded at creation (one per env, then the hand-shake),
    # not time inferred at the window's edges.
    for w in (0, 1):
        spans = report.processes[w + 1].spans
        recorded = spans[spans["phase"] == PHASE_ID["env_init"]]
        # Inferred edges carry no CPU time; creating each of the worker's 2 envs does.
        assert (recorded["cpu"] > 0).sum() == 2, recorded
        phase = report.processes[w + 1].phases["env_init"]
        assert phase["wall_ns"] > phase["inferred_ns"]
    assert report.summary["decisions"] == 12


def test_phase_clock_tiles_time():
    ring = SpanRing.local(capacity=8)
    clock = PhaseClock(ring)
    for phase in ("wait_obs", "inference", "dispatch", "wait_obs"):
        clock.switch(phase)
    clock.switch("physics", ("render", 0, 0))
    clock.stop()
    spans = ring.spans()
    assert len(spans) == 6
    assert (spans["t0"][1:] == spans["t1"][:-1]).all()  # no gaps
    for _ in range(10):
        ring.add(0, 1, 2, 0)
    assert ring.dropped == 8 and len(ring.spans()) == 8


def test_union_of_intervals():
    iv = np.array([[0, 10], [5, 15], [20, 30], [29, 31]])
    assert union_ns(iv, 0, 100) == 15 + 11
    assert union_ns(iv, 8, 25) == 7 + 5
    assert union_ns(np.zeros((0, 2), np.int64), 0, 10) == 0


def test_profiles_scripts(profiled, tmp_path):
    import subprocess
    import sys

    _, report = profiled
    run = tmp_path / "run"
    paths = report.save(str(run))
    root = __file__.rsplit("/tests/", 1)[0]
    for script in ("record.py", "dump.py", "render.py"):
        out = subprocess.run(
            [sys.executable, f"{root}/profiles/{script}", "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage" in out.stdout.lower(), script
    rendered = subprocess.run(
        [
            sys.executable,
            f"{root}/profiles/render.py",
            paths["trace"],
            "--out",
            str(tmp_path / "re"),
        ],
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "worker 0" in rendered.stdout and "coverage 100.0%" in rendered.stdout
    assert (tmp_path / "re" / "timeline.png").exists()
    compared = subprocess.run(
        [sys.executable, f"{root}/profiles/render.py", paths["trace"], paths["summary"]],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stderr
    assert "decisions/s" in compared.stdout and "worker 0 / physics" in compared.stdout


def test_nested_profile_is_refused_and_the_outer_one_survives():
    with make_engine(latency_policy(), num_envs=4) as e:
        with e.profile() as prof:
            assert e.profiler is prof
            with pytest.raises(EngineError, match="already running"):
                with e.profile():
                    pass
            e.rollout(2)
        assert e.profiler is None
        report = prof.report()
    assert report.summary["decisions"] == 2 * 4
    assert len(report.processes) == 3


def test_engine_error_inside_profile_surfaces_as_itself():
    e = make_engine(
        latency_policy(),
        env=failing_env,
        num_envs=4,
        env_kwargs=dict(TOY, episode_len=50),
        on_worker_failure="raise",
    )
    with pytest.raises(EnvError, match="the gripper fell off"):
        with e.profile() as prof:
            e.rollout(10)
    assert e.closed
    assert not prof.running and prof.report().summary["window_s"] > 0
