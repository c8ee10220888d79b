"""Checkpoint files: atomic writes, discovery of the newest, weights_only loading, RNG round trips."""
import os
import random

import numpy as np
import pytest
import torch

from train import checkpoint as ckpt


def _state(step):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "step": step,
            "epoch": 0, "rng": ckpt.rng_state(torch.Generator().manual_seed(3)),
            "config": {"optim": {"lr_per_256": 1.0, "accum_steps": 1}, "data": {"path": None,
                                                                              "synthetic_size": (8, 9)}},
            "stats": {"skipped": 2}}


def test_atomic_save_roundtrip_weights_only(tmp_path):
    state = _state(7)
    path = ckpt.checkpoint_path(str(tmp_path), 7)
    ckpt.atomic_save(state, path)
    assert os.path.basename(path) == "step_00000007.pt"
    # No temporary file is left behind.
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000007.pt"]
    back = ckpt.load_checkpoint(path)
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["state"][0]["momentum_buffer"].shape == (4, 3)
    assert back["config"] == state["config"] and back["stats"] == {"skipped": 2}
    # Same call with an explicit weights_only load: nothing pickled beyond the allowed types.
    torch.load(path, weights_only=True)


def test_atomic_save_failure_keeps_previous(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(str(tmp_path), 1)
    ckpt.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"step": 1, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    # The old file is intact and no temp file remains.
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000001.pt"]


def test_latest_ignores_temp_and_orders_numerically(tmp_path):
    run = str(tmp_path)
    assert ckpt.latest_checkpoint(run) is None
    for s in (9, 10, 100, 20):
        ckpt.atomic_save({"step": s}, ckpt.checkpoint_path(run, s))
    (tmp_path / "checkpoints" / ".step_00000200.pt.abc.tmp").write_bytes(b"torn")
    assert ckpt.latest_checkpoint(run).endswith("step_00000100.pt")
    ckpt.prune_checkpoints(run, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [20, 100]


class _Custom:
    pass


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not load checkpoint .*bad.pt': not a PyTorch checkpoint$"):
        ckpt.load_checkpoint(str(bad))
    # An arbitrary pickled object is refused by weights_only loading.
    torch.save({"x": _Custom()}, tmp_path / "obj.pt")
    with pytest.raises(RuntimeError, match="objects other than tensors and plain containers"):
        ckpt.load_checkpoint(str(tmp_path / "obj.pt"))


def test_rng_state_roundtrip_through_file(tmp_path):
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen)
    state = ckpt.rng_state(gen)
    expect = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
              torch.rand(4, generator=gen))
    path = str(tmp_path / "rng.pt")
    ckpt.atomic_save({"rng": state}, path)
    # Disturb every generator, then restore from the file.
    torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
    gen2 = torch.Generator()
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"], gen2)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)],
           torch.rand(4, generator=gen2))
    assert torch.equal(got[0], expect[0])
    np.testing.assert_array_equal(got[1], expect[1])
    assert got[2] == expect[2]
    assert torch.equal(got[3], expect[3])


@pytest.mark.cuda
def test_rng_state_restores_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    """A resumed GPU run loads its checkpoint with map_location=cuda, which moves the saved
    generator states onto the GPU too; torch takes them back from CPU byte tensors only."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    torch.cuda.manual_seed_all(8)
    state = ckpt.rng_state(gen)
    expect = (torch.rand(3, device="cuda"), torch.rand(3, device="cuda", generator=gen))
    path = str(tmp_path / "rng.pt")
    ckpt.atomic_save({"rng": state}, path)
    loaded = ckpt.load_checkpoint(path, map_location="cuda")["rng"]
    assert loaded["torch"].is_cuda and loaded["region"].is_cuda
    gen2 = torch.Generator(device="cuda")
    ckpt.set_rng_state(loaded, gen2)
    assert torch.equal(torch.rand(3, device="cuda"), expect[0])
    assert torch.equal(torch.rand(3, device="cuda", generator=gen2), expect[1])


def test_set_aside_later_moves_only_later_checkpoints(tmp_path):
    run = str(tmp_path)
    for s in (2, 4, 6, 8):
        ckpt.atomic_save({"step": s}, ckpt.checkpoint_path(run, s))
    folder, moved = ckpt.set_aside_later(run, 4)
    assert moved == [6, 8] and [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]
    assert sorted(os.listdir(folder)) == ["step_00000006.pt", "step_00000008.pt"]   # kept, not deleted
    assert ckpt.load_checkpoint(os.path.join(folder, "step_00000008.pt"))["step"] == 8
    assert ckpt.set_aside_later(run, 4) == (None, [])


def test_remove_temporaries_leaves_checkpoints(tmp_path):
    run = str(tmp_path)
    ckpt.atomic_save({"step": 1}, ckpt.checkpoint_path(run, 1))
    folder = tmp_path / "checkpoints"
    (folder / ".step_00000002.pt.abc123.tmp").write_bytes(b"torn")
    (folder / "notes.txt").write_text("mine")
    assert ckpt.remove_temporaries(run) == 1
    assert sorted(os.listdir(folder)) == ["notes.txt", "step_00000001.pt"]
