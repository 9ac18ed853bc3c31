"""Bad inputs and faults, run in this process: each one stops with one clear line (what the command line
prints for it, `error_line`) or goes on with one warning, and each is a row of docs/reliability.md
(through the `fault_case` fixture). The command-line cases are in tests/test_reliability_cli.py.
"""
import logging
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nsa_dist.training.checkpoint import load_file
from nsa_dist.training.files import write_digest
from nsa_dist.train import error_line, main

TINY = ("model.num_layers=1", "data.seq_len=128", "trainer.batch_size=2", "trainer.eval_batch_size=2",
        "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.device=cpu", "trainer.warmup_steps=1")


def fails(compose_config, *overrides: str, run_dir: Path) -> BaseException:
    with pytest.raises(Exception) as caught:
        main(compose_config(*TINY, *overrides), run_dir=run_dir)
    return caught.value


def given(*overrides: str) -> str:
    return "`" + " ".join(overrides) + "`"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 4 steps with finished checkpoints at steps 2 and 4, copied fresh for each test."""
    from hydra import compose, initialize_config_module

    root = tmp_path_factory.mktemp("reference")
    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, "trainer.steps=4", "trainer.checkpoint_every=2"])
    main(cfg, run_dir=root)
    return root / "checkpoints"


@pytest.fixture
def checkpoints(two_checkpoints, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_nan_after_good_checkpoints_keeps_the_last_good_one(compose_config, tmp_path, checkpoints, fault_case):
    overrides = ("trainer.steps=8", "trainer.checkpoint_every=2", "trainer.checkpoint_keep=2", "trainer.lr=1e9",
                 f"trainer.checkpoint_dir={checkpoints}")
    error = fails(compose_config, *overrides, run_dir=tmp_path / "run")
    assert "non-finite loss" in str(error) and "lower trainer.lr" in str(error)
    fault_case("nan_after_good_checkpoints", "a resumed run turns NaN: " + given(*overrides), exit_code=1,
               seen=error_line(error))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    state = load_file(checkpoints / "step_00000004" / "model_optimizer.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "run" / "final.pt").exists()


class _CreatesFile:
    """Unpickled with weights_only=False, this would create `marker`: the attack a checkpoint must not run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["trainer.pt", "model_optimizer.pt", "data_rank0.pt", "rng_rank0.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_unrun(compose_config, tmp_path, checkpoints, fault_case, name):
    marker = tmp_path / "created_by_the_pickle"
    torch.save({"step": 4, "payload": _CreatesFile(marker)}, checkpoints / "step_00000004" / name)
    write_digest(checkpoints / "step_00000004" / name)  # the digest matches: only the pickle check stands in the way
    error = fails(compose_config, "trainer.steps=6", f"trainer.checkpoint_dir={checkpoints}", run_dir=tmp_path / "run")
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert str(checkpoints / "step_00000004" / name) in str(error) and "refused unread" in str(error)
    fault_case(f"crafted_pickle_{name.split('.')[0]}", f"`trainer.resume=auto` with a {name} whose pickle calls "
               "open() (and a digest that matches it)", exit_code=1, seen=error_line(error))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(compose_config, tmp_path, checkpoints, fault_case,
                                                                caplog):
    truncate(checkpoints / "step_00000004" / "model_optimizer.pt")
    with caplog.at_level(logging.WARNING):
        result = main(compose_config(*TINY, "trainer.steps=5", f"trainer.checkpoint_dir={checkpoints}"),
                      run_dir=tmp_path / "run")
    assert result.start_step == 2 and result.resumed_from == checkpoints / "step_00000002"
    warning = next(r.getMessage() for r in caplog.records if "falling back" in r.getMessage())
    assert str(checkpoints / "step_00000004" / "model_optimizer.pt") in warning
    fault_case("truncated_newest_checkpoint", "the newest checkpoint's model_optimizer.pt cut in half, "
               "`trainer.resume=auto`", exit_code=0, seen=f"warning: {warning}")


def test_every_checkpoint_damaged_stops_naming_them(compose_config, tmp_path, checkpoints, fault_case):
    for step in ("step_00000002", "step_00000004"):
        truncate(checkpoints / step / "trainer.pt")
    error = fails(compose_config, "trainer.steps=6", f"trainer.checkpoint_dir={checkpoints}", run_dir=tmp_path / "r")
    assert "every finished checkpoint" in str(error) and str(checkpoints / "step_00000002") in str(error)
    fault_case("every_checkpoint_damaged", "both checkpoints' trainer.pt truncated, `trainer.resume=auto`",
               exit_code=1, seen=error_line(error))


def test_a_damaged_checkpoint_named_by_path_is_not_replaced(compose_config, tmp_path, checkpoints, fault_case):
    truncate(checkpoints / "step_00000004" / "rng_rank0.pt")
    error = fails(compose_config, "trainer.steps=6", f"trainer.resume={checkpoints / 'step_00000004'}",
                  run_dir=tmp_path / "r")
    assert str(checkpoints / "step_00000004" / "rng_rank0.pt") in str(error)
    fault_case("damaged_checkpoint_by_path", "`trainer.resume=<step_4>` whose rng_rank0.pt is truncated",
               exit_code=1, seen=error_line(error))


@pytest.mark.parametrize("override, key", [("model.hidden_size=64", "model.hidden_size: checkpoint 128, this run 64"),
                                           ("nsa.top_n=3", "nsa.top_n: checkpoint 4, this run 3"),
                                           ("data.seq_len=64", "data.seq_len: checkpoint 128, this run 64")])
def test_a_resume_into_another_config_is_refused_by_key(compose_config, tmp_path, checkpoints, fault_case, override,
                                                        key):
    error = fails(compose_config, "trainer.steps=6", override, f"trainer.checkpoint_dir={checkpoints}",
                  run_dir=tmp_path / "r")
    assert key in str(error) and "another hydra.run.dir" in str(error)
    assert ("trainer.resume_accept=" in str(error)) == (not override.startswith("model"))
    fault_case(f"resume_changed_{override.split('=')[0].replace('.', '_')}", f"resume with {given(override)}",
               exit_code=1, seen=error_line(error))


def test_an_accepted_change_resumes_with_a_warning(compose_config, tmp_path, checkpoints, fault_case, caplog):
    overrides = ("data.seq_len=64", "trainer.resume_accept=[data.seq_len]")
    with caplog.at_level(logging.WARNING):
        result = main(compose_config(*TINY, "trainer.steps=5", *overrides, f"trainer.checkpoint_dir={checkpoints}"),
                      run_dir=tmp_path / "run")
    assert result.start_step == 4
    warning = next(r.getMessage() for r in caplog.records if "resume_accept" in r.getMessage())
    fault_case("resume_accepted_change", f"resume with {given(*overrides)}", exit_code=0, seen=f"warning: {warning}")


def test_accepting_a_shape_change_is_a_config_error(compose_config, tmp_path, fault_case):
    error = fails(compose_config, "trainer.resume_accept=[model.hidden_size]", run_dir=tmp_path)
    assert "model.hidden_size cannot be accepted" in str(error)
    fault_case("resume_accept_shape_key", given("trainer.resume_accept=[model.hidden_size]"), exit_code=1,
               seen=error_line(error))


def token_file(path: Path, ids, dtype) -> Path:
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


def test_token_ids_beyond_the_vocabulary_stop_before_training(compose_config, tmp_path, fault_case):
    ids = np.arange(4096) % 300
    path = token_file(tmp_path / "train.bin", ids, np.uint16)
    overrides = ("data=tokens", f"data.path={path}", "data.token_dtype=uint16", "model.vocab_size=256")
    error = fails(compose_config, *overrides, run_dir=tmp_path / "r")
    assert "token id 299" in str(error) and not (tmp_path / "r" / "distributed.json").exists()
    fault_case("token_id_beyond_vocab", "a token file with ids up to 299, " + given("model.vocab_size=256"),
               exit_code=1, seen=error_line(error))


def test_an_int32_token_file_read_as_uint16_is_caught(compose_config, tmp_path, fault_case):
    path = token_file(tmp_path / "train.bin", np.arange(4096) % 200, np.int32)
    error = fails(compose_config, "data=tokens", f"data.path={path}", "data.token_dtype=uint16", run_dir=tmp_path / "r")
    assert "data.token_dtype=uint32" in str(error)
    fault_case("int32_tokens_read_as_uint16", "an int32 token file, " + given("data.token_dtype=uint16"),
               exit_code=1, seen=error_line(error))


def test_a_token_file_of_odd_size_is_caught(compose_config, tmp_path, fault_case):
    path = tmp_path / "train.bin"
    path.write_bytes(bytes(4097))
    error = fails(compose_config, "data=tokens", f"data.path={path}", "data.token_dtype=uint16", run_dir=tmp_path / "r")
    assert "not a whole number of uint16 tokens" in str(error)
    fault_case("token_file_odd_size", "a 4097-byte token file, " + given("data.token_dtype=uint16"), exit_code=1,
               seen=error_line(error))


def test_nan_policy_skip_drops_updates_then_stops_after_the_limit(compose_config, tmp_path, fault_case, caplog):
    overrides = ("trainer.lr=1e9", "trainer.nan_policy=skip", "trainer.nan_skip_limit=2", "trainer.steps=6")
    with caplog.at_level(logging.WARNING):
        error = fails(compose_config, *overrides, run_dir=tmp_path)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 1 and "step 2:" in skipped[0]
    assert "step 3:" in str(error) and "2 steps in a row" in str(error)
    fault_case("nan_policy_skip_limit", given(*overrides), exit_code=1, seen=error_line(error))


def test_nan_policy_skip_is_refused_with_deepspeed(compose_config, tmp_path, fault_case):
    error = fails(compose_config, "trainer.nan_policy=skip", "zero=stage2", run_dir=tmp_path)
    assert "plain torch path only" in str(error)
    fault_case("nan_policy_skip_with_zero", given("trainer.nan_policy=skip", "zero=stage2"), exit_code=1,
               seen=error_line(error))


@pytest.mark.parametrize("case, overrides, expected", [
    ("mesh_does_not_fit", ("parallel.sp_size=2",), "does not fit a job of 1 rank"),
    ("seq_len_not_multiple", ("data.seq_len=100",), "not a multiple of nsa.select_size"),
    ("cuda_without_gpu", ("trainer.device=cuda",), "no CUDA device"),
    ("resume_path_not_a_checkpoint", ("trainer.resume=/nonexistent/step_1",), "is not a checkpoint directory"),
    ("missing_data_file", ("data=text", "data.path=/nonexistent/book.txt"), "does not exist"),
    ("unknown_nan_policy", ("trainer.nan_policy=ignore",), "unknown trainer.nan_policy"),
])
def test_bad_settings_stop_with_one_line(compose_config, tmp_path, fault_case, case, overrides, expected):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    error = fails(compose_config, *overrides, run_dir=tmp_path)
    assert expected in str(error)
    fault_case(case, given(*overrides), exit_code=1, seen=error_line(error))


def test_real_text_that_cannot_be_split_stops_before_any_rank(compose_config, tmp_path, fault_case):
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 1000)
    cases = [("data_directory_empty", ("data=files", f"data.path={empty}"), "is empty"),
             ("data_glob_matches_nothing", ("data=stdlib", "data.glob=**/*.zzz"), "has no file matching"),
             ("held_out_split_too_short", ("data=text", f"data.path={short}"), "eval split"),
             ("window_without_window", ("model.attention=window", "nsa.window=0"), "set nsa.window")]
    import sysconfig

    for case, overrides, expected in cases:
        run_dir = tmp_path / case
        error = fails(compose_config, *overrides, run_dir=run_dir)
        assert expected in str(error) and not run_dir.exists(), case
        fault_case(case, given(*overrides), exit_code=1, seen=error_line(error),
                   aliases={sysconfig.get_paths()["stdlib"]: "<stdlib>"})


