"""Region erase (PRC + PRM in one pass) and the de-positioning composite.

Both ops take, per image, an ordered list of rectangle operations. In CSR form:

  rects    float32 [R,4]  x1, y1, x2, y2 in pixels of the image
  erase    bool [R]       True: the rectangle erases (cuts a hole); False: it restores (sets)
  offsets  int64 [B+1]    image b owns rects[offsets[b]:offsets[b+1]], applied in that order

Pixel (x, y) is covered by a rectangle when its centre (x + 0.5, y + 0.5) lies in
[x1, x2) x [y1, y2); the last operation covering a pixel decides its state. Rectangles may lie partly
or wholly outside the image and may be empty. The wrappers also take the padded per-image form
(rects [B,N,4], erase [B,N], offsets omitted), in which an inactive slot is an empty rectangle.

The ops only select whole elements, so every dtype (float32, float16, bfloat16, float64, uint8) gives
bit-exact results, and the output keeps the input's memory format (NCHW or channels_last).
"""
import torch

__all__ = ["region_erase", "region_erase_", "composite", "ops_to_csr", "region_erase_reference",
           "composite_reference", "vector_kernels"]


def ops_to_csr(rects, erase, offsets=None):
    """Returns (rects [R,4] float32, erase [R] bool, offsets [B+1] int64) from either form.

    Padded form: rects [B,N,4], erase [B,N], offsets None -> offsets = N * arange(B+1).
    CSR form: passed through (rects [R,4], erase [R], offsets [B+1]).
    """
    if offsets is None:
        if rects.dim() != 3 or rects.shape[-1] != 4:
            raise ValueError(f"without offsets, rects must be padded per image [B,N,4], "
                             f"got shape {tuple(rects.shape)}")
        if tuple(erase.shape) != tuple(rects.shape[:2]):
            raise ValueError(f"erase must be [B,N] = {tuple(rects.shape[:2])} like rects, "
                             f"got shape {tuple(erase.shape)}")
        b, n = rects.shape[:2]
        offsets = torch.arange(b + 1, device=rects.device, dtype=torch.int64) * n
        return rects.reshape(b * n, 4), erase.reshape(b * n), offsets
    return rects, erase, offsets


def region_erase(images, rects, erase, offsets=None, fill=0.0, *, out=None):
    """Applies each image's ordered erase/restore rectangles; erased pixels take `fill`.

    images: [B,C,H,W] float32/float16/bfloat16/float64/uint8, NCHW or channels_last.
    rects, erase, offsets: the per-image operations (CSR, or padded with offsets=None; see module).
    fill: value of erased pixels in the images' units (0 = mean colour of normalised views).
    out: optional tensor to write the result into, e.g. the previous call's output, so that a caller
      that repeats the call on same-shaped batches reuses one buffer: images' shape, dtype and device,
      dense in images' memory format (``torch.empty_like(images)``); `images` itself or sharing no
      memory with it. Every element of `out` is overwritten.
    Returns a new tensor like `images` (same memory format), or `out`.
    """
    rects, erase, offsets = ops_to_csr(rects, erase, offsets)
    if out is None:
        return torch.ops.d3ssl.region_erase(images, rects, erase, offsets, float(fill))
    torch.ops.d3ssl.region_erase_out(images, rects, erase, offsets, float(fill), out)
    return out


def region_erase_(images, rects, erase, offsets=None, fill=0.0):
    """In-place :func:`region_erase`: writes `fill` into the erased pixels of `images`, returns it."""
    rects, erase, offsets = ops_to_csr(rects, erase, offsets)
    torch.ops.d3ssl.region_erase_(images, rects, erase, offsets, float(fill))
    return images


def composite(fg, bg, bg_index, shift, rects, erase, offsets=None, *, out=None):
    """De-positioning composite: out[i] = shift(fg[i], shift[i]) where mask_i is set, else bg[bg_index[i]].

    fg: [B,C,H,W]; bg: [N,C,H,W], same dtype and device; bg_index: int64 [B] in [0, N);
    shift: int64 [B,2] (dx, dy) in pixels, the foreground pixel (x, y) lands on (x + dx, y + dy).
    mask_i starts empty and replays image i's operations (erase=False sets, erase=True clears), so
    the shifted boxes come first and the PRC holes after them. Where the source pixel of a set mask
    pixel lies outside fg, the background shows. Output: like fg (fg's memory format).
    On the CPU an out-of-range bg_index raises an error; on CUDA, as in torch's own indexing ops, it
    triggers a device-side assertion (checking on the host would stall the stream).
    out: optional tensor to write the result into (as in :func:`region_erase`): fg's shape, dtype and
    device, dense in fg's memory format, sharing no memory with fg or bg. Returns it when given.
    """
    rects, erase, offsets = ops_to_csr(rects, erase, offsets)
    if out is None:
        return torch.ops.d3ssl.composite(fg, bg, bg_index, shift, rects, erase, offsets)
    torch.ops.d3ssl.composite_out(fg, bg, bg_index, shift, rects, erase, offsets, out)
    return out



