"""A Python emulation, vector by vector, of region_vec.cu's composite kernel (each element's pixel,
the window-clipped mask, the background vector, the shifted foreground read as the two aligned
vectors around it and funnel-shifted into place), compared with d3ssl's composite reference on the
CPU. It checks the kernel's logic where no GPU is at hand; it does not run the kernel.

  python benchmarks/experiments/region_vec_emulation.py     (exit status 1 on a difference)
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from d3ssl.ops.region import composite_reference  # noqa: E402


def pixel_span(a, b, n):
    """region.h's pixel rule: pixels [lo, hi) whose centre lies in [a, b), clipped to [0, n)."""
    lo = min(max(math.ceil(float(a) - 0.5), 0), n)
    hi = min(max(math.ceil(float(b) - 0.5), 0), n)
    return lo, max(hi, lo)


def funnel_bytes(lo, hi, nbytes):
    """bytes_from(lo, hi, nbytes): four funnel shifts of little-endian 32-bit words."""
    u = [int.from_bytes((lo + hi)[4 * k:4 * k + 4], "little") for k in range(8)]
    q, r = nbytes >> 2, (nbytes & 3) * 8
    o = [(((u[k + q + 1] << 32) | u[k + q]) >> r) & 0xFFFFFFFF for k in range(4)]
    return b"".join(x.to_bytes(4, "little") for x in o)


def emulate(fg, bg, bg_index, shift, rects, erase, offsets):
    b_, c_, h_, w_ = fg.shape
    nhwc = fg.is_contiguous(memory_format=torch.channels_last) and not fg.is_contiguous()
    es = fg.element_size()
    per = 16 // es

    def raw(t):  # each image's bytes in memory order
        t = t.permute(0, 2, 3, 1) if nhwc else t
        return t.contiguous().view(torch.uint8).reshape(t.shape[0], -1).numpy()

    f_raw, g_raw = raw(fg), raw(bg)
    vecs = c_ * h_ * w_ // per
    out = np.zeros_like(f_raw)
    for b in range(b_):
        src = int(bg_index[b])
        dx = max(-w_, min(w_, int(shift[b, 0])))
        dy = max(-h_, min(h_, int(shift[b, 1])))
        x_lo, y_lo = min(max(dx, 0), w_), min(max(dy, 0), h_)
        x_hi, y_hi = max(min(w_ + dx, w_), x_lo), max(min(h_ + dy, h_), y_lo)
        moved = (dy * w_ + dx) * (c_ if nhwc else 1)
        spans = []
        for r in range(int(offsets[b]), int(offsets[b + 1])):
            xa, xb = pixel_span(rects[r, 0], rects[r, 2], w_)
            ya, yb = pixel_span(rects[r, 1], rects[r, 3], h_)
            spans.append((max(xa, x_lo), min(xb, x_hi), max(ya, y_lo), min(yb, y_hi), bool(erase[r])))
        full = (1 << per) - 1
        for v in range(vecs):
            hole = full
            for i in range(per):
                e = v * per + i
                if nhwc:
                    y, x = divmod(e // c_, w_)
                else:
                    y, x = divmod(e % (h_ * w_), w_)
                for x0, x1, y0, y1, f in spans:
                    if x0 <= x < x1 and y0 <= y < y1:
                        hole = hole | (1 << i) if f else hole & ~(1 << i)
            word = bytearray(16)
            if hole:
                word[:] = g_raw[src, v * 16:(v + 1) * 16].tobytes()
            if hole != full:
                s0 = v * per - moved
                a = s0 // per  # floor division, as the kernel's
                lo = f_raw[b, a * 16:(a + 1) * 16].tobytes() if 0 <= a < vecs else bytes(16)
                hi = f_raw[b, (a + 1) * 16:(a + 2) * 16].tobytes() if 0 <= a + 1 < vecs else bytes(16)
                fgv = funnel_bytes(lo, hi, (s0 - a * per) * es)
                for i in range(per):
                    if not (hole >> i) & 1:
                        word[i * es:(i + 1) * es] = fgv[i * es:(i + 1) * es]
            out[b, v * 16:(v + 1) * 16] = np.frombuffer(bytes(word), np.uint8)
    t = torch.from_numpy(out).view(fg.dtype)
    return t.reshape(b_, h_, w_, c_).permute(0, 3, 1, 2) if nhwc else t.reshape(b_, c_, h_, w_)


def random_images(n, c, h, w, dtype, channels_last, gen):
    x = (torch.randint(0, 255, (n, c, h, w), generator=gen).to(dtype) if dtype == torch.uint8 else
         torch.randn(n, c, h, w, generator=gen).to(dtype))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def main():
    gen = torch.Generator().manual_seed(0)
    cases = bad = 0
    for dtype in (torch.bfloat16, torch.float32, torch.uint8, torch.float64):
        per = 16 // torch.empty(0, dtype=dtype).element_size()
        for channels_last in (True, False):
            for b, c, h, w in ((3, 3, 8, 16), (2, 4, 6, 10), (2, 3, 16, 16), (3, 1, 4, 8)):
                if (c * h * w) % per:
                    continue
                fg = random_images(b, c, h, w, dtype, channels_last, gen)
                bg = random_images(b + 1, c, h, w, dtype, channels_last, gen)
                for _ in range(6):
                    counts = torch.randint(0, 6, (b,), generator=gen)
                    r = int(counts.sum())
                    xy = torch.rand(r, 2, generator=gen) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * .2, h * .2])
                    wh = torch.rand(r, 2, generator=gen) * torch.tensor([w * .8, h * .8])
                    rects = torch.cat([xy, xy + wh], 1).float()
                    erase = torch.rand(r, generator=gen) < 0.4
                    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
                    shift = torch.stack([torch.randint(-w - 2, w + 3, (b,), generator=gen),
                                         torch.randint(-h - 2, h + 3, (b,), generator=gen)], 1)
                    bg_index = torch.randint(0, b + 1, (b,), generator=gen)
                    ref = composite_reference(fg, bg, bg_index, shift, rects, erase, offsets)
                    cases += 1
                    if not torch.equal(ref, emulate(fg, bg, bg_index, shift, rects, erase, offsets)):
                        bad += 1
                        print(f"DIFFERS: {dtype} channels_last={channels_last} {(b, c, h, w)}")
    print(f"{cases} cases, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
