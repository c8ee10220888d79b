"""The benchmarks' timing helpers that the GPU figures depend on, where they can be checked here."""
import math

import pytest

from benchmarks.common import device_seconds_per_call
from benchmarks.sections.loader_dali import steady_rate


def test_steady_rate_counts_batches_after_the_skipped_ones():
    # batches of 32 arriving at t = 0, 5, 6, 7, 8 s: after the first, 3 batches in 3 s
    assert steady_rate([([0.0, 5.0, 6.0, 7.0, 8.0], 32)], skip=1) == pytest.approx(32.0)
    # the median over epochs; epochs too short, or without elapsed time, are left out
    epochs = [([0, 1, 2, 3], 10), ([0, 1, 3, 5], 10), ([0, 1, 1.5, 2], 10), ([0, 1], 10), ([0, 2, 2, 2], 10)]
    assert steady_rate(epochs, skip=1) == pytest.approx(10.0)
    assert math.isnan(steady_rate([([0, 1], 8)], skip=1))


def test_device_timing_needs_a_gpu():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        device_seconds_per_call(lambda: None, "cpu")


@pytest.mark.parametrize("device,quick,arch,size,roi", [
    ("cuda", False, "resnet50", 224, 14),    # the paper's step: RoIAlign 14x14 on C4 of 224-px views
    ("cuda", True, "resnet18", 112, 6),
    ("cpu", False, "resnet18", 64, 4),
])
def test_train_benchmark_config_sets_roi_size_with_the_views(device, quick, arch, size, roi):
    """The step benchmark must not inherit the main job's RoIAlign size, which fits its own views."""
    import argparse
    from benchmarks.sections.train import _config
    cfg = _config(argparse.Namespace(device=device, quick=quick), "d3ssl")
    assert (cfg.model.arch, cfg.view.size, cfg.model.roi_size) == (arch, size, roi)


def test_handover_row_times_both_handovers_over_whole_epochs(tmp_path):
    """The GPU loader comparison (uint8 handover vs float32 views), run on the CPU: each mode's
    loader must deliver its epochs and give a finite rate."""
    import argparse
    from benchmarks.common import bench_dataset
    from benchmarks.sections.loader import handover_rows
    dataset, store = bench_dataset(8, image_size=(64, 80), cache=str(tmp_path))
    args = argparse.Namespace(device="cpu", quick=True)
    [row] = handover_rows(args, dataset, store, workers=0, batch_size=4)
    assert "uint8 handover" in row.name and row.extra["batch"] == 4
    assert 0 < row.ours < math.inf and 0 < row.anchor < math.inf


@pytest.mark.parametrize("device,quick", [("cuda", False), ("cuda", True)])
def test_train_benchmark_epochs_keep_every_loader_worker_busy(device, quick):
    """A DataLoader worker builds whole batches: the fed step's epochs must hold several batches
    per worker (4 batches of 64 for 8 workers once capped the fed rate near 4 workers' output)."""
    import argparse
    from benchmarks.sections.train import MIN_BATCHES_PER_EPOCH, _config, num_images
    cfg = _config(argparse.Namespace(device=device, quick=quick), "d3ssl")
    batches = num_images(cfg) // cfg.data.batch_size
    assert num_images(cfg) % cfg.data.batch_size == 0
    assert batches >= max(MIN_BATCHES_PER_EPOCH, 4 * cfg.data.workers)
    cfg.data.workers = 16
    assert num_images(cfg) // cfg.data.batch_size >= 64


def test_the_region_anchors_do_the_work_of_the_ops_they_time():
    """Each straightforward version gives the op's own result (a cheaper anchor would inflate the
    ratio): region_erase out of place and in place, and the composite."""
    import torch

    from benchmarks.sections.region import (make_batch, plain_composite, plain_region_erase,
                                            plain_region_erase_)
    from d3ssl.augment import samplers as S
    from d3ssl.ops.region import composite, region_erase
    batch = make_batch(4, 32, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(1)
    valid = batch.box_valid
    ops = S.concat_ops(S.sample_prc(batch.boxes1, valid, gen, image_size=32).ops(),
                       S.sample_prm(batch.boxes1, valid, 32, gen).ops())
    rects, erase, offsets = ops.csr()
    x = batch.view1
    want = region_erase(x, rects, erase, offsets, 0.0)
    assert not torch.equal(want, x)
    assert torch.equal(plain_region_erase(x, rects, erase, offsets, 0.0), want)
    assert torch.equal(plain_region_erase_(x.clone(), rects, erase, offsets, 0.0), want)
    t = S.sample_shift(batch.boxes2, valid, 32, gen).shift
    bg_index = S.sample_background(4, gen, "cpu")
    boxes3 = batch.boxes2 + t[:, None, :].repeat(1, 1, 2).float()
    cops = S.concat_ops(S.box_ops(boxes3, valid, erase=False), S.sample_prc(boxes3, valid, gen, image_size=32).ops())
    args = (x, batch.view2, bg_index, t, *cops.csr())
    assert torch.equal(plain_composite(*args), composite(*args))