class vector_kernels:
    """Which kernels the CUDA region_erase and composite use: the vector kernels (each thread moves
    16-byte vectors) or the element kernels (the default, until the vector kernels are measured on a
    GPU: benchmarks/RESULTS.md). The results are the same bit for bit.

    ``vector_kernels.enabled()`` says which; ``vector_kernels(True)`` switches them on for the whole
    process; ``with vector_kernels(True): ...`` only inside the block (restored on exit). Setting
    D3SSL_VECTOR_KERNELS=1 in the environment before d3ssl is imported turns them on from the start.
    Batches the vector kernels cannot take (an image's element count not a multiple of 16 bytes'
    worth of elements, storage not 16-byte aligned) still go to the element kernels. The CPU kernels
    are the same either way.
    """

    def __init__(self, on: bool):
        if not isinstance(on, bool):
            raise TypeError(f"vector_kernels takes True or False, got {on!r}")
        self._previous = [torch.ops.d3ssl._set_vector_kernels(on)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.ops.d3ssl._set_vector_kernels(self._previous.pop())
        return False

    @staticmethod
    def enabled() -> bool:
        return bool(torch.ops.d3ssl._vector_kernels())


def _layout(t):
    """The memory format the kernels give their output: channels_last when the input is (only)
    channels_last-dense, else NCHW-contiguous."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("d3ssl::region_erase")
def _region_erase_fake(images, rects, erase, offsets, fill):
    return torch.empty_like(images, memory_format=_layout(images))


@torch.library.register_fake("d3ssl::region_erase_")
def _region_erase_inplace_fake(images, rects, erase, offsets, fill):
    return None


@torch.library.register_fake("d3ssl::region_erase_out")
def _region_erase_out_fake(images, rects, erase, offsets, fill, out):
    return None


@torch.library.register_fake("d3ssl::composite_out")
def _composite_out_fake(fg, bg, bg_index, shift, rects, erase, offsets, out):
    return None


@torch.library.register_fake("d3ssl::composite")
def _composite_fake(fg, bg, bg_index, shift, rects, erase, offsets):
    torch._check(bg.dim() == 4 and bg.shape[1:] == fg.shape[1:],
                 lambda: f"bg must be [N,C,H,W] with fg's C,H,W, got {tuple(bg.shape)}")
    return torch.empty_like(fg, memory_format=_layout(fg))


# --- pure-PyTorch references (the tests' oracle; loops, float64 geometry) ---

def _covered(rect, h, w):
    """bool [H,W]: pixels whose centre lies in [x1,x2) x [y1,y2), computed in float64."""
    x1, y1, x2, y2 = (float(v) for v in rect)
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    return ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]


def _replay(rects, erase, start, end, h, w, init):
    """bool [H,W] state after replaying rects[start:end]: a covered pixel takes erase[r]."""
    state = torch.full((h, w), init, dtype=torch.bool)
    for r in range(start, end):
        state[_covered(rects[r].tolist(), h, w)] = bool(erase[r])
    return state


def region_erase_reference(images, rects, erase, offsets=None, fill=0.0):
    """Loop reference of :func:`region_erase` (any device; computed on the CPU)."""
    rects, erase, offsets = ops_to_csr(rects, erase, offsets)
    rects, erase, offsets = rects.cpu(), erase.cpu(), offsets.cpu().tolist()
    x = images.detach().cpu()
    out = x.clone()
    b, _, h, w = x.shape
    fill_value = torch.tensor(fill, dtype=torch.float64).to(x.dtype)
    for i in range(b):
        erased = _replay(rects, erase, offsets[i], offsets[i + 1], h, w, False)
        out[i] = torch.where(erased[None], fill_value, x[i])
    return out.to(images.device)


def composite_reference(fg, bg, bg_index, shift, rects, erase, offsets=None):
    """Loop reference of :func:`composite` (any device; computed on the CPU)."""
    rects, erase, offsets = ops_to_csr(rects, erase, offsets)
    rects, erase, offsets = rects.cpu(), erase.cpu(), offsets.cpu().tolist()
    f, g = fg.detach().cpu(), bg.detach().cpu()
    b, c, h, w = f.shape
    out = torch.empty_like(f)
    for i in range(b):
        dx, dy = (int(v) for v in shift[i].tolist())
        # the state is "hole" (True) or "set" (False); the mask starts all hole
        hole = _replay(rects, erase, offsets[i], offsets[i + 1], h, w, True)
        moved = torch.zeros_like(f[i])
        has_source = torch.zeros(h, w, dtype=torch.bool)
        # output rows/columns [lo, hi) read source rows/columns [lo - d, hi - d)
        ylo, yhi = min(max(dy, 0), h), max(min(h + dy, h), 0)
        xlo, xhi = min(max(dx, 0), w), max(min(w + dx, w), 0)
        if ylo < yhi and xlo < xhi:
            moved[:, ylo:yhi, xlo:xhi] = f[i, :, ylo - dy:yhi - dy, xlo - dx:xhi - dx]
            has_source[ylo:yhi, xlo:xhi] = True
        out[i] = torch.where((~hole & has_source)[None], moved, g[int(bg_index[i])])
    return out.to(fg.device)
