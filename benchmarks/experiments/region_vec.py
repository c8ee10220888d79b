"""Experiment: are vectorised region_erase and composite kernels (region_vec.cu beside this file)
closer to the copy bandwidth than the library's? On a GPU host: builds them with
torch.utils.cpp_extension, checks them against d3ssl's ops bit for bit (the stage's own ops and
random ones: partly or wholly outside the image, degenerate, none at all; shifts past the image),
then times each against the library's at batch 64, 224 and 112 px, bf16 channels_last, as the
region benchmark does.

  python benchmarks/experiments/region_vec.py [--build-dir DIR]

Exit status 1 if any output differs from the library's. A result worth keeping moves into
csrc/ops/cuda/ and its tests; until then nothing in d3ssl uses these kernels. (Their logic was
checked on the CPU by a Python emulation against the ops' references; they have not run on a GPU.)
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

from benchmarks.common import copy_bandwidth, device_seconds_per_call  # noqa: E402


def build(build_dir):
    from torch.utils import cpp_extension
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):  # left by a build that was killed: load() would wait on it forever
        os.remove(lock)
    t0 = time.perf_counter()
    ext = cpp_extension.load(
        name="region_vec_ext", sources=[os.path.join(HERE, "region_vec.cu")],
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


def random_images(b, c, h, w, dtype, layout, gen):
    x = (torch.randint(0, 255, (b, c, h, w), generator=gen).to(dtype) if dtype == torch.uint8 else
         torch.randn(b, c, h, w, generator=gen).to(dtype))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.to(memory_format=fmt).cuda()


def check(ext):
    from benchmarks.sections.region import make_batch
    from d3ssl.ops.region import composite, region_erase
    bad = 0
    gen = torch.Generator().manual_seed(0)

    def compare(name, a, b):
        nonlocal bad
        if not torch.equal(a, b):
            bad += 1
            print(f"DIFFERS: {name}")

    for dtype in (torch.bfloat16, torch.float32, torch.uint8):
        for layout in ("channels_last", "contiguous"):
            for b, c, h, w in ((64, 3, 224, 224), (16, 3, 112, 112), (5, 3, 8, 16), (3, 4, 6, 10)):
                if (c * h * w) % (16 // torch.empty(0, dtype=dtype).element_size()):
                    continue
                x = random_images(b, c, h, w, dtype, layout, gen)
                bg = random_images(b + 1, c, h, w, dtype, layout, gen)
                fill = 7.0 if dtype == torch.uint8 else 0.5
                for per_image in (0, 3, 40):
                    ops = [t.cuda() for t in random_ops(b, h, w, per_image, gen)]
                    tag = f"{dtype} {layout} {(b, c, h, w)} {per_image} ops per image"
                    compare(f"region_erase {tag}", ext.region_erase_vec(x, *ops, fill), region_erase(x, *ops, fill))
                    shift = torch.stack([torch.randint(-w - 2, w + 3, (b,), generator=gen),
                                         torch.randint(-h - 2, h + 3, (b,), generator=gen)], 1).cuda()
                    bg_index = torch.randint(0, b + 1, (b,), generator=gen).cuda()
                    compare(f"composite {tag}", ext.composite_vec(x, bg, bg_index, shift, *ops),
                            composite(x, bg, bg_index, shift, *ops))
    for size in (224, 112):
        batch = make_batch(64, size, "cuda", torch.bfloat16)
        g = torch.Generator(device="cpu").manual_seed(1)
        ops = [t.cuda() for t in stage_ops(batch, size, g)]
        compare(f"region_erase, the stage's ops at {size}", ext.region_erase_vec(batch.view1, *ops, 0.0),
                region_erase(batch.view1, *ops, 0.0))
        args = composite_args(batch, size, g)
        compare(f"composite, the stage's ops at {size}", ext.composite_vec(*args), composite(*args))
    print("check:", "all outputs identical to d3ssl's ops" if not bad else f"{bad} cases differ")
    return bad


def composite_args(batch, size, gen):
    """The region stage's composite arguments for x3 (shift, background, shifted boxes and PRC holes)."""
    from d3ssl.augment import samplers as S
    v = batch.box_valid
    t = S.sample_shift(batch.boxes2, v, size, gen).shift
    bg_index = S.sample_background(batch.size, gen, batch.device)
    boxes3 = batch.boxes2 + t[:, None, :].repeat(1, 1, 2).float()
    ops = S.concat_ops(S.box_ops(boxes3, v, erase=False), S.sample_prc(boxes3, v, gen, image_size=size).ops())
    return (batch.view2, batch.view2, bg_index, t, *ops.csr())


def timing(ext):
    from benchmarks.sections.region import make_batch
    from d3ssl.ops.region import composite, region_erase
    bandwidth = copy_bandwidth("cuda")
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    for size in (224, 112):
        batch = make_batch(64, size, "cuda", torch.bfloat16)
        g = torch.Generator(device="cpu").manual_seed(2)
        ops = [t.cuda() for t in stage_ops(batch, size, g)]
        cargs = composite_args(batch, size, g)
        x = batch.view1
        held = {}
        fns = {"region_erase library": lambda: held.__setitem__("a", region_erase(x, *ops, 0.0)),
               "region_erase vectorised": lambda: held.__setitem__("b", ext.region_erase_vec(x, *ops, 0.0)),
               "composite library": lambda: held.__setitem__("c", composite(*cargs)),
               "composite vectorised": lambda: held.__setitem__("d", ext.composite_vec(*cargs))}
        # GPU time per call (CUDA events, cold L2), as the copy bandwidth is measured: a wall-time
        # figure of a ~15 us kernel would be mostly launch and synchronisation
        t = {name: device_seconds_per_call(f, "cuda") for name, f in fns.items()}
        nbytes = 2 * x.numel() * x.element_size()  # one read and one write of the batch
        for name, sec in t.items():
            print(f"S={size} {name:<24} {sec * 1e6:8.1f} us per call (GPU)  "
                  f"{nbytes / sec / bandwidth:5.2f} of copy bandwidth")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", default="/tmp/d3ssl-region-vec", help="where the extension is built")
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
