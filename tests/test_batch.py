"""Batch.to: the views' dtype is converted on the target device, after a plain copy."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_region_stage import make_batch


class _Casts(TorchDispatchMode):
    """Records (input device, output device) of every copy that changes a tensor's dtype."""

    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor) \
                and out.dtype != args[0].dtype:
            self.casts.append((args[0].device.type, out.device.type))
        return out


def test_to_a_dtype_on_the_cpu():
    batch = make_batch(b=3, s=16)
    got = batch.to("cpu", dtype=torch.bfloat16)
    for name in ("view1", "view2", "view2_small"):
        v = getattr(got, name)
        assert v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(v, getattr(batch, name).to(torch.bfloat16))
    assert got.boxes1.dtype == torch.float32 and torch.equal(got.boxes1, batch.boxes1)
    assert torch.equal(got.box_valid, batch.box_valid) and torch.equal(got.image_id, batch.image_id)


def test_dtype_is_converted_on_the_target_device():
    """Moving to another device with a new dtype converts there (the meta device stands in for a
    GPU): never on the CPU before the copy."""
    batch = make_batch(b=2, s=16)
    with _Casts() as mode:
        got = batch.to("meta", dtype=torch.bfloat16, non_blocking=True)
    assert got.view1.device.type == "meta" and got.view1.dtype == torch.bfloat16
    assert got.boxes2.dtype == torch.float32
    assert mode.casts == [("meta", "meta")] * 3, mode.casts


@pytest.mark.cuda
def test_gpu_batch_to_the_cpu_with_a_dtype_reads_arrived_data():
    """A non-blocking copy to the CPU converts on the GPU (or waits): never reads a pending copy."""
    batch = make_batch(b=4, s=64).to("cuda", dtype=torch.bfloat16)
    torch.cuda._sleep(200_000_000)          # keep the stream busy so a pending copy would show
    got = batch.to("cpu", dtype=torch.float32, non_blocking=True)
    torch.cuda.synchronize()
    for name in ("view1", "view2", "view2_small"):
        assert torch.equal(getattr(got, name), getattr(batch, name).float().cpu())


@pytest.mark.cuda
def test_pinned_batch_to_gpu_is_a_pinned_copy_and_the_same_values():
    batch = make_batch(b=4, s=32).pin_memory()
    want = batch.to("cpu", dtype=torch.bfloat16)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:  # (some versions record no copy without CPU)
        got = batch.to("cuda", dtype=torch.bfloat16, non_blocking=True)
        torch.cuda.synchronize()
    for name in ("view1", "view2", "view2_small"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name))
    copies = [e.name for e in prof.events() if "HtoD" in e.name]
    assert copies and not any("Pageable" in n for n in copies), copies
