"""Export of the pre-trained online backbone for downstream use.

    python -m d3ssl.eval.export --ckpt run/checkpoint.pt --format torchvision --out r50.pth
    python -m d3ssl.eval.export --ckpt run/checkpoint.pt --format detectron2 --out r50_d3ssl.pkl

``torchvision``: a plain state_dict (``torch.save``) of ``torchvision.models.resnet50()`` (or
``resnet18()``) without the classifier. Load it with::

    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(torch.load("r50.pth"), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

``detectron2``: a pickle of ``{"model": {name: numpy array}, "__author__": "d3ssl",
"matching_heuristics": True}``, the format of Detectron2's ``tools/convert-torchvision-to-d2.py``, with
Detectron2's ResNet names (``stem.conv1.weight``, ``stem.conv1.norm.*``, ``res2.0.conv1.*``,
``res2.0.shortcut.*``, ..., ``res5.*``). With matching heuristics, Detectron2 finds ``res5.*`` in the
R50-C4 ROI head (``roi_heads.res5``) and ``stem/res2..res4`` in the backbone. Our backbone is
torchvision's ResNet (stride on the 3×3 conv, RGB input, ImageNet mean/std), so a C4 config needs::

    MODEL.WEIGHTS: r50_d3ssl.pkl
    MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]
    MODEL.PIXEL_STD: [58.395, 57.120, 57.375]
    MODEL.RESNETS.STRIDE_IN_1X1: False
    INPUT.FORMAT: "RGB"

(and ``MODEL.RESNETS.NORM: "SyncBN"`` to fine-tune the normalisation layers, as SoCo does).
Detectron2's C4 head is built from bottleneck blocks, so only resnet50 backbones export to it.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from d3ssl.cli import ArgumentParser

#: Architectures we export, and the torchvision constructor of each.
ARCHS = ("resnet50", "resnet18")
FORMATS = ("torchvision", "detectron2")


def _reference_keys(arch: str) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes of torchvision's ``arch`` without ``fc``."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    ref = getattr(torchvision.models, arch)()
    return {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("fc.")}


def torchvision_state_dict(backbone: nn.Module | dict, arch: str = "resnet50") -> "OrderedDict[str, torch.Tensor]":
    """The backbone's weights under torchvision's ``arch`` names, ``fc`` excluded, on the CPU.

    Args:
        backbone: the online backbone (a ResNetC4 or a torchvision ResNet), or a state_dict with
            torchvision's names.
        arch: ``resnet50`` or ``resnet18``.
    Raises:
        ValueError: when a key of torchvision's ``arch`` (other than ``fc``) is missing from the backbone
            or has another shape — a checkpoint of another architecture.
    """
    if isinstance(backbone, nn.Module):
        from .probe import resnet_modules
        state = {f"{name}.{k}": v for name, module in resnet_modules(backbone).items()
                 for k, v in module.state_dict().items()}
    else:
        state = backbone
    expected = _reference_keys(arch)
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {shape})" for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    if missing or wrong:
        detail = (f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else
                  f"shape mismatch for {wrong[:3]}")
        raise ValueError(f"arch: the backbone is not a torchvision {arch}: {detail}. Pass the architecture the "
                         f"checkpoint was trained with.")
    return OrderedDict((k, state[k].detach().cpu().clone()) for k in expected)


_LAYER = re.compile(r"^layer([1-4])\.")
_BN = re.compile(r"\bbn([1-3])\.")


def torchvision_to_detectron2(state: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Rename torchvision ResNet keys to Detectron2's ResNet names.

    layerN → res(N+1); stem parameters get the ``stem.`` prefix; bnK → convK.norm; downsample.0 →
    shortcut, downsample.1 → shortcut.norm. ``num_batches_tracked`` is dropped (Detectron2's frozen
    normalisation has no such buffer) and so is ``fc``.
    """
    out = OrderedDict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        name = key
        m = _LAYER.match(name)
        name = f"res{int(m.group(1)) + 1}." + name[m.end():] if m else "stem." + name
        name = _BN.sub(lambda g: f"conv{g.group(1)}.norm.", name)
        name = name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        out[name] = value
    return out


_RES = re.compile(r"^res([2-5])\.")
_NORM = re.compile(r"\bconv([1-3])\.norm\.")


def detectron2_to_torchvision(state: dict) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`torchvision_to_detectron2` (without ``num_batches_tracked``)."""
    out = OrderedDict()
    for key, value in state.items():
        name = key
        if name.startswith("stem."):
            name = name[len("stem."):]
        else:
            m = _RES.match(name)
            if not m:
                raise ValueError(f"state: {key!r} is not a Detectron2 ResNet key (expected stem.* or res2..res5.*)")
            name = f"layer{int(m.group(1)) - 1}." + name[m.end():]
        name = name.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
        name = _NORM.sub(lambda g: f"bn{g.group(1)}.", name)
        out[name] = torch.as_tensor(value)
    return out


def save_torchvision(state: dict, path: str) -> None:
    """``torch.save`` a torchvision state_dict, atomically (temp file + rename)."""
    _atomic(path, lambda f: torch.save(dict(state), f))


def save_detectron2(state: dict, path: str) -> None:
    """Write a Detectron2 checkpoint (pickle of numpy arrays, matching heuristics on), atomically."""
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in state.items()},
               "__author__": "d3ssl", "matching_heuristics": True}
    _atomic(path, lambda f: pickle.dump(payload, f))


def load_detectron2(path: str) -> dict:
    """Read back a checkpoint written by :func:`save_detectron2` (a trusted, local pickle)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def export(backbone: nn.Module | dict, fmt: str, path: str, arch: str = "resnet50") -> dict:
    """Export ``backbone`` as ``fmt`` (``torchvision`` or ``detectron2``) to ``path``; returns the saved state."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if fmt == "detectron2" and arch != "resnet50":
        raise ValueError(f"format: Detectron2's R50-C4 head needs a resnet50 backbone, the checkpoint is {arch}; "
                         f"use --format torchvision")
    state = torchvision_state_dict(backbone, arch)
    if fmt == "torchvision":
        save_torchvision(state, path)
        return state
    d2 = torchvision_to_detectron2(state)
    save_detectron2(d2, path)
    return d2


def load_backbone(ckpt: str, arch: str | None = None) -> tuple[nn.Module, str]:
    """(online backbone, arch) of a training checkpoint (file or run folder), on the CPU.

    ``arch`` (optional) is checked against the checkpoint: weights of another architecture give a
    ``ValueError`` that says which (:func:`d3ssl.eval.oknn.load_backbone`), instead of a wall of
    shape mismatches.
    """
    from .oknn import load_backbone as _load
    backbone, found, _ = _load(ckpt, arch)
    return backbone, found


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m d3ssl.eval.export", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="training checkpoint (train.run's format), or a run folder (its newest checkpoint)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="torchvision: a ResNet state_dict; detectron2: an R50-C4 checkpoint (ResNet-50 only)")
    parser.add_argument("--out", required=True, help="output file (.pth for torchvision, .pkl for detectron2)")
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help="expected backbone (default: the one recorded in the checkpoint)")
    args = parser.parse_args(argv)
    from d3ssl.cli import check_output_file
    check_output_file(parser, "--out", args.out)
    try:
        backbone, arch = load_backbone(args.ckpt, args.arch)
        state = export(backbone, args.fmt, args.out, arch)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {arch} backbone, {len(state)} tensors, {args.fmt} names")
    return 0


if __name__ == "__main__":
    sys.exit(main())
