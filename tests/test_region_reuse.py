"""The out= variants of region_erase and composite, RegionStage, and the CPU ops' cache of freed
large outputs (what lets a loop of region stages reuse memory)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from d3ssl.augment.stage import RegionStage, region_stage
from d3ssl.data.batch import Batch
from d3ssl.ops.region import (composite, composite_reference, region_erase,
                              region_erase_reference)
from tests.conftest import DEVICES, ROOT
from tests.test_region_ops import DTYPES, _composite_args, _images, _ops


def _garbage(like):
    """A buffer like `like` full of a value no result contains, so an unwritten element shows."""
    out = torch.empty_like(like)
    out.fill_(77 if like.dtype == torch.uint8 else float("nan"))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_region_erase_out_matches_reference(device, dtype, layout):
    x = _images(3, 3, 9, 11, dtype, device, layout)
    rects, erase, offsets = (t.to(device) for t in _ops(3, 9, 11, [5, 0, 7]))
    out = _garbage(x)
    got = region_erase(x, rects, erase, offsets, 3.0, out=out)
    assert got is out
    assert torch.equal(out.cpu(), region_erase_reference(x, rects, erase, offsets, 3.0).cpu())
    assert torch.equal(out, region_erase(x, rects, erase, offsets, 3.0))  # = the fresh-output path


@pytest.mark.parametrize("device", DEVICES)
def test_region_erase_out_is_images(device):
    x = _images(2, 3, 8, 8, torch.float32, device, "channels_last")
    rects, erase, offsets = (t.to(device) for t in _ops(2, 8, 8, [4, 3]))
    ref = region_erase_reference(x, rects, erase, offsets, 0.5)
    assert region_erase(x, rects, erase, offsets, 0.5, out=x) is x
    assert torch.equal(x.cpu(), ref.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_composite_out_matches_reference(device, dtype, layout):
    args = _composite_args(device, dtype, layout)
    out = _garbage(args[0])
    assert composite(*args, out=out) is out
    assert torch.equal(out.cpu(), composite_reference(*args).cpu())
    assert torch.equal(out, composite(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_batch_paths(layout, dtype):
    """Outputs of more than 32 MiB take the huge-page and streaming-store paths (16-byte vectors of
    4, 8 or 16 elements); a row of 517 elements starts at every alignment, so the unaligned heads
    and tails are exercised."""
    size = torch.tensor([], dtype=dtype).element_size()
    b, h, w = 11, 512 * 4 // size, 517
    x = _images(b, 3, h, w, dtype, "cpu", layout, seed=5)
    assert x.numel() * size > 32 << 20
    fill = 7.0 if dtype == torch.uint8 else -1.0
    rects, erase, offsets = _ops(b, h, w, [3, 0, 5, 2, 4, 1, 6, 2, 3, 1, 4], seed=6)
    ref = region_erase_reference(x, rects, erase, offsets, fill)
    assert torch.equal(region_erase(x, rects, erase, offsets, fill), ref)
    assert torch.equal(region_erase(x, rects, erase, offsets, fill, out=_garbage(x)), ref)
    inplace = x.clone()
    torch.ops.d3ssl.region_erase_(inplace, rects, erase, offsets, fill)
    assert torch.equal(inplace, ref)
    bg_index = torch.tensor([3, 0, 1, 7, 2, 6, 5, 4, 8, 10, 9])
    shift = torch.tensor([[5, -3], [-40, 2], [0, 0], [600, 0], [1, 1], [-2, 9], [7, -7], [0, 3],
                          [-1, -1], [3, 0], [0, -300]])
    cargs = (x, x, bg_index, shift, rects, ~erase, offsets)
    ref = composite_reference(*cargs)
    assert torch.equal(composite(*cargs), ref)
    assert torch.equal(composite(*cargs, out=_garbage(x)), ref)


def test_out_not_aligned_to_its_element_size():
    """An out= tensor whose storage is not aligned to its element size (from a byte buffer at an
    odd offset) takes the non-streaming path, even at a size that would stream."""
    b, h, w = 2, 1111, 1023
    x = _images(b, 3, h, w, torch.float32, "cpu", "contiguous", seed=8)
    assert x.numel() * 4 > 24 << 20
    rects, erase, offsets = _ops(b, h, w, [5, 3], seed=9)
    buf = bytearray(x.numel() * 4 + 4)
    out = torch.frombuffer(buf, dtype=torch.float32, offset=1, count=x.numel()).view(x.shape)
    assert out.data_ptr() % 4 == 1
    region_erase(x, rects, erase, offsets, -1.0, out=out)
    assert torch.equal(out, region_erase_reference(x, rects, erase, offsets, -1.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_many_ops_per_image(layout):
    """Hundreds of overlapping rectangles per image (every row a band boundary; the last op
    covering a pixel decides), against the references."""
    b, h, w = 3, 40, 37
    x = _images(b, 3, h, w, torch.float32, "cpu", layout, seed=10)
    rects, erase, offsets = _ops(b, h, w, [300, 0, 150], seed=11)
    assert torch.equal(region_erase(x, rects, erase, offsets, 5.0),
                       region_erase_reference(x, rects, erase, offsets, 5.0))
    cargs = (x, x.flip(0), torch.tensor([1, 2, 0]), torch.tensor([[3, -2], [0, 0], [-5, 7]]),
             rects, erase, offsets)
    assert torch.equal(composite(*cargs), composite_reference(*cargs))


def test_bad_out():
    x = _images(2, 3, 6, 7, torch.float32, "cpu", "channels_last")
    rects, erase, offsets = _ops(2, 6, 7, [3, 2])
    cases = [
        (torch.empty(2, 3, 6, 8).to(memory_format=torch.channels_last), "shape"),
        (torch.empty_like(x, dtype=torch.float16), "dtype"),
        (torch.empty_like(x, memory_format=torch.contiguous_format), "memory format"),
        (torch.empty(2, 3, 6, 14).to(memory_format=torch.channels_last)[..., :7], "dense"),
    ]
    for out, match in cases:
        with pytest.raises(RuntimeError, match=match):
            region_erase(x, rects, erase, offsets, 0.0, out=out)
    # out overlapping the input without being it
    big = torch.zeros(3, 6, 7, 3).permute(0, 3, 1, 2)  # channels_last [3,3,6,7]
    with pytest.raises(RuntimeError, match="share no memory"):
        region_erase(big[:2], rects, erase, offsets, 0.0, out=big[1:])
    args = _composite_args("cpu", torch.float32, "contiguous", b=2, nbg=3)
    with pytest.raises(RuntimeError, match="shape"):
        composite(*args, out=torch.empty(3, 3, 12, 14))
    with pytest.raises(RuntimeError, match="share no memory"):
        composite(*args, out=args[0])
    with pytest.raises(RuntimeError, match="share no memory"):
        composite(*args, out=args[1][:2])
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device"):
            region_erase(x, rects, erase, offsets, 0.0, out=torch.empty_like(x, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_out(device):
    x = _images(2, 3, 6, 7, torch.float32, device, "channels_last")
    rects, erase, offsets = (t.to(device) for t in _ops(2, 6, 7, [3, 2]))
    torch.library.opcheck(torch.ops.d3ssl.region_erase_out.default,
                          (x, rects, erase, offsets, 0.5, torch.empty_like(x)))
    args = _composite_args(device, torch.float32, "contiguous", b=2, nbg=3)
    torch.library.opcheck(torch.ops.d3ssl.composite_out.default, (*args, torch.empty_like(args[0])))


def test_torch_compile_out():
    x = _images(2, 3, 6, 7, torch.float32, "cpu", "channels_last")
    rects, erase, offsets = _ops(2, 6, 7, [3, 2])
    cargs = _composite_args("cpu", torch.float32, "contiguous", b=2, nbg=3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, rects, erase, offsets, cargs, out1, out2):
        torch.ops.d3ssl.region_erase_out(x * 2, rects, erase, offsets, 0.0, out1)
        torch.ops.d3ssl.composite_out(*cargs, out2)
        return out1 + 1

    out1, out2 = torch.empty_like(x), torch.empty_like(cargs[0])
    y = f(x, rects, erase, offsets, cargs, out1, out2)
    ref = region_erase_reference(x * 2, rects, erase, offsets, 0.0)
    assert torch.equal(out1, ref) and torch.equal(y, ref + 1)
    assert torch.equal(out2, composite_reference(*cargs))


# --- RegionStage ---

def _batch(b=4, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 3
    wh = s * (0.2 + 0.5 * torch.rand(b, k, 2, generator=g))
    xy = torch.rand(b, k, 2, generator=g) * (s - wh)
    boxes = torch.cat([xy, xy + wh], -1)
    views = [torch.randn(b, 3, n, n, generator=g) for n in (s, s, s // 2)]
    valid = torch.ones(b, k, dtype=torch.bool)
    return Batch(*views, boxes, boxes.flip(0), valid, torch.arange(b)).to("cpu", dtype=torch.float32)


NAMES = ("x1_hat", "x2s_hat", "x3", "boxes_x1_hat", "boxes_x2s_hat", "boxes_x3", "boxes_x1",
         "boxes_x2")


def _same(a, b):
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in NAMES)


def test_region_stage_object_matches_function_and_reuses_freed_outputs():
    """RegionStage(cfg) is region_stage(..., cfg); a loop that rebinds its views gets outputs from
    the ops' cache of freed outputs (views of 320 px: every output is 1 MiB or more), so two sets
    of memory alternate and, once the last views are dropped, their blocks are back in the cache."""
    stats = torch.ops.d3ssl._output_cache_stats
    if stats()[2] < 64 << 20:  # off, or so small that returning these outputs evicts others
        pytest.skip("the output cache is off or bounded below 64 MiB (D3SSL_OUTPUT_CACHE_MB)")
    batch, stage = _batch(4, 320), RegionStage()
    assert batch.view2_small.numel() * 4 >= 1 << 20
    ptrs = set()
    views = None
    for step in range(5):  # a training loop's pattern: `views` is rebound after the call
        views = stage(batch, torch.Generator().manual_seed(step))
        assert _same(views, region_stage(batch, torch.Generator().manual_seed(step)))
        ptrs |= {views.x1_hat.data_ptr(), views.x2s_hat.data_ptr(), views.x3.data_ptr()}
        assert views.x1_hat.is_contiguous(memory_format=torch.channels_last)
    assert len(ptrs) <= 6  # two sets of three: reused, never the one still bound
    held = stats()[0]
    del views
    assert stats()[0] == held + 3  # x1_hat, x2s_hat and x3 went back to the cache


def test_region_stage_object_with_a_subset_of_boxes_in_x3():
    from d3ssl.augment.stage import RegionConfig
    batch, cfg = _batch(seed=3), RegionConfig(dp_boxes=1)
    stage = RegionStage(cfg)
    for step in range(3):
        views = stage(batch, torch.Generator().manual_seed(step))
        want = region_stage(batch, torch.Generator().manual_seed(step), cfg)
        assert _same(views, want) and torch.equal(views.valid_x3, want.valid_x3)
        assert torch.equal(views.valid_x3.sum(1), torch.ones(4, dtype=torch.long))


def test_region_stage_never_overwrites_what_the_caller_holds():
    batch, stage = _batch(4, 320), RegionStage()   # outputs large enough for the ops' cache
    kept = [stage(batch, torch.Generator().manual_seed(s)) for s in range(4)]  # all held
    copies = [{n: getattr(v, n).clone() for n in ("x1_hat", "x2s_hat", "x3")} for v in kept]
    view_only = stage(batch, torch.Generator().manual_seed(10)).x1_hat[:, :1]  # a view survives
    view_copy = view_only.clone()
    for s in range(3):
        stage(batch, torch.Generator().manual_seed(20 + s))
    for v, c in zip(kept, copies):
        assert all(torch.equal(getattr(v, n), c[n]) for n in c)
    assert torch.equal(view_only, view_copy)


def test_region_stage_output_saved_by_autograd_is_not_reused():
    batch, stage = _batch(4, 320), RegionStage()
    conv = torch.nn.Conv2d(3, 2, 3)
    views = stage(batch, torch.Generator().manual_seed(0))
    x1_hat = views.x1_hat.clone()
    loss = conv(views.x1_hat).square().sum()  # the graph saves x1_hat for the weight gradient
    del views
    stage(batch, torch.Generator().manual_seed(1))
    stage(batch, torch.Generator().manual_seed(2))
    loss.backward()
    grad = conv.weight.grad.clone()
    conv.weight.grad = None
    conv(x1_hat).square().sum().backward()
    assert torch.equal(grad, conv.weight.grad)


def test_region_stage_new_shapes():
    stage = RegionStage()
    for b, s in [(4, 32), (2, 32), (4, 48), (4, 32)]:
        batch = _batch(b, s, seed=b + s)
        views = stage(batch, torch.Generator().manual_seed(3))
        assert _same(views, region_stage(batch, torch.Generator().manual_seed(3)))


_CACHE_SCRIPT = """
import torch, d3ssl
from d3ssl.ops.region import composite, region_erase, region_erase_reference
from tests.test_region_ops import _ops
stats = torch.ops.d3ssl._output_cache_stats
g = torch.Generator().manual_seed(0)
# 38.5 MB per batch: above the cache's 1 MiB threshold
x = torch.randn(64, 3, 224, 224, generator=g).contiguous(memory_format=torch.channels_last)
rects, erase, offsets = _ops(64, 224, 224, [3] * 64)
want = region_erase_reference(x[:2], rects[:6], erase[:6], offsets[:3], 1.0)
bytes_ = x.numel() * 4
out = region_erase(x, rects, erase, offsets, 1.0)
assert stats()[:2] == [0, 0], stats()
del out
held = stats()
out = region_erase(x, rects, erase, offsets, 1.0)           # takes the freed block, if cached
again = region_erase(x, rects, erase, offsets, 1.0)          # the first is alive: a new block
assert again.data_ptr() != out.data_ptr()
for o in (out, again):
    assert o.is_contiguous(memory_format=torch.channels_last) and o.shape == x.shape
    assert torch.equal(o[:2], want)
