import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nsa_dist.training.checkpoint import CheckpointDir, load_trainer_state


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


class _Engine:
    """The two calls TrainerCheckpoints makes of an engine, on one tensor."""

    def __init__(self, value):
        self.weight = torch.full((2,), float(value))

    def save(self, directory):
        torch.save(self.weight, directory / "weight.pt")

    def load(self, directory):
        self.weight = torch.load(directory / "weight.pt", weights_only=True)


class _Source:
    def __init__(self, cursor):
        self.cursor = cursor

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def test_trainer_checkpoints_restore_each_part_once_and_refuse_another_mesh(tmp_path, monkeypatch):
    from nsa_dist.training.checkpoint import TrainerCheckpoints
    from nsa_dist.parallel import Mesh

    mesh = Mesh(dp_size=1, sp_size=1)
    torch.manual_seed(1)
    TrainerCheckpoints(tmp_path, 2, engine=_Engine(3), source=_Source(7), mesh=mesh).save(5)
    expected = torch.rand(2)

    engine, source = _Engine(0), _Source(0)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: loads.append((Path(path).name, kw)) or real_load(path, **kw))
    torch.manual_seed(999)
    step, path = TrainerCheckpoints(tmp_path, 2, engine=engine, source=source, mesh=mesh).resume("auto")
    assert (step, path) == (5, tmp_path / "step_00000005")
    assert torch.equal(engine.weight, torch.full((2,), 3.0)) and source.cursor == 7
    # Each file is opened once memory-mapped to check it, then each part the trainer restores is read once.
    checked = sorted(name for name, kw in loads if kw.get("mmap"))
    assert checked == ["data_rank0.pt", "rng_rank0.pt", "trainer.pt", "weight.pt"]
    restored = sorted(name for name, kw in loads if not kw.get("mmap") and name != "weight.pt")
    assert restored == ["data_rank0.pt", "rng_rank0.pt", "trainer.pt"]
    assert all(kw.get("weights_only") for _, kw in loads)
    assert torch.equal(torch.rand(2), expected)

    with pytest.raises(ValueError, match=r"dp x sp = \[1, 1\] mesh, this job has \[2, 1\].*parallel\.dp_size"):
        TrainerCheckpoints(tmp_path, 2, engine=_Engine(0), source=_Source(0), mesh=Mesh(dp_size=2, sp_size=1)).restore(path)
    assert TrainerCheckpoints(tmp_path, 2, engine=engine, source=source, mesh=mesh).resume("never") == (0, None)


def test_rng_states_are_plain_tensors_that_weights_only_loads(tmp_path):
    from nsa_dist.training.checkpoint import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_a_non_finite_state_is_never_saved(tmp_path):
    from nsa_dist.training.checkpoint import CheckpointError, TrainerCheckpoints
    from nsa_dist.parallel import Mesh

    class _NanEngine(_Engine):
        module = torch.nn.Linear(2, 2)

    with torch.no_grad():
        _NanEngine.module.weight[0, 0] = float("nan")
    keeper = TrainerCheckpoints(tmp_path, 1, engine=_Engine(1), source=_Source(0), mesh=Mesh(dp_size=1, sp_size=1))
    keeper.save(2)
    with pytest.raises(CheckpointError, match="weight holds non-finite"):
        TrainerCheckpoints(tmp_path, 1, engine=_NanEngine(0), source=_Source(0), mesh=Mesh(dp_size=1, sp_size=1)).save(4)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]
