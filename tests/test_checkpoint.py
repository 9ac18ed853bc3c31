import random

import numpy as np
import pytest
import torch

from nsa_dist.checkpoint import CheckpointDir, load_trainer_state


def write_model(model):
    return lambda d: torch.save(model.state_dict(), d / "model.pt")


def test_save_resume_restores_weights_state_and_rng(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(5)
    ckpt.save(10, write_model(model), {"data": {"cursor": 42}})
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(999)
    np.random.seed(1)
    path = ckpt.latest()
    assert path.name == "step_00000010"
    state = load_trainer_state(path)
    assert state["step"] == 10 and state["data"] == {"cursor": 42}
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]
    restored = torch.nn.Linear(4, 3)
    restored.load_state_dict(torch.load(path / "model.pt"))
    assert torch.equal(restored.weight, model.weight)


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    model = torch.nn.Linear(2, 2)
    ckpt.save(1, write_model(model), {})

    def crash(d):
        (d / "model.pt").write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, crash, {})
    assert (tmp_path / "step_00000002.partial").exists()
    assert ckpt.latest().name == "step_00000001"
    ckpt.save(2, write_model(model), {})  # the retry clears the abandoned partial directory
    assert ckpt.latest().name == "step_00000002"
    assert not (tmp_path / "step_00000002.partial").exists()


def test_keep_bounds_what_stays_and_unfinished_is_refused(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, lambda d: None, {})
    assert [s for s, _ in ckpt.finished()] == [2, 3]
    (tmp_path / "step_00000009").mkdir()  # no COMPLETE marker: not a checkpoint
    assert ckpt.latest().name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        load_trainer_state(tmp_path / "step_00000009")
    with pytest.raises(ValueError, match="keep"):
        CheckpointDir(tmp_path, keep=0)
