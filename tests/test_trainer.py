"""The trainer end to end on a tiny synthetic set: run folder, schedules, non-finite steps, layout,
SIGKILL + resume, SIGTERM, and the clear errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import DEVICES, ROOT
from tests.test_step import InfGrad
from train import checkpoint as ckpt
from train import run as trainer
from train.step import HostCopy
from train.logging import read_log


def _synthetic(folder):
    from d3ssl.data.synthetic import ensure_synthetic
    return ensure_synthetic(root=str(folder), num_train=16, num_val=8, image_size=(64, 80), workers=1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """16 train / 8 val synthetic images of 64-80 px, with their proposals store."""
    from d3ssl.data.datasets import open_dataset
    from d3ssl.data.proposals import default_store_path, generate_proposals
    root = _synthetic(tmp_path_factory.mktemp("synthetic"))
    dataset = open_dataset(root, "train")
    generate_proposals(dataset, default_store_path(dataset), workers=1, progress=False)
    return root


def tiny_args(data, out, name, *extra):
    return ["--data", data, "--out", str(out), "--name", name,
            "--model.arch", "resnet18", "--view.size", "64", "--model.roi_size", "4",
            "--model.proj_hidden", "32", "--model.pred_hidden", "32", "--model.proj_dim", "16",
            "--data.batch_size", "4", "--data.workers", "0", "--data.proposal_workers", "1",
            "--run.epochs", "1", "--optim.warmup_epochs", "0.5", "--run.log_every", "1",
            "--run.ckpt_every", "2", "--run.progress", "false", "--run.oknn", "false",
            "--run.oknn_image_size", "64", "--run.threads", "1", *extra]


def reference_lr(step, total, warmup, base, final=1e-6, start=0.01):
    """Independent float64 statement of the schedule: linear warm-up, then cosine to `final`."""
    if step < warmup:
        return base * start + (base - base * start) * step / warmup
    t = (step - warmup) / (total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


@pytest.mark.slow
def test_main_job_leaves_complete_run_folder(tmp_path, capsys):
    # A fresh dataset without proposals: the trainer generates them.
    from d3ssl.data.datasets import open_dataset
    from d3ssl.data.proposals import default_store_path
    tiny_data = _synthetic(tmp_path / "data")
    store = default_store_path(open_dataset(tiny_data, "train"))
    assert not os.path.exists(store)
    summary = trainer.main(tiny_args(tiny_data, tmp_path, "job", "--run.oknn", "true",
                                     "--run.oknn_random_draws", "2"))
    assert os.path.isfile(store)
    run = tmp_path / "job"
    assert summary["step"] == 4  # 16 images / batch 4, one epoch
    for name in ("config.json", "log.jsonl", "loss_lr.png", "oknn.json"):
        assert (run / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    assert ckpt.latest_checkpoint(str(run)).endswith("step_00000004.pt")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["arch"] == "resnet18" and cfg["view"]["size"] == 64

    records = read_log(str(run / "log.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    # lr logged for the step that produced record `step` (= step index step-1), per iteration.
    base = cfg["optim"]["lr_per_256"] * 4 / 256
    for r in records:
        assert r["lr"] == pytest.approx(reference_lr(r["step"] - 1, 4, 2, base), rel=1e-9)
        assert {"l_dc", "l_dp", "momentum"} <= set(r)

    oknn = json.loads((run / "oknn.json").read_text())
    for key in ("trained", "random_init"):
        assert 0 <= oknn[key]["top1"] <= oknn[key]["top5"] <= 100
    assert oknn["diff_top1"] == pytest.approx(oknn["trained"]["top1"] - oknn["random_init"]["top1"])
    out = capsys.readouterr().out
    assert "O-KNN top-1: trained" in out and "random init" in out and "difference" in out
    for key in ("trained", "random_init"):
        assert 0 <= oknn[key]["position_share"] <= 1
    assert "explained by the object's position" in out
    # two random initialisations: the run's seed (the trained network's start) and the next one
    draws = oknn["random_draws"]
    assert [d["seed"] for d in draws] == [cfg["run"]["seed"], cfg["run"]["seed"] + 1]
    assert draws[0] == oknn["random_init"]
    top1 = [d["top1"] for d in draws]
    assert oknn["random_top1_mean"] == pytest.approx(sum(top1) / 2)
    assert oknn["random_top1_std"] == pytest.approx(abs(top1[0] - top1[1]) / 2 ** 0.5)
    assert "O-KNN top-1 of 2 random initialisations" in out

    # The checkpoint loads with weights_only and holds everything a resume needs.
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(run)))
    assert state["step"] == 4 and {"queue", "queue_ptr"} <= {k.split(".")[-1] for k in state["model"]}
    assert any(k.startswith("teacher_backbone.") for k in state["model"])
    assert state["optimizer"]["state"] and set(state["rng"]) >= {"torch", "numpy", "python", "region"}

    # Never lose work: the same name again is refused unless resumed.
    with pytest.raises(SystemExit, match="already exists"):
        trainer.main(tiny_args(tiny_data, tmp_path, "job"))


@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one(tiny_data, tmp_path):
    """--compile (torch.compile of the method's forward, inductor on the CPU here): the same losses
    as the eager run, step after step, up to the compiled kernels' rounding."""
    logs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        summary = trainer.main(tiny_args(tiny_data, tmp_path, name, "--run.max_steps", "3", *extra))
        assert summary["step"] == 3
        logs[name] = read_log(str(tmp_path / name / "log.jsonl"))
    assert [r["step"] for r in logs["compiled"]] == [1, 2, 3]
    for eager, compiled in zip(logs["eager"], logs["compiled"]):
        for key in ("loss", "l_dc", "l_dp"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-4), (eager["step"], key)


class _Wrap(torch.nn.Module):
    """Wraps the real method to observe (and poison) calls; test-only."""

    def __init__(self, inner, nan_calls=(), always_nan=False, inf_grad_calls=(), always_inf_grad=False):
        super().__init__()
        self.inner, self.nan_calls, self.always_nan = inner, set(nan_calls), always_nan
        self.inf_grad_calls, self.always_inf_grad = set(inf_grad_calls), always_inf_grad
        self.calls, self.seen = 0, []

    def forward(self, views):
        conv_inputs = []
        hooks = [m.register_forward_pre_hook(lambda m, a: conv_inputs.append(a[0]))
                 for m in self.inner.modules() if isinstance(m, torch.nn.Conv2d)]
        self.seen.append({"queue_ptr": int(self.inner.queue_ptr), "queue": self.inner.queue.clone(),
                          "params": float(sum(p.detach().double().sum() for p in self.inner.parameters()))})
        out = self.inner(views)
        for h in hooks:
            h.remove()
        self.seen[-1]["conv_channels_last"] = all(
            x.is_contiguous(memory_format=torch.channels_last) for x in conv_inputs)
        if self.always_nan or self.calls in self.nan_calls:
            out = {**out, "loss": out["loss"] * float("nan")}
        if self.always_inf_grad or self.calls in self.inf_grad_calls:
            out = {**out, "loss": InfGrad.apply(out["loss"])}   # a finite loss, infinite gradients
        self.calls += 1
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _patch_build(monkeypatch, **kw):
    import d3ssl.model
    made = []
    real = d3ssl.model.build_method

    def build(cfg, max_queue=None):
        m = _Wrap(real(cfg, max_queue), **kw)
        made.append(m)
        return m
    monkeypatch.setattr(d3ssl.model, "build_method", build)
    return made


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_undone(tiny_data, tmp_path, monkeypatch):
    # accum 2 x batch 2: two micro-batches per step, 4 steps per epoch; call 2 (step 1) is poisoned.
    made = _patch_build(monkeypatch, nan_calls={2})
    summary = trainer.main(tiny_args(tiny_data, tmp_path, "nan", "--data.batch_size", "2",
                                     "--optim.accum_steps", "2", "--run.max_steps", "3"))
    w = made[0]
    assert summary["step"] == 3 and summary["skipped"] == 1
    seen = w.seen  # one entry per micro-batch: steps 0,0,1,1,2,2
    # Step 1 (calls 2,3) was skipped: step 2 starts from exactly the state step 1 started from.
    assert seen[4]["params"] == seen[2]["params"]
    assert seen[4]["queue_ptr"] == seen[2]["queue_ptr"]
    assert torch.equal(seen[4]["queue"], seen[2]["queue"])
    # A normal step changes the parameters and fills the queue.
    assert seen[2]["params"] != seen[0]["params"] and seen[2]["queue_ptr"] != seen[0]["queue_ptr"]
    # channels_last end to end: every convolution received a channels_last input.
    assert all(s["conv_channels_last"] for s in seen)
    log = [json.loads(line) for line in open(tmp_path / "nan" / "log.jsonl")]
    assert [r["step"] for r in log if r.get("kind") == "nonfinite"] == [1]
    assert read_log(str(tmp_path / "nan" / "log.jsonl"))[-1]["skipped"] == 1
    # The skipped step is still counted, logged (its loss as it was) and checkpointed on schedule
    # (every 2 steps, and at the end).
    records = read_log(str(tmp_path / "nan" / "log.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3] and math.isnan(records[1]["loss"])
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "nan"))] == [2, 3]
    # The checkpoint after the skip carries the streak, so a resumed run counts on from it.
    streaks = [ckpt.load_checkpoint(path)["stats"]["bad_in_a_row"]
               for _, path in ckpt.list_checkpoints(str(tmp_path / "nan"))]
    assert streaks == [1, 0]


