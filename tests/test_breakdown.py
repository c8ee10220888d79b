"""benchmarks/breakdown.py runs end to end on the CPU (--quick) and reports every part it names."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_breakdown_reports_the_stage_and_the_steps_phases():
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "benchmarks/breakdown.py", "--device", "cpu", "--quick", "--steps", "1",
                          "--rows", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "== region stage, B=8 S=64" in text and "d3ssl::region_erase" in text
    for feed in ("fed by the CPU loader", "batch on the device (ceiling)"):
        assert f"{feed}, on cpu:" in text
    from train.step import PHASES
    for phase in PHASES:
        assert f"  {phase} " in text, phase
    assert "wait for the loader" in text  # only the loader-fed steps wait for it
    # operations per phase, once per feed: the optimiser's and the forward's among them
    counts = [line for line in text.splitlines() if "operations per step at torch's dispatcher" in line]
    assert len(counts) == 2 and all("forward " in c and "optimiser " in c for c in counts), counts


def test_breakdown_rejects_unknown_parts():
    out = subprocess.run([sys.executable, "benchmarks/breakdown.py", "--what", "stage,nope"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown part(s) nope" in out.stderr


def test_breakdown_times_the_dali_graph_stage_by_stage():
    from d3ssl.data.dali import GRAPH_STAGES, dali_available
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed (pip install -e .[dali])")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "benchmarks/breakdown.py", "--device", "cpu", "--quick", "--what", "dali"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[2].replace(".", "").isdigit() and parts[1].isdigit():
            rows[parts[0].strip()] = (float(parts[1]), float(parts[2]))
    assert list(rows) == [*GRAPH_STAGES, "loader (Batch)", "loader + region stage"], out.stdout
    for rate, ms in rows.values():   # images/s and ms per batch of 16 agree with each other
        assert rate > 0 and abs(rate * ms / 1e3 - 16) < 0.5
