"""Weight export: torchvision and Detectron2 (R50-C4) round trips, and errors on bad inputs."""
import numpy as np
import pytest
import torch
import torchvision

from d3ssl.eval import export

NORM = ("weight", "bias", "running_mean", "running_var")


def detectron2_resnet_layout(depth=50):
    """name → shape of Detectron2's ResNet (bottleneck) weights, from its naming rules.

    Stem: ``stem.conv1`` (7×7, 64) with its norm. Stages res2..res5 with (3, 4, 6, 3) bottleneck
    blocks ``resS.B.conv{1,2,3}`` (1×1 width, 3×3 width, 1×1 4·width; width = 64·2^(S-2)) and, in the
    first block of each stage, ``resS.0.shortcut`` (1×1). Every conv has no bias and a ``.norm``
    with weight, bias, running_mean, running_var.
    """
    assert depth == 50
    layout = {"stem.conv1.weight": (64, 3, 7, 7)}
    layout.update({f"stem.conv1.norm.{p}": (64,) for p in NORM})
    in_ch = 64
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        width = 64 * 2 ** (stage - 2)
        out_ch = 4 * width
        for b in range(blocks):
            convs = {"conv1": (width, in_ch, 1, 1), "conv2": (width, width, 3, 3), "conv3": (out_ch, width, 1, 1)}
            if b == 0:
                convs["shortcut"] = (out_ch, in_ch, 1, 1)
            for name, shape in convs.items():
                layout[f"res{stage}.{b}.{name}.weight"] = shape
                layout.update({f"res{stage}.{b}.{name}.norm.{p}": (shape[0],) for p in NORM})
            in_ch = out_ch
    return layout


def trained_like(arch, seed=0):
    """A torchvision ResNet with random weights *and* non-trivial BN statistics (as after training)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def trunk(net, x):
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_round_trip(arch, tmp_path):
    ours = trained_like(arch)
    path = str(tmp_path / "backbone.pth")
    export.export(ours, "torchvision", path, arch)
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    target = getattr(torchvision.models, arch)()
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    target.eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(trunk(target, x), trunk(ours, x), rtol=0, atol=0)


def test_detectron2_layout_and_round_trip(tmp_path):
    ours = trained_like("resnet50", seed=1)
    path = str(tmp_path / "r50.pkl")
    export.export(ours, "detectron2", path, "resnet50")
    saved = export.load_detectron2(path)
    assert saved["matching_heuristics"] is True and isinstance(saved["__author__"], str)
    model = saved["model"]
    expected = detectron2_resnet_layout(50)
    assert set(model) == set(expected)
    for key, shape in expected.items():
        assert isinstance(model[key], np.ndarray) and model[key].shape == shape, key
    # the norm really carries the BN of the same conv (statistics and affine)
    np.testing.assert_array_equal(model["stem.conv1.norm.running_var"], ours.bn1.running_var.numpy())
    np.testing.assert_array_equal(model["res5.0.shortcut.norm.running_mean"],
                                  ours.layer4[0].downsample[1].running_mean.numpy())
    np.testing.assert_array_equal(model["res3.2.conv3.norm.weight"], ours.layer2[2].bn3.weight.detach().numpy())
    np.testing.assert_array_equal(model["res4.5.conv2.weight"], ours.layer3[5].conv2.weight.detach().numpy())
    # and mapping back gives torchvision's tensors, bit for bit
    back = export.detectron2_to_torchvision(model)
    reference = {k: v for k, v in ours.state_dict().items()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(back) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_other_architecture_is_rejected(tmp_path):
    r18 = trained_like("resnet18")
    with pytest.raises(ValueError, match="not a torchvision resnet50"):
        export.export(r18, "torchvision", str(tmp_path / "x.pth"), "resnet50")
    with pytest.raises(ValueError, match="resnet50 backbone"):
        export.export(r18, "detectron2", str(tmp_path / "x.pkl"), "resnet18")
    with pytest.raises(ValueError, match="format"):
        export.export(r18, "onnx", str(tmp_path / "x"), "resnet18")
    with pytest.raises(ValueError, match="arch"):
        export.torchvision_state_dict(r18, "vgg16")
    with pytest.raises(ValueError, match="not a Detectron2 ResNet key"):
        export.detectron2_to_torchvision({"backbone.fpn.weight": torch.zeros(1)})


# --- from training checkpoints (the trainer's format) -----------------------------------------------------

def write_checkpoint(path, arch="resnet18", method="d3ssl"):
    import dataclasses
    from d3ssl.model import ModelConfig, build_method
    cfg = ModelConfig(method=method, arch=arch, queue_size=64, proj_hidden=32, pred_hidden=32, proj_dim=16)
    model = build_method(cfg)
    for m in model.online_backbone.modules():  # BN statistics as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(cfg)}}, path)
    return model.online_backbone.eval()


def test_cli_torchvision_from_checkpoint(tmp_path):
    backbone = write_checkpoint(str(tmp_path / "ckpt.pt"))
    out = str(tmp_path / "r18.pth")
    assert export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--format", "torchvision", "--out", out]) == 0
    target = torchvision.models.resnet18()
    missing, unexpected = target.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(target.eval(), x), backbone.c5(x), rtol=0, atol=0)


def test_resnet_c4_to_detectron2(tmp_path):
    from d3ssl.model import ResNetC4
    ours = ResNetC4("resnet50").eval()
    saved = export.export(ours, "detectron2", str(tmp_path / "c4.pkl"), "resnet50")
    assert set(saved) == set(detectron2_resnet_layout(50))
    torch.testing.assert_close(saved["res5.2.conv3.weight"], ours.res5[2].conv3.weight, rtol=0, atol=0)
    torch.testing.assert_close(saved["res4.0.shortcut.norm.running_var"], ours.trunk[6][0].downsample[1].running_var,
                               rtol=0, atol=0)
    torch.testing.assert_close(saved["stem.conv1.weight"], ours.trunk[0].weight, rtol=0, atol=0)


def test_cli_errors(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt.pt")
    out = str(tmp_path / "x.pkl")
    assert export.main(["--ckpt", str(tmp_path / "missing.pt"), "--format", "torchvision", "--out", out]) == 2
    assert "missing.pt" in capsys.readouterr().err
    write_checkpoint(ckpt, "resnet18")
    assert export.main(["--ckpt", ckpt, "--format", "detectron2", "--out", out]) == 2
    assert "resnet50 backbone" in capsys.readouterr().err
    assert export.main(["--ckpt", ckpt, "--arch", "resnet50", "--format", "torchvision", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "holds a resnet18 backbone, but resnet50 was asked for" in err and len(err) < 400
    (tmp_path / "notes.pt").write_text("hello")
    assert export.main(["--ckpt", str(tmp_path / "notes.pt"), "--format", "torchvision", "--out", out]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    torch.save({"weights": {}}, str(tmp_path / "other.pt"))
    assert export.main(["--ckpt", str(tmp_path / "other.pt"), "--format", "torchvision", "--out", out]) == 2
    assert "not a d3ssl training checkpoint" in capsys.readouterr().err
    import os
    assert not os.path.exists(out)