def test_unwritable_checkpoint_dir_stops_before_any_step(compose_config, tmp_path, fault_case):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    overrides = ("trainer.checkpoint_every=2", f"trainer.checkpoint_dir={blocker / 'checkpoints'}")
    error = fails(compose_config, *overrides, run_dir=tmp_path / "run")
    assert "not writable" in str(error) and not (tmp_path / "run" / "train_log.jsonl").exists()
    fault_case("unwritable_checkpoint_dir", "`trainer.checkpoint_dir` under a regular file", exit_code=1,
               seen=error_line(error))


def _silent_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(4)], daemon=True).start()
    return server, server.getsockname()[1]


def test_a_port_that_answers_but_is_not_ray_fails_in_seconds(fault_case):
    pytest.importorskip("ray")
    from nsa_dist.launch.config import LauncherConfig
    from nsa_dist.launch.ray_actors import connect_to_ray

    server, port = _silent_server()
    started = time.monotonic()
    with server, pytest.raises(ConnectionError) as caught:
        connect_to_ray(LauncherConfig(kind="ray", address=f"127.0.0.1:{port}", connect_timeout_s=5))
    assert time.monotonic() - started < 30 and f"127.0.0.1:{port}" in str(caught.value)
    fault_case("ray_port_not_ray", "`launcher=ray launcher.address=127.0.0.1:<port>`, a TCP server that is not Ray",
               exit_code=1, seen=error_line(caught.value), aliases={str(port): "<port>"})