@pytest.mark.slow
def test_run_of_nonfinite_losses_stops_with_clear_message(tiny_data, tmp_path, monkeypatch):
    _patch_build(monkeypatch, always_nan=True)
    with pytest.raises(SystemExit, match=r"3 non-finite losses in a row .*run.max_bad_steps=3"):
        trainer.main(tiny_args(tiny_data, tmp_path, "diverged", "--run.max_bad_steps", "3"))


def _fp16_scaler(monkeypatch):
    """An enabled GradScaler as fp16 runs get, in a float32 run (CPU fp16 convolutions are slow)."""
    monkeypatch.setattr(trainer, "make_scaler", lambda device, dtype: torch.amp.GradScaler(device.type))


@pytest.mark.slow
def test_fp16_overflows_update_nothing_and_are_counted_apart(tiny_data, tmp_path, monkeypatch):
    """GradScaler skips a step whose gradients overflow: the step leaves the student, the teacher
    and the queue as they were, is logged as an overflow with the halved scale, and does not count
    as a non-finite loss."""
    _fp16_scaler(monkeypatch)
    made = _patch_build(monkeypatch, inf_grad_calls={2})
    summary = trainer.main(tiny_args(tiny_data, tmp_path, "fp16", "--run.max_steps", "4"))
    assert summary["step"] == 4 and summary["skipped"] == 0 and summary["overflows"] == 1
    seen = made[0].seen  # one per step (student and teacher parameters, the queue)
    assert seen[3]["params"] == seen[2]["params"] and torch.equal(seen[3]["queue"], seen[2]["queue"])
    assert seen[3]["queue_ptr"] == seen[2]["queue_ptr"]
    assert seen[2]["params"] != seen[1]["params"]  # (the step before it trained)
    log = [json.loads(line) for line in open(tmp_path / "fp16" / "log.jsonl")]
    events = [r for r in log if r.get("kind") in ("overflow", "nonfinite")]
    assert [(r["kind"], r["step"], r["scale"]) for r in events] == [("overflow", 2, 2.0 ** 15)]
    records = read_log(str(tmp_path / "fp16" / "log.jsonl"))
    assert [(r["overflows"], r["loss_scale"]) for r in records] == [
        (0, 2.0 ** 16), (0, 2.0 ** 16), (1, 2.0 ** 15), (1, 2.0 ** 15)]
    stats = [ckpt.load_checkpoint(path)["stats"] for _, path in ckpt.list_checkpoints(str(tmp_path / "fp16"))]
    assert [(s["overflows"], s["overflows_in_a_row"]) for s in stats] == [(0, 0), (1, 0)]


