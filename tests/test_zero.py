"""DeepSpeed ZeRO on CPU (gloo, DS_ACCELERATOR=cpu) over a dp x sp mesh: equal loss curves, ZeRO-3, exact resume.

Few spawned runs, several checks each: every DeepSpeed process pays for its import and engine set-up.
The shm op DeepSpeed builds on its first CPU start is cached in TORCH_EXTENSIONS_DIR, shared by all
test processes (set by tests/conftest.py unless the environment already has it).
"""
import json
import os
from pathlib import Path

import pytest
from multirank import run_ranks

pytest.importorskip("deepspeed")

TINY = ["model.num_layers=1", "trainer.batch_size=2", "data.seq_len=256", "trainer.eval_batch_size=2",
        "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.device=cpu", "trainer.warmup_steps=1",
        "trainer.steps=4"]


def _compose(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _train_each(rank: int, world_size: int, runs: list, out_dir: str) -> dict:
    """Train each of `runs` (name, overrides) in turn on this rank of the harness's gloo group."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": "cpu"})
    from nsa_dist.training import distributed
    from nsa_dist.config import run_config
    from nsa_dist.training.loop import train

    ctx = distributed.init_process_group(backend="gloo", timeout_s=120, device="cpu")
    results = {}
    for name, overrides in runs:
        result = train(run_config(_compose(overrides)), run_dir=Path(out_dir) / name, dist_ctx=ctx)
        results[name] = {"losses": result.losses, "start_step": result.start_step,
                         "resumed_from": str(result.resumed_from)}
    return results


def spawn(world_size: int, runs: list, out_dir: Path) -> dict:
    return run_ranks(_train_each, world_size, runs, str(out_dir))[0]


def test_zero2_sequence_parallel_matches_data_parallel_zero3_runs_and_resume_is_exact(tmp_path):
    reference = spawn(2, [("dp2_sp1", [*TINY, "zero=stage2", "parallel.sp_size=1"])], tmp_path / "dp2")["dp2_sp1"]

    ckpt = tmp_path / "dp2sp2" / "zero2" / "checkpoints"
    runs = [
        ("zero2", [*TINY, "zero=stage2", "parallel.dp_size=2", "parallel.sp_size=2", "trainer.checkpoint_every=2"]),
        # A fresh engine, model and data stream, restored from the checkpoint written after step 2.
        ("zero2_resumed", [*TINY, "zero=stage2", "parallel.sp_size=2", f"trainer.resume={ckpt / 'step_00000002'}"]),
        ("zero3", [*TINY, "zero=stage3", "parallel.sp_size=2", "trainer.activation_checkpointing=true"]),
    ]
    got = spawn(4, runs, tmp_path / "dp2sp2")

    ref = reference["losses"]
    zero2 = got["zero2"]["losses"]
    assert len(ref) == len(zero2) == 4
    assert zero2 == pytest.approx(ref, rel=1e-4, abs=1e-5), "dp=2 x sp=2 diverged from dp=2 x sp=1"
    assert ref[-1] < ref[0]

    resumed = got["zero2_resumed"]
    assert resumed["start_step"] == 2 and resumed["resumed_from"].endswith("step_00000002")
    assert resumed["losses"] == pytest.approx(zero2[2:], rel=1e-6, abs=1e-7), "resume did not continue exactly"

    assert got["zero3"]["losses"] == pytest.approx(zero2, rel=1e-4, abs=1e-5), "ZeRO-3 diverged from ZeRO-2"
    assert (ckpt / "step_00000004" / "COMPLETE").is_file()
    assert not list(ckpt.glob("*.partial"))


def test_zero3_trains_a_converted_hugging_face_model_sequence_parallel_as_one_process(tmp_path):
    """A converted Hugging Face Llama (model=hf_llama) under DeepSpeed ZeRO-3 on 2 gloo ranks with sp = 2: the
    loss and the gradient norm of every step (which a wrongly scaled gradient would change, where AdamW's
    steps would not) and the final weights equal the same run in one process."""
    pytest.importorskip("transformers")
    import torch

    hf = [*TINY, "model=hf_llama", "model.num_layers=2", "zero=stage3"]
    one = spawn(1, [("one", [*hf, "parallel.sp_size=1"])], tmp_path / "one")["one"]
    two = spawn(2, [("sp2", [*hf, "parallel.sp_size=2"])], tmp_path / "two")["sp2"]
    assert len(one["losses"]) == 4 and one["losses"][-1] < one["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5), "sp=2 under ZeRO-3 diverged"
    final_one = torch.load(tmp_path / "one" / "one" / "final.pt", weights_only=True)["model"]
    final_two = torch.load(tmp_path / "two" / "sp2" / "final.pt", weights_only=True)["model"]
    assert final_one.keys() == final_two.keys() and any(".self_attn.gate." in k for k in final_one)
    for name, weight in final_one.items():
        # AdamW moves a weight by about lr = 3e-3 a step: reductions in another order stay far below that
        assert float((final_two[name] - weight).abs().max()) < 2e-5, name

    def grad_norms(run_dir):
        return [json.loads(line)["grad_norm"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]

    norms = grad_norms(tmp_path / "one" / "one")
    assert len(norms) == 4 and all(n > 0 for n in norms)
    assert grad_norms(tmp_path / "two" / "sp2") == pytest.approx(norms, rel=1e-4)
