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
                          "--rows", "60"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # (all of the stage's ~45 operations are listed: region_erase is usually first, but on a loaded
    # machine it has fallen out of the first five)
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


def _run_quick(what):
    """`breakdown.py --device cpu --quick --what WHAT`'s standard output (it must succeed)."""
    out = subprocess.run([sys.executable, "benchmarks/breakdown.py", "--device", "cpu", "--quick", "--what", what],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_breakdown_times_the_dali_graph_stage_by_stage():
    from d3ssl.data.dali import GRAPH_STAGES, dali_available
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed (pip install -e .[dali])")
    text = _run_quick("dali")
    rows = {}
    for line in text.splitlines():
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[2].replace(".", "").isdigit() and parts[1].isdigit():
            rows[parts[0].strip()] = (float(parts[1]), float(parts[2]))
    assert list(rows) == [*GRAPH_STAGES, "loader (Batch)", "loader + region stage"], text
    for rate, ms in rows.values():   # images/s and ms per batch of 16 agree with each other
        assert rate > 0 and abs(rate * ms / 1e3 - 16) < 0.5


def test_breakdown_times_a_loader_worker_by_phase():
    text = _run_quick("worker")
    ms = {}
    for line in text.splitlines():
        parts = line.rsplit(None, 1)
        if line.startswith("  ") and len(parts) == 2 and parts[1].replace(".", "").isdigit():
            ms[parts[0].strip()] = float(parts[1])
    assert set(ms) == {"read the file", "decode", "views and colour", "collate, float32", "collate, uint8"}, ms
    assert all(v >= 0 for v in ms.values()) and ms["decode"] > 0 and ms["views and colour"] > 0
    # the uint8 handover skips the normalisation: a collate that costs less than the float32 one
    assert ms["collate, uint8"] < ms["collate, float32"]
    assert "handing over uint8 pixels" in text


def test_breakdown_counts_the_paper_steps_operations():
    """`--what ops`: ResNet-50-C4's step, its operations per phase as on a GPU (multi-tensor LARS:
    a few dozen operations for ~160 parameters, not a dozen per parameter)."""
    text = _run_quick("ops")
    line = next(line for line in text.splitlines() if "operations per step at torch's dispatcher" in line)
    phases = dict((name, int(n)) for name, n in
                  (part.rsplit(" ", 1) for part in line.rsplit("(", 1)[1].rstrip(")").split(", ")))
    assert phases["forward"] > 500 and phases["backward"] > 300   # ResNet-50: ~53 convolutions
    assert 0 < phases["optimiser"] < 60
    assert sum(phases.values()) == int(line.split("): ")[1].split(" (")[0])
    assert "    forward: " in text and "convolution" in text
