"""Experiment: is a vectorised region_erase kernel (region_erase_vec.cu beside this file) closer to the
copy bandwidth than the library's? On a GPU host: builds it with torch.utils.cpp_extension, checks
it against d3ssl's region_erase bit for bit (the stage's own PRC+PRM ops and random ones: partly or
wholly outside the image, degenerate, none at all), then times both at batch 64, 224 and 112 px,
bf16 channels_last, as the region benchmark does.

  python benchmarks/experiments/region_erase_vec.py [--build-dir DIR]

Exit status 1 if any output differs from the library's. A result worth keeping moves into
csrc/ops/cuda/region_erase.cu and its tests; until then nothing in d3ssl uses this kernel.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import copy_bandwidth, interleaved  # noqa: E402


def build(build_dir):
    from torch.utils import cpp_extension
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):  # left by a build that was killed: load() would wait on it forever
        os.remove(lock)
    t0 = time.perf_counter()
    ext = cpp_extension.load(
        name="region_erase_vec_ext", sources=[os.path.join(HERE, "region_erase_vec.cu")],
        extra_include_paths=[os.path.join(ROOT, "csrc")], build_directory=build_dir,
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], verbose=False)
    print(f"built in {time.perf_counter() - t0:.0f} s")
    return ext


def random_ops(b, h, w, per_image, gen):
    """CSR ops with rectangles partly or wholly outside, non-integer, degenerate; some images none."""
    counts = torch.randint(0, per_image + 1, (b,), generator=gen)
    counts[0] = 0
    r = int(counts.sum())
    xy = torch.rand(r, 2, generator=gen) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    wh = torch.rand(r, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
    wh[::7] = 0.0
    rects = torch.cat([xy, xy + wh], 1).float()
    erase = torch.rand(r, generator=gen) < 0.7
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return rects, erase, offsets


def stage_ops(batch, size, gen):
    """The region stage's PRC + PRM ops for view 1 (what training erases)."""
    from d3ssl.augment import samplers as S
    v = batch.box_valid
    ops = S.concat_ops(S.sample_prc(batch.boxes1, v, gen, (0.2, 0.5), 0.5, size).ops(),
                       S.sample_prm(batch.boxes1, v, size, gen).ops())
    return ops.csr()


def check(ext):
    from benchmarks.sections.region import make_batch
    from d3ssl.ops.region import region_erase
    bad = 0
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32, torch.uint8):
        for layout in ("channels_last", "contiguous"):
            for b, c, h, w in ((64, 3, 224, 224), (16, 3, 112, 112), (5, 3, 8, 16), (3, 4, 6, 10)):
                x = (torch.randint(0, 255, (b, c, h, w), generator=gen).to(dtype) if dtype == torch.uint8 else
                     torch.randn(b, c, h, w, generator=gen).to(dtype))
                x = x.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
                x = x.cuda()
                if (c * h * w) % (16 // x.element_size()):
                    continue
                for per_image in (0, 3, 40):
                    ops = [t.cuda() for t in random_ops(b, h, w, per_image, gen)]
                    fill = 7.0 if dtype == torch.uint8 else 0.5
                    same = torch.equal(ext.region_erase_vec(x, *ops, fill), region_erase(x, *ops, fill))
                    bad += not same
                    if not same:
                        print(f"DIFFERS: {dtype} {layout} {(b, c, h, w)} {per_image} ops per image")
    for size in (224, 112):
        batch = make_batch(64, size, "cuda", torch.bfloat16)
        ops = [t.cuda() for t in stage_ops(batch, size, torch.Generator(device="cpu").manual_seed(1))]
        same = torch.equal(ext.region_erase_vec(batch.view1, *ops, 0.0), region_erase(batch.view1, *ops, 0.0))
        bad += not same
        if not same:
            print(f"DIFFERS: the stage's ops at {size}")
    print("check:", "all outputs identical to d3ssl's region_erase" if not bad else f"{bad} cases differ")
    return bad


def timing(ext):
    from benchmarks.sections.region import make_batch
    from d3ssl.ops.region import region_erase
    bandwidth = copy_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    for size in (224, 112):
        batch = make_batch(64, size, "cuda", torch.bfloat16)
        ops = [t.cuda() for t in stage_ops(batch, size, torch.Generator(device="cpu").manual_seed(2))]
        x = batch.view1
        held = {}

        def ours():
            held["a"] = region_erase(x, *ops, 0.0)

        def vec():
            held["b"] = ext.region_erase_vec(x, *ops, 0.0)
        t = interleaved({"library": ours, "vectorised": vec}, device="cuda", rounds=5, warmup=5, min_time=0.3)
        nbytes = 2 * x.numel() * x.element_size()
        for name, sec in t.items():
            print(f"S={size} {name:<10} {sec * 1e6:8.1f} us per call  {nbytes / sec / bandwidth:5.2f} of copy bandwidth")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", default="/tmp/d3ssl-region-erase-vec", help="where the extension is built")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("region_erase_vec: needs a GPU (the experiment times CUDA kernels)")
    import d3ssl
    if not d3ssl.cuda_kernels_available():
        sys.exit("region_erase_vec: d3ssl was built without its CUDA kernels; build it first")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    ext = build(args.build_dir)
    bad = check(ext)
    timing(ext)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