@pytest.mark.slow
def test_a_run_of_fp16_overflows_stops_with_clear_message(tiny_data, tmp_path, monkeypatch):
    _fp16_scaler(monkeypatch)
    monkeypatch.setattr(trainer, "MAX_OVERFLOWS_IN_A_ROW", 3)
    _patch_build(monkeypatch, always_inf_grad=True)
    with pytest.raises(SystemExit, match=r"overflowed 3 steps in a row, down to a loss scale of 8.19e\+03"):
        trainer.main(tiny_args(tiny_data, tmp_path, "overflows", "--run.max_bad_steps", "1"))


def test_fields_the_method_does_not_read_are_named_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        trainer.main(["--preset", "soco", "--region.prc", "false", "--model.temperature", "0.1",
                      "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert ("note: model.method=soco does not read region.prc, model.temperature: they change nothing"
            in capsys.readouterr().err)


def test_the_note_on_ignored_fields_follows_the_resumed_runs_method(tiny_data, tmp_path, capsys):
    args = tiny_args(tiny_data, tmp_path, "s", "--run.max_steps", "1")
    trainer.main(args + ["--preset", "soco"])
    capsys.readouterr()
    trainer.main(args + ["--resume", "auto", "--run.max_steps", "2", "--soco_aug.jitter", "false"])
    assert "does not read" not in capsys.readouterr().err        # the resumed run is SoCo's
    trainer.main(args + ["--resume", "auto", "--run.max_steps", "3", "--region.prc", "false"])
    assert "note: model.method=soco does not read region.prc" in capsys.readouterr().err


def test_a_dataset_whose_val_split_is_its_train_split_trains_without_oknn(tiny_data, tmp_path, capsys):
    """O-KNN cannot use such a dataset (every query would find itself), but training can."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root, symlinks=True)
    os.remove(root / "annotations" / "instances_val.json")
    os.symlink(root / "annotations" / "instances_train.json", root / "annotations" / "instances_val.json")
    summary = trainer.main(tiny_args(str(root), tmp_path, "r", "--run.max_steps", "1", "--run.oknn", "true"))
    assert summary["step"] == 1 and "oknn" not in summary
    assert "O-KNN skipped: the bank split 'train' and the query split 'val' are the same" in capsys.readouterr().out


def test_an_oknn_that_cannot_run_after_training_is_skipped_not_a_crash(tiny_data, tmp_path, monkeypatch, capsys):
    """The training is saved; an O-KNN refusing the data (e.g. a val split without usable objects)
    ends the run with a note instead of a traceback."""
    def refuse(*args, **kw):
        raise ValueError("split 'val' has no usable objects")
    monkeypatch.setattr(trainer, "evaluate_trained_vs_random", refuse)
    summary = trainer.main(tiny_args(tiny_data, tmp_path, "r", "--run.max_steps", "1", "--run.oknn", "true"))
    assert summary["step"] == 1 and "oknn" not in summary
    assert "O-KNN skipped: split 'val' has no usable objects" in capsys.readouterr().out


def test_dali_flag_without_dali_says_how_to_install(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    with pytest.raises(SystemExit, match=r"--dali: .*pip install"):
        trainer.main(tiny_args(tiny_data, tmp_path, "dali", "--dali"))


def test_bad_input_errors(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="--data '/no/such/dir' does not exist"):
        trainer.main(tiny_args("/no/such/dir", tmp_path, "x"))
    with pytest.raises(SystemExit, match="unknown config field 'optim.lrr'"):
        trainer.main(["--set", "optim.lrr=1"])
    with pytest.raises(SystemExit, match=r"--resume '/no/such.pt': no such file or folder \(give `auto`"):
        trainer.main(tiny_args(tiny_data, tmp_path, "y", "--resume", "/no/such.pt"))
    with pytest.raises(SystemExit, match="--proposals .* is a folder"):
        trainer.main(tiny_args(tiny_data, tmp_path, "p", "--proposals", str(tmp_path)))
    for name in ("a/../../escape", ".."):
        with pytest.raises(SystemExit, match=r"--name .*: give a folder name \(no path\)"):
            trainer.main(tiny_args(tiny_data, tmp_path, name))
    assert not (tmp_path.parent / "escape").exists()
    loose = tmp_path / "loose.pt"    # not in a run folder's checkpoints/: where would the run go?
    loose.write_bytes(b"")
    with pytest.raises(SystemExit, match="must sit in a run folder's checkpoints/"):
        trainer.main(tiny_args(tiny_data, tmp_path, "z", "--resume", str(loose)))


def test_gpu_without_the_libraries_cuda_kernels_is_a_clear_error(monkeypatch):
    """A GPU is visible but the library was built CPU-only: stop before any work, saying how to
    rebuild (instead of failing on the first op deep inside a step)."""
    import d3ssl
    from train.config import make_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(d3ssl, "cuda_kernels_available", lambda: False)
    for device in ("auto", "cuda"):
        cfg = make_config("default", {"run.device": device})
        with pytest.raises(trainer.TrainingError, match="built without its CUDA kernels.*--run.device cpu"):
            trainer.setup_distributed(cfg)


# ----------------------------------------------------------------------------- subprocess runs

def _spawn(args, log, **popen):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "train.run", *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, **popen)


def _wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_losses(tiny_data, tmp_path):
    # 16 images, batch 2: 8 steps; a checkpoint every 2 steps.
    args = lambda name: tiny_args(tiny_data, tmp_path, name, "--data.batch_size", "2")  # noqa: E731
    with open(tmp_path / "full.out", "w") as out:
        full = _spawn(args("full"), out)
    with open(tmp_path / "killed.out", "w") as out:
        proc = _spawn(args("killed"), out)
        target = ckpt.checkpoint_path(str(tmp_path / "killed"), 4)
        reached = _wait_for(lambda: os.path.isfile(target), proc)
        assert reached, (tmp_path / "killed.out").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert full.wait(timeout=600) == 0, (tmp_path / "full.out").read_text()
    killed_at = max(s for s, _ in ckpt.list_checkpoints(str(tmp_path / "killed")))
    assert 4 <= killed_at < 8
    with open(tmp_path / "resumed.out", "w") as out:
        resumed = _spawn(args("killed") + ["--resume", "auto"], out)
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.out").read_text()
    assert "resumed from" in (tmp_path / "resumed.out").read_text()

    ref = {r["step"]: r for r in read_log(str(tmp_path / "full" / "log.jsonl"))}
    got = {r["step"]: r for r in read_log(str(tmp_path / "killed" / "log.jsonl"))}
    assert sorted(ref) == sorted(got) == list(range(1, 9))
    # Same seed, same data order and region draws: the resumed run's losses are the uninterrupted
    # run's, before and after the kill.
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-4, abs=1e-5), s
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-12)
    final_ref = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path / "full")))
    final_got = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path / "killed")))
    assert final_ref["step"] == final_got["step"] == 8
    for k, v in final_ref["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(final_got["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)


# The trainer with steps of 2 s spent in one C++ call (where Python runs no signal handler), and
# loader workers that wait 0.5 s for it to say it is stopping.
_SLOW_STEPS = """
import sys, time
import torch
import d3ssl.data.stopping as stopping
import train.step as step
stopping.STOP_WAIT_S = 0.5
a = torch.randn(1536, 1536)
torch.mm(a, a)
t0 = time.perf_counter()
torch.mm(a, a)
n = int(1536 * (2.0 / (time.perf_counter() - t0)) ** (1 / 3))
b = torch.randn(n, n)
call = step.TrainStep.__call__
def slow(self, *args, **kwargs):
    torch.mm(b, b)
    return call(self, *args, **kwargs)
step.TrainStep.__call__ = slow
from train.run import exit_status, main
sys.exit(exit_status(main(sys.argv[1:])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process", "group", "group, steps longer than the workers' wait"])
def test_sigterm_saves_and_exits_cleanly(tiny_data, tmp_path, to):
    """SIGTERM to the training process, or to its whole process group with loader workers in it
    (Slurm's scancel, Ctrl-C): the run saves and exits with 128 + 15, however long its step still
    takes (the workers, signalled too, wait for the training process to shut them down)."""
    log_path = tmp_path / "term" / "log.jsonl"
    workers = "0" if to == "process" else "2"
    args = tiny_args(tiny_data, tmp_path, "term", "--data.batch_size", "2", "--run.epochs", "50",
                     "--run.ckpt_every", "1000", "--data.workers", workers)
    with open(tmp_path / "term.out", "w") as out:
        if to.startswith("group, steps"):
            env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen([sys.executable, "-c", _SLOW_STEPS, *args], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        else:
            proc = _spawn(args, out, start_new_session=True)
        started = _wait_for(lambda: log_path.is_file() and read_log(str(log_path)), proc)
        assert started, (tmp_path / "term.out").read_text()
        if to.startswith("group"):
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        # (saved, then the status of a process that SIGTERM ended, so that a script can tell)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, (tmp_path / "term.out").read_text()
    text = (tmp_path / "term.out").read_text()
    assert "SIGTERM: saved step" in text and "--resume" in text
    last = read_log(str(log_path))[-1]["step"]
    saved = ckpt.list_checkpoints(str(tmp_path / "term"))
    assert saved and saved[-1][0] == last < 400
    events = [json.loads(line) for line in open(log_path)]
    assert events[-1]["kind"] == "stop" and events[-1]["step"] == last


@pytest.mark.parametrize("method", ["d3ssl", "soco"])
def test_trainer_region_stage_gives_the_functions_views(method):
    """The loop's stage (a RegionStage for D3SSL) draws and returns exactly
    what the plain functions do, step after step."""
    from d3ssl.augment.stage import RegionStage, region_stage, soco_stage
    from tests.test_region_stage import make_batch
    cfg = trainer.TrainConfig()
    cfg.model.method = method
    stage = trainer.make_region_stage(cfg)
    assert isinstance(stage, RegionStage) == (method == "d3ssl")
    plain = (lambda b, g: soco_stage(b, g, cfg.soco_aug)) if method == "soco" else \
        (lambda b, g: region_stage(b, g, cfg.region))
    kept = []
    for step in range(4):
        batch = make_batch(seed=step)
        got = stage(batch, torch.Generator().manual_seed(step))
        want = plain(batch, torch.Generator().manual_seed(step))
        for name in want.__dataclass_fields__:
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), (step, name)
        kept.append(got)   # views kept by the caller are never overwritten by later steps
    again = [plain(make_batch(seed=s), torch.Generator().manual_seed(s)) for s in range(4)]
    assert all(torch.equal(k.x1_hat, a.x1_hat) for k, a in zip(kept, again))


def test_host_copy_reads_the_values_at_the_time_it_was_made():
    x = torch.tensor([1.5, float("nan"), 0.0])
    pending = HostCopy(x)
    x.add_(1.0)                                     # later work does not change what is read
    got = pending.get()
    assert got[0] == 1.5 and math.isnan(got[1]) and got[2] == 0.0


@pytest.mark.cuda
def test_host_copy_waits_for_its_copy_and_not_for_later_work():
    """The trainer reads the loss this way while the backward runs: making the copy must not wait
    for the work queued before it, and reading it must wait for that work (its values are the
    ones after it) but not for the work queued after the copy."""
    x = torch.tensor([2.0, -3.0], device="cuda")
    stream = torch.cuda.current_stream()
    # First launches load their kernels (CUDA's lazy loading), and a load waits for the GPU to be
    # idle; the first pinned allocation may too. Both happen here, not in the busy window below.
    x.mul_(1.0), x.add_(0.0), HostCopy(x).get()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_500_000_000)               # ~1 s of GPU cycles before the copy
    x.mul_(10.0)
    pending = HostCopy(x)
    made_while_busy = not stream.query()
    torch.cuda._sleep(1_500_000_000)               # and as much after it
    x.add_(1.0)
    assert pending.get() == [20.0, -30.0]
    read_while_busy = not stream.query()
    torch.cuda.synchronize()
    assert made_while_busy, "HostCopy() waited for the stream"
    assert read_while_busy, "get() waited for the whole stream"
    assert x.tolist() == [21.0, -29.0]


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_never_waits_for_the_gpu(device, monkeypatch):
    """The trainer's step (train/step.py's TrainStep, two micro-batches): on a GPU it issues no
    synchronising operation (reading the loss goes through HostCopy's event, which torch's sync
    debug mode does not count), so the host queues the optimiser step while the backward runs.
    On any device the step trains: the student moves, and the teacher follows it."""
    from d3ssl.model import LARS, param_groups_for_lars
    from tests.test_region_stage import make_batch
    from train.config import make_config
    from train.step import TrainStep
    cfg = make_config("default", {"model.arch": "resnet18", "view.size": 64, "model.roi_size": 4,
                                  "data.batch_size": 4, "model.proj_hidden": 32, "model.pred_hidden": 32,
                                  "model.proj_dim": 16, "run.device": device})
    dev = torch.device(device)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    trainer.configure_backends(cfg, dev)               # cuDNN's autotuner on, as in training
    dtype = trainer.amp_dtype(cfg, dev)
    model = trainer.build_model(cfg, 16, dev, world=1)
    model.train()
    train_step = TrainStep(method=model, forward=model, optimizer=LARS(param_groups_for_lars(model), lr=0.05),
                           scaler=torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16),
                           stage=trainer.make_region_stage(cfg), generator=torch.Generator(device=dev),
                           device=dev, amp_dtype=dtype, accum=2, check_layout=True)
    batch = make_batch(b=4, s=64, seed=3)
    if device == "cuda":
        batch = batch.pin_memory()  # as the loaders hand it over
    fetch = lambda: (5, batch)
    for i in range(2):  # warm: cached constants, the allocator, cuDNN's choices
        train_step(i, fetch, 0.99)
    student = [p.detach().clone() for p in model.online_backbone.parameters()]
    teacher = [p.detach().clone() for p in model.teacher_backbone.parameters()]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        result = train_step(2, fetch, 0.99)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert not result.skipped and not result.any_stop and result.epoch == 5
    assert set(result.terms) == {"loss", "l_dc", "l_dp"} and math.isfinite(result.terms["loss"])
    moved = lambda before, module: any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert moved(student, model.online_backbone)
    assert moved(teacher, model.teacher_backbone)


def test_configure_backends_sets_cudnn_benchmark_for_gpu_runs_only():
    before = torch.backends.cudnn.benchmark
    try:
        cfg = trainer.TrainConfig()
        torch.backends.cudnn.benchmark = False
        trainer.configure_backends(cfg, torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        trainer.configure_backends(cfg, torch.device("cuda"))   # (sets a flag: no GPU needed)
        assert torch.backends.cudnn.benchmark is True
        cfg.run.cudnn_benchmark = False
        trainer.configure_backends(cfg, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_oknn_runs_on_coco_roots_under_either_naming(tmp_path):
    """The end-of-run O-KNN needs train and val ground truth with their images, named as the
    synthetic set does (instances_val.json, val/) or as COCO 2017 does (instances_val2017.json,
    val2017/); anything else skips it (None)."""
    def coco_root(name, splits):
        root = tmp_path / name
        (root / "annotations").mkdir(parents=True)
        for split in splits:
            (root / "annotations" / f"instances_{split}.json").write_text("{}")
            (root / split).mkdir()
        return str(root)

    for splits in (("train", "val"), ("train2017", "val2017")):
        root = coco_root("-".join(splits), splits)
        assert trainer.oknn_root(root) == (root, "")
    root, why = trainer.oknn_root(coco_root("train-only", ("train2017",)))
    assert root is None and "no COCO-format split 'val'" in why
    no_images = coco_root("no-val-images", ("train", "val"))
    os.rmdir(os.path.join(no_images, "val"))
    root, why = trainer.oknn_root(no_images)
    assert root is None and "no image folder" in why
    (tmp_path / "folder").mkdir()
    assert trainer.oknn_root(str(tmp_path / "folder"))[0] is None
    assert trainer.oknn_root(os.path.join(no_images, "annotations", "instances_train.json"))[0] is None


def test_a_run_that_cannot_start_leaves_no_run_folder(tmp_path):
    """Bad data stops the run with a one-line error before the run folder exists, so the same
    command with the data fixed starts, and --resume auto never picks up the failed attempt."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit, match=r"^error: data \(--data, --proposals\): .*no images"):
        trainer.main(["--data", str(empty), "--out", str(tmp_path / "runs"), "--name", "r1"])
    assert not os.path.exists(tmp_path / "runs" / "r1")
    with pytest.raises(SystemExit, match=r"^error: data \(--data, --proposals\): "):
        trainer.main(["--data", str(empty / "notes.txt"), "--out", str(tmp_path / "runs")])
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_resumed_logger_keeps_the_checkpoints_step_in_tensorboard(tmp_path):
    """A run killed after logging steps 1-5 and resumed from its step-3 checkpoint: TensorBoard
    keeps steps 1-3 and drops the interrupted run's 4 and 5 for the resumed run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.logging import RunLogger
    first = RunLogger(str(tmp_path))
    for s in range(1, 6):
        first.log({"step": s, "loss": float(s)})
    first.close()
    resumed = RunLogger(str(tmp_path), start_step=3)
    resumed.log({"step": 4, "loss": 40.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_data, tmp_path, capsys):
    """--resume FILE of an earlier step: the run goes on from there, and the abandoned later
    checkpoints move out of --resume's sight (kept), so `--resume auto` continues this run."""
    args = tiny_args(tiny_data, tmp_path, "r", "--data.batch_size", "2")
    trainer.main(args + ["--run.max_steps", "6"])
    run = tmp_path / "r"
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [2, 4, 6]
    trainer.main(args + ["--resume", ckpt.checkpoint_path(str(run), 2), "--run.max_steps", "3"])
    assert "checkpoints of later steps (4, 6) were moved to" in capsys.readouterr().out
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [2, 3]
    aside = [d for d in os.listdir(run / "checkpoints") if d.startswith("superseded-")]
    assert len(aside) == 1 and sorted(os.listdir(run / "checkpoints" / aside[0])) == [
        "step_00000004.pt", "step_00000006.pt"]
    summary = trainer.main(args + ["--resume", "auto", "--run.max_steps", "4"])
    assert summary["step"] == 4


def test_resuming_with_another_step_size_is_refused_with_the_options_that_keep_it(
        tiny_data, tmp_path, capsys):
    """The learning rate, its schedule and the epochs follow from the images per step: a resume
    that would change that number (here the batch size) stops with a message saying how to keep it;
    one that keeps it (the same batch in two micro-batches) goes on."""
    args = tiny_args(tiny_data, tmp_path, "r", "--data.batch_size", "4")
    trainer.main(args + ["--run.max_steps", "2"])
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path / "r")))
    assert (state["world_size"], state["images_per_step"]) == (1, 4)
    with pytest.raises(SystemExit, match=r"took 4 images per optimiser step \(1 process\(es\)\); this one "
                                         r"would take 2 .*resume with --optim.accum_steps 2"):
        trainer.main(args + ["--data.batch_size", "2", "--resume", "auto", "--run.max_steps", "3"])
    summary = trainer.main(args + ["--data.batch_size", "2", "--optim.accum_steps", "2", "--resume", "auto",
                                   "--run.max_steps", "3"])
    assert summary["step"] == 3 and "warning: resuming" not in capsys.readouterr().err


def test_a_resume_whose_options_change_the_model_stops_with_a_clear_error(tiny_data, tmp_path):
    """A resume whose command line builds another model than the checkpoint's (here a smaller
    projection, so queue and heads) stops with a one-line error naming the changed option, and
    leaves the run's config as it was, so the same resume without that option goes on."""
    args = tiny_args(tiny_data, tmp_path, "r", "--run.max_steps", "2")
    trainer.main(args)
    config = (tmp_path / "r" / "config.json").read_text()
    with pytest.raises(SystemExit, match=r"--resume: the checkpoint .*step_00000002.pt does not fit the model "
                                         r"this command line builds \(size mismatch for queue: .*\)\. Options "
                                         r"changed from the run's config: model.proj_dim 16 -> 8"):
        trainer.main(args + ["--resume", "auto", "--model.proj_dim", "8"])
    assert (tmp_path / "r" / "config.json").read_text() == config
    assert trainer.main(args + ["--resume", "auto", "--run.max_steps", "3"])["step"] == 3


@pytest.mark.parametrize("saved, world, batch, accum, hint", [
    ((8, 512), 4, 64, 1, "--optim.accum_steps 2"),
    ((8, 512), 4, 48, 1, "--data.batch_size 128"),
    ((3, 99), 2, 64, 1, "as many images per step")])
def test_a_resume_on_another_process_count_must_keep_the_step_size(saved, world, batch, accum, hint):
    from train.config import make_config
    cfg = make_config("default", {"data.batch_size": batch, "optim.accum_steps": accum})
    with pytest.raises(trainer.TrainingError, match=f"took {saved[1]} images .* resume with {hint}"):
        trainer.check_resumed_step_size(saved, world, cfg, master=True)


def test_a_resume_on_another_process_count_with_the_same_step_size_warns(capsys):
    from train.config import make_config
    cfg = make_config("default", {"data.batch_size": 64, "optim.accum_steps": 2})
    trainer.check_resumed_step_size((8, 512), 4, cfg, master=True)
    assert "warning: resuming on 4 process(es) a run of 8: the same 512 images per step" in capsys.readouterr().err
    trainer.check_resumed_step_size((4, 512), 4, cfg, master=True)
    trainer.check_resumed_step_size((8, 512), 4, cfg, master=False)   # rank 0 alone says it
    assert capsys.readouterr().err == ""


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_images_stop_the_first_step_with_a_clear_error_and_no_run_folder(
        tiny_data, tmp_path, workers):
    """Every train image unreadable once training starts (the proposals store was made before):
    a one-line error naming the cause, the run folder this command made is gone, and so are the
    loader's workers (which the exception's traceback would otherwise keep until the process's
    exit, where ending them held the exit up and printed their deaths as a traceback)."""
    import multiprocessing
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for image in (data / "train").iterdir():
        image.write_bytes(b"not a jpeg any more")
    with pytest.raises(SystemExit, match=r"^error: data: the loader failed: .*unreadable images in a row"):
        trainer.main(tiny_args(str(data), tmp_path / "runs", "r1", "--data.workers", workers))
    assert not os.path.exists(tmp_path / "runs" / "r1")
    assert multiprocessing.active_children() == []


def test_an_unwritable_out_is_refused_before_the_data_are_prepared(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder would go")
    for out in (blocker, blocker / "runs"):
        with pytest.raises(SystemExit, match=rf"^error: --out: {blocker} is a file, not a folder$"):
            trainer.main(["--data", str(tmp_path / "does-not-matter"), "--out", str(out)])


def test_other_errors_while_fetching_keep_their_type_and_the_run_folder(tiny_data, tmp_path, monkeypatch):
    """Only the loader giving up on the data is a one-line data error: anything else raised while
    fetching (on a GPU, a CUDA fault of earlier kernels surfaces in the batch's copy) propagates as
    it is, and the run folder stays for the post-mortem."""
    real = trainer.make_data_loader

    class FailsAfterOneBatch:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def set_epoch(self, epoch):
            self.loader.set_epoch(epoch)

        def __iter__(self):
            yield next(iter(self.loader))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(trainer, "make_data_loader", lambda *a, **k: FailsAfterOneBatch(real(*a, **k)))
    with pytest.raises(RuntimeError, match="illegal memory access") as raised:
        trainer.main(tiny_args(tiny_data, tmp_path, "r"))
    assert not isinstance(raised.value, trainer.TrainingError)
    assert (tmp_path / "r" / "config.json").is_file()


def test_default_run_names_are_the_time_and_differ_within_a_second():
    import re
    first, second = trainer.new_run_name(), trainer.new_run_name()   # (2^-24 to collide)
    assert first != second and all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", n) for n in (first, second))


def test_oknn_of_a_diverged_network_says_so_and_writes_strict_json(tmp_path, monkeypatch, capsys):
    """Non-finite features give O-KNN NaN: the summary says "not finite" (never "+nan") and why,
    and oknn.json and the log's event hold null, which strict JSON readers take."""
    from types import SimpleNamespace

    import d3ssl.eval.oknn as oknn_module
    from train.config import make_config
    from train.logging import RunLogger
    trained_net = object()
    nan = float("nan")

    def fake_oknn(backbone, root, **kwargs):
        if backbone is trained_net:
            return {"top1": nan, "top5": nan, "bank_size": 4, "num_queries": 3, "position_share": nan}
        return {"top1": 10.0, "top5": 40.0, "bank_size": 4, "num_queries": 3, "position_share": 0.5}

    monkeypatch.setattr(oknn_module, "evaluate_oknn", fake_oknn)
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: SimpleNamespace(online_backbone=object()))
    cfg = make_config("default", {"run.oknn_random_draws": 2})
    logger = RunLogger(str(tmp_path), tensorboard=False)
    trainer.evaluate_trained_vs_random(cfg, SimpleNamespace(online_backbone=trained_net), "data", 8, "cpu",
                                       logger, 5, str(tmp_path))
    logger.close()
    out = capsys.readouterr().out
    assert "nan" not in out.lower(), out
    assert "difference not finite" in out and "training diverged" in out and "trained not finite%" in out
    saved = json.loads((tmp_path / "oknn.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["trained"]["top1"] is None and saved["diff_top5"] is None
    assert saved["random_init"]["top1"] == 10.0 and saved["random_top1_mean"] == 10.0
    event = [json.loads(line, parse_constant=lambda c: pytest.fail(c))
             for line in open(tmp_path / "log.jsonl")][-1]
    assert event["kind"] == "oknn" and event["trained_top1"] is None and event["random_top1"] == 10.0


@pytest.mark.slow
def test_resume_auto_keeps_to_the_method_asked_for(tiny_data, tmp_path, capsys):
    """--resume auto without a name takes the newest run of the method the command line asks for
    (by an option or its --preset), not a newer run of another method; resuming a named run with
    another method stops with that reason, before the step size's check (whose advice would not
    fit), and changes nothing."""
    base = tiny_args(tiny_data, tmp_path, "unused", "--run.max_steps", "1")
    del base[base.index("--name"):base.index("--name") + 2]
    trainer.main(base)                                     # a d3ssl run
    time.sleep(0.05)
    trainer.main(base + ["--preset", "soco"])              # then a SoCo run, the newest
    runs = {trainer._saved_method(str(d)): str(d) for d in tmp_path.iterdir() if (d / "config.json").is_file()}
    assert set(runs) == {"d3ssl", "soco"}
    capsys.readouterr()
    summary = trainer.main(base + ["--model.method", "d3ssl", "--resume", "auto", "--run.max_steps", "2"])
    assert summary["run_dir"] == runs["d3ssl"] and summary["step"] == 2
    assert f"--resume auto: resuming {runs['d3ssl']}, as the newer runs" in capsys.readouterr().err
    summary = trainer.main(base + ["--preset", "soco", "--resume", "auto", "--run.max_steps", "2"])
    assert summary["run_dir"] == runs["soco"] and summary["step"] == 2
    # a preset of D3SSL names its method too, although it is the default one
    summary = trainer.main(base + ["--preset", "no_dp", "--resume", "auto", "--run.max_steps", "3"])
    assert summary["run_dir"] == runs["d3ssl"] and summary["step"] == 3
    config = (tmp_path / os.path.basename(runs["d3ssl"]) / "config.json").read_text()
    named = base + ["--name", os.path.basename(runs["d3ssl"]), "--resume", "auto", "--data.batch_size", "2"]
    with pytest.raises(SystemExit, match=r"--resume: .* is a run of model.method='d3ssl', model.arch='resnet18'; "
                                         r"this command line changes model.method 'd3ssl' -> 'soco' \(an option"):
        trainer.main(named + ["--model.method", "soco"])
    assert (tmp_path / os.path.basename(runs["d3ssl"]) / "config.json").read_text() == config


def test_an_unhandled_ctrl_c_is_one_line_naming_the_newest_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    """A Ctrl-C where the trainer handles none (its setup, the final O-KNN) or a second one (during
    the save): no traceback, status 130, and the checkpoint to resume from."""
    trainer.main(tiny_args(tiny_data, tmp_path, "r", "--run.max_steps", "2"))
    capsys.readouterr()

    def interrupted(cfg, **kwargs):
        trainer._CURRENT["run_dir"] = str(tmp_path / "r")
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(SystemExit) as stop:
        trainer.main(tiny_args(tiny_data, tmp_path, "r", "--resume", "auto"))
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert (f"interrupted: nothing more was saved; the run's newest checkpoint is "
            f"{tmp_path / 'r' / 'checkpoints' / 'step_00000002.pt'}, which `python -m train.run --resume "
            f"{tmp_path / 'r'}` continues") in err
    # an error met after a second Ctrl-C (workers that ended, a save cut short) is that interrupt's
    from d3ssl.data import stopping

    def worker_gone(cfg, **kwargs):
        trainer._CURRENT["run_dir"] = str(tmp_path / "r")
        stopping._interrupts["count"] = 2
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Interrupt.")
    monkeypatch.setattr(trainer, "train", worker_gone)
    with pytest.raises(SystemExit) as stop:
        trainer.main(tiny_args(tiny_data, tmp_path, "r", "--resume", "auto"))
    assert stop.value.code == 130 and "interrupted: nothing more was saved" in capsys.readouterr().err
    stopping.reset_interrupts()
    monkeypatch.setattr(trainer, "train", lambda cfg, **kwargs: 1 / 0)   # without one: as it is
    with pytest.raises(ZeroDivisionError):
        trainer.main(tiny_args(tiny_data, tmp_path, "r", "--resume", "auto"))
    assert trainer.exit_status({"stopped": "SIGINT"}) == 130 and trainer.exit_status({"step": 3}) == 0
    assert trainer.exit_status({"stopped": "SIGTERM (another rank)"}) == 143
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")   # torchrun: a stop is no failure
    assert trainer.exit_status({"stopped": "SIGTERM"}) == 0


def test_a_store_made_while_an_image_was_unreadable_is_named_once_the_image_reads(tiny_data, tmp_path, capsys):
    """Proposals generated while a file was broken give it the whole-image box; once the file is
    fixed the store still has that box, so the trainer says to delete the store."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    image = sorted((data / "train").iterdir())[0]
    good = image.read_bytes()
    image.write_bytes(b"broken for now")
    os.remove(f"{data / 'train'}.proposals")            # (made with the images readable)
    trainer.main(tiny_args(str(data), tmp_path / "runs", "r1", "--run.max_steps", "1"))
    assert "unreadable when" not in capsys.readouterr().err
    image.write_bytes(good)
    trainer.main(tiny_args(str(data), tmp_path / "runs", "r2", "--run.max_steps", "1"))
    store = f"{data / 'train'}.proposals"
    assert (f"warning: '{image.name}' (one of the 1 image(s) that were unreadable when {store} was made) "
            f"reads now, but has the whole-image box there instead of proposals: delete {store}"
            in capsys.readouterr().err)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tiny_data, tmp_path, capsys):
    args = tiny_args(tiny_data, tmp_path, "r", "--run.max_steps", "2")
    trainer.main(args)
    capsys.readouterr()
    assert trainer.main(args + ["--resume", "auto"])["step"] == 2
    assert "note: the run is at its last step already (2: run.epochs 1, run.max_steps 2): nothing to train" in (
        capsys.readouterr().out)


def test_dali_without_a_gpu_says_it_runs_on_the_cpu(tiny_data, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: DALI runs there")
    trainer.main(tiny_args(tiny_data, tmp_path, "d", "--dali", "--run.max_steps", "1"))
    assert "note: --dali without a GPU runs DALI's CPU operators" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.05, 0.3])
def test_a_second_ctrl_c_interrupts_in_one_line(tiny_data, tmp_path, gap):
    """Two SIGINTs to the process group (Ctrl-C twice), close enough to land in one C++ call or in
    the save: status 130 and one line naming the newest checkpoint, never a traceback (the workers
    that the second one ends, or a save cut short, used to surface as RuntimeErrors)."""
    log_path = tmp_path / "twice" / "log.jsonl"
    with open(tmp_path / "twice.out", "w") as out:
        proc = _spawn(tiny_args(tiny_data, tmp_path, "twice", "--data.batch_size", "2", "--run.epochs", "50",
                                "--run.ckpt_every", "3", "--data.workers", "2"), out, start_new_session=True)
        assert _wait_for(lambda: log_path.is_file() and len(read_log(str(log_path))) >= 4, proc), (
            (tmp_path / "twice.out").read_text())
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(gap)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    text = (tmp_path / "twice.out").read_text()
    if rc == 130 and "saved step" in text:   # the first one's save was done before the second came
        return
    assert rc == 130 and "Traceback" not in text, text[-3000:]
    assert "interrupted: nothing more was saved; the run's newest checkpoint is" in text, text[-3000:]