def test_nothing_at_the_ray_address_fails_in_seconds(fault_case):
    pytest.importorskip("ray")
    from nsa_dist.launch.config import LauncherConfig
    from nsa_dist.launch.ray_actors import connect_to_ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError) as caught:
        connect_to_ray(LauncherConfig(kind="ray", address=f"127.0.0.1:{port}", connect_timeout_s=5))
    fault_case("ray_nothing_listens", "`launcher=ray launcher.address=127.0.0.1:<port>`, nothing listening",
               exit_code=1, seen=error_line(caught.value), aliases={str(port): "<port>"})


def test_slurm_outside_a_slurm_job_says_how_to_submit(compose_config, tmp_path, fault_case, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    error = fails(compose_config, "launcher=slurm", run_dir=tmp_path)
    assert "not in a Slurm job" in str(error)
    fault_case("slurm_outside_slurm", given("launcher=slurm") + " without -m, outside Slurm", exit_code=1,
               seen=error_line(error))


def test_a_finite_run_evaluates_after_saving(compose_config, tmp_path):
    result = main(compose_config(*TINY, "trainer.steps=2"), run_dir=tmp_path)
    assert result.checkpoint.exists() and math.isfinite(result.eval_metrics["loss"])


def test_a_damaged_byte_in_a_checkpoint_named_by_path_is_named(compose_config, tmp_path, checkpoints, fault_case):
    from test_reliability_runs import flip_a_tensor_byte

    damaged = checkpoints / "step_00000004" / "model_optimizer.pt"
    flip_a_tensor_byte(damaged)
    error = fails(compose_config, "trainer.steps=6", f"trainer.resume={checkpoints / 'step_00000004'}",
                  run_dir=tmp_path / "r")
    assert f"{damaged} is damaged: its SHA-256" in str(error)
    fault_case("damaged_byte_by_path", "`trainer.resume=<step_4>` whose model_optimizer.pt has one bit flipped in a "
               "tensor", exit_code=1, seen=error_line(error))


def test_shard_batch_names_the_length_to_pad_to(fault_case):
    from types import SimpleNamespace

    from nsa_dist import shard_batch

    # shard_batch reads only the sp handle's size before it fails; a 2-rank group needs no second process here.
    sp = SimpleNamespace(size=2, rank=0)
    batch = {"input_ids": torch.zeros(1, 100, dtype=torch.long)}
    with pytest.raises(ValueError) as caught:
        shard_batch(batch, sp, select_size=16)
    assert "pad it to a multiple of 64 tokens" in str(caught.value)
    fault_case("shard_batch_padding_hint", "`shard_batch(batch, sp, select_size=16)` of 100 tokens at P = 2",
               exit_code=1, seen=error_line(caught.value))
    with pytest.raises(ValueError) as caught:
        shard_batch({"input_ids": torch.zeros(1, 102, dtype=torch.long)}, sp)
    assert "pad it to a multiple of 4 x the model's nsa select_size" in str(caught.value)
    fault_case("shard_batch_padding_hint_without_select_size", "`shard_batch(batch, sp)` of 102 tokens at P = 2",
               exit_code=1, seen=error_line(caught.value))
