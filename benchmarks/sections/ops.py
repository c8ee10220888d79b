"""RoIAlign: d3ssl.ops.roi_align against torchvision.ops.roi_align, forward and forward+backward.

Shapes as in training: C4 features of the 224 views [B,1024,14,14] pooled to 14x14, and of the
112 views [B,1024,7,7] pooled to 7x7, 4 boxes per image (spatial_scale 1/16, aligned, adaptive
sampling). On the CPU both run float32 at the same thread count, channels_last (as the model runs)
and NCHW. On the GPU ours runs bf16 channels_last, torchvision what a user would run: the same bf16
features under autocast, which torchvision computes in float32.
"""
import torch
import torchvision

from benchmarks.common import Row, copy_bandwidth, device_seconds_per_call, interleaved
from d3ssl.ops import roi_align

SECTION = "ops"
BOXES_PER_IMAGE = 4
CHANNELS = 1024
# (feature size, output size, view size in pixels): C4 is stride 16.
SHAPES = [(14, 14, 224), (7, 7, 112)]
TARGET = {"cpu": 1.5, "cuda": 2.0}  # the targets, for forward+backward


def make_boxes(batch, view, generator, device):
    """[B*4, 5] boxes shaped like the model's proposals: side 0.3-0.8 of the view, inside it."""
    n = batch * BOXES_PER_IMAGE
    side = view * (0.3 + 0.5 * torch.rand(n, 2, generator=generator))
    corner = (view - side) * torch.rand(n, 2, generator=generator)
    index = torch.arange(batch).repeat_interleave(BOXES_PER_IMAGE).float()
    return torch.cat([index[:, None], corner, corner + side], dim=1).to(device)


def _callables(fn, x, boxes, out_size):
    """(forward, forward+backward) closures of fn(x, boxes) on the same inputs."""
    xg = x.detach().clone().requires_grad_()
    grad = torch.randn_like(fn(x, boxes))  # in the layout the op returns

    def forward():
        with torch.no_grad():
            fn(x, boxes)

    def forward_backward():
        xg.grad = None
        fn(xg, boxes).backward(grad)

    return forward, forward_backward


def run(args):
    device = args.device
    batch = 16 if args.quick else 64
    # torchvision's CPU backward takes seconds per call at batch 64: few repeats, alternated.
    timing = dict(rounds=2, min_time=0.2, warmup=1, min_calls=2) if args.quick else \
        dict(rounds=3, min_time=1.0, warmup=1, min_calls=2)
    g = torch.Generator().manual_seed(0)
    rows = []
    if device == "cuda":
        variants = [("bf16 channels_last", torch.bfloat16, torch.channels_last)]
    else:
        variants = [("fp32 channels_last", torch.float32, torch.channels_last),
                    ("fp32 NCHW", torch.float32, torch.contiguous_format)]
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    for feat, out_size, view in SHAPES:
        boxes = make_boxes(batch, view, g, device)
        for label, dtype, fmt in variants:
            x = torch.randn(batch, CHANNELS, feat, feat, generator=g).to(device=device, dtype=dtype,
                                                                          memory_format=fmt)

            def ours(inp, b):
                return roi_align(inp, b, out_size, spatial_scale=1 / 16, sampling_ratio=-1, aligned=True)

            def theirs(inp, b):
                with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                    return torchvision.ops.roi_align(inp, b, out_size, spatial_scale=1 / 16, sampling_ratio=-1,
                                                     aligned=True)

            our_fwd, our_fb = _callables(ours, x, boxes, out_size)
            tv_fwd, tv_fb = _callables(theirs, x, boxes, out_size)
            anchor = "torchvision " + ("fp32 under autocast" if device == "cuda" else label)
            for measure, a, b in (("forward", our_fwd, tv_fwd), ("forward+backward", our_fb, tv_fb)):
                t = interleaved({"ours": a, "tv": b}, device=device, **timing)
                extra = {"ms_ours": round(t["ours"] * 1e3, 3), "ms_torchvision": round(t["tv"] * 1e3, 3)}
                if bandwidth:
                    # Least traffic the op needs: read the features and write the pooled output
                    # (forward); backward also reads the output grad and writes the input grad.
                    # Judged by the GPU time of a call (CUDA events), as the copy bandwidth is.
                    elem = x.element_size()
                    n_out = boxes.shape[0] * CHANNELS * out_size * out_size
                    nbytes = (x.numel() + n_out) * elem * (2 if measure == "forward+backward" else 1)
                    gpu = device_seconds_per_call(a, device)
                    extra["gpu_ms_ours"] = round(gpu * 1e3, 4)
                    extra["fraction_of_copy_bandwidth"] = round(nbytes / gpu / bandwidth, 3)
                rows.append(Row(SECTION, f"roi_align {measure} [{batch},{CHANNELS},{feat},{feat}]->{out_size}x"
                                         f"{out_size} {label}",
                                ours=batch / t["ours"], anchor=batch / t["tv"], anchor_name=anchor,
                                target=TARGET.get(device) if measure == "forward+backward" else None,
                                extra=extra))
    return rows