comp = composite(x, x, torch.arange(64).roll(1), torch.zeros(64, 2, dtype=torch.long), rects, erase, offsets)
assert comp.is_contiguous(memory_format=torch.channels_last)
del o, out, again, comp
import json
print(json.dumps([held, stats(), bytes_]))
"""


def _cache_run(env_mb):
    """Runs _CACHE_SCRIPT in a fresh process (the bound is read once per process) with
    D3SSL_OUTPUT_CACHE_MB=env_mb (None: unset); returns [stats after the first output was freed,
    stats at the end, bytes of one output]."""
    env = dict(os.environ)
    env.pop("D3SSL_OUTPUT_CACHE_MB", None)
    if env_mb is not None:
        env["D3SSL_OUTPUT_CACHE_MB"] = str(env_mb)
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_large_outputs_are_reused_and_live_ones_never():
    """A large CPU output, once freed, is kept and handed to the next output of its size (no page
    faults for a loop over same-sized batches); an output still alive is never reused, and every
    output is written whole."""
    held, after, nbytes = _cache_run(None)
    assert held[:2] == [1, nbytes]                  # the freed output's block was kept
    assert held[2] == 512 << 20                     # the default bound
    assert after[:2] == [3, 3 * nbytes]             # x1, again and composite's blocks, all freed


def test_output_cache_bound_and_off():
    held, after, nbytes = _cache_run(40)            # room for one 38.5 MB block
    assert held[:2] == [1, nbytes] and after[:2] == [1, nbytes]
    held, after, _ = _cache_run(0)                  # off: plain allocations
    assert held == [0, 0, 0] and after == [0, 0, 0]
