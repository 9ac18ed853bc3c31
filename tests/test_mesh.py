"""The dp x sp mesh (4 gloo ranks), the parallel / zero config groups, and the FLOP count."""
import copy

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks
from torch.utils.flop_counter import FlopCounterMode

from nsa_dist.config import run_config
from nsa_dist.training.engine import ZeroConfig, deepspeed_config
from nsa_dist.nn.layer import NativeSparseAttention, NSAConfig
from nsa_dist.training.metrics import attention_flops, model_flops_per_sequence
from nsa_dist.nn.model import ModelConfig, NSATransformer
from nsa_dist.parallel import SINGLE_RANK_MESH, ExchangeLog, ParallelConfig, build_mesh, shard, unshard
from nsa_dist.nn.parallelize import parallelize


@pytest.mark.parametrize("dp,sp,world,expected", [(None, 1, 4, (4, 1)), (None, 2, 4, (2, 2)), (2, 2, 4, (2, 2)),
                                                  (1, 4, 4, (1, 4)), (None, 1, 1, (1, 1))])
def test_degrees_multiply_to_the_world(dp, sp, world, expected):
    assert ParallelConfig(dp_size=dp, sp_size=sp).degrees(world) == expected


@pytest.mark.parametrize("dp,sp,world,match", [
    (None, 3, 4, r"parallel\.sp_size=3 does not fit a job of 4 rank\(s\).*parallel\.sp_size in \[1, 2, 4\]"),
    (2, 1, 4, r"parallel\.dp_size=2 x parallel\.sp_size=1 does not fit a job of 4"),
    (3, 2, 4, r"dp x sp must equal the world size"),
])
def test_degrees_that_do_not_fit_name_the_fix(dp, sp, world, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(dp_size=dp, sp_size=sp).degrees(world)


def test_single_process_mesh_needs_no_group():
    mesh = build_mesh(ParallelConfig())  # torch.distributed not initialised: one rank
    assert mesh is SINGLE_RANK_MESH
    assert (mesh.dp_size, mesh.sp_size, mesh.rank, mesh.sequence_parallel, mesh.grad_group, mesh.device_mesh) == \
        (1, 1, 0, None, None, None)
    with pytest.raises(ValueError, match="parallel.sp_size=2 does not fit a job of 1"):
        build_mesh(ParallelConfig(sp_size=2))


def _mesh_rank(rank: int, world: int) -> None:
    mesh = build_mesh(ParallelConfig(sp_size=2, exchange="ring"))
    assert (mesh.dp_size, mesh.sp_size, mesh.dp_rank, mesh.sp_rank) == (2, 2, rank // 2, rank % 2)
    assert mesh.rank == rank and mesh.device_mesh.mesh_dim_names == ("dp", "sp")
    # dp-major: an sp group is contiguous ranks, a dp group strides by sp; gradients meet over all ranks.
    assert dist.get_process_group_ranks(mesh.sp_group) == [2 * (rank // 2), 2 * (rank // 2) + 1]
    assert dist.get_process_group_ranks(mesh.dp_group) == [rank % 2, rank % 2 + 2]
    assert dist.get_process_group_ranks(mesh.grad_group) == list(range(world))
    sp = mesh.sequence_parallel
    assert (sp.size, sp.rank, sp.exchange) == (2, rank % 2, "ring")

    # parallelize with checkpointing: the shard logits and the gradients averaged over grad_group equal
    # the full sequence on one rank (both replicas train on the same tokens here).
    torch.manual_seed(0)
    config, nsa = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16), \
        NSAConfig(block_len=8, stride=4, select_size=16, top_n=3, window=16)
    tokens = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(1))
    model = NSATransformer(config, nsa)
    expected = model(tokens)
    expected.square().mean().backward()
    twin = copy.deepcopy(model)
    twin.zero_grad()
    log = ExchangeLog()
    parallelize(twin, mesh, activation_checkpointing=True, exchange_log=log)
    got = twin(shard(tokens, sp))
    assert [s.mode for s in log.pop()] == ["ring"] * 2
    (got.square().sum() / expected.numel()).backward()
    assert len(log.pop()) == 2, "the backward did not recompute the two NSA layers"
    full = unshard(got.detach(), sp)
    assert (full - expected).norm() / expected.norm() < 1e-5
    scale = max(float(p.grad.norm()) for p in model.parameters())
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        dist.all_reduce(b.grad, group=mesh.grad_group)
        assert torch.allclose(b.grad / mesh.dp_size, a.grad, rtol=1e-4, atol=1e-6 * scale), name


def test_four_ranks_lay_out_dp_major():
    run_ranks(_mesh_rank, 4)


@pytest.mark.parametrize("option,stage", [("none", None), ("stage1", 1), ("stage2", 2), ("stage3", 3)])
def test_zero_group_options_compose(compose_config, option, stage):
    run = run_config(compose_config(f"zero={option}", "parallel.sp_size=2"))
    assert run.zero.stage == stage and run.parallel.sp_size == 2 and run.parallel.dp_size is None


def test_default_is_plain_torch_on_one_replica(compose_config):
    run = run_config(compose_config())
    assert run.zero == ZeroConfig() and not run.zero.enabled
    assert run.parallel == ParallelConfig()


@pytest.mark.parametrize("overrides,match", [
    (["parallel.sp_size=16"], r"parallel\.sp_size=16: .*data\.seq_len=512.*at most P = 8"),
    (["parallel.exchange=mail"], r"unknown parallel\.exchange='mail'"),
    (["parallel.sp_size=0"], r"parallel\.sp_size must be at least 1"),
    (["zero.stage=4"], r"zero\.stage=4.*zero=stage1\|stage2\|stage3"),
    (["zero.offload=true"], r"zero\.offload needs DeepSpeed"),
    (["trainer.checkpoint_keep=0"], r"trainer\.checkpoint_keep"),
])
def test_bad_parallel_and_zero_values_name_the_fix(compose_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_config(compose_config(*overrides))


def test_deepspeed_config_shards_stage3_and_offloads():
    cfg = deepspeed_config(ZeroConfig(stage=3, offload=True), micro_batch_size=2, grad_clip=1.0, bf16=True)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_allow_untested_optimizer"] and cfg["train_micro_batch_size_per_gpu"] == 2
    assert "offload_param" not in deepspeed_config(ZeroConfig(stage=2, offload=True), micro_batch_size=1,
                                                   grad_clip=0.0, bf16=False)["zero_optimization"]


def test_parallelize_wraps_the_blocks_of_another_model_and_refuses_one_without_nsa():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = NativeSparseAttention(32, 2, 1, 16, block_len=8, stride=4, select_size=16, top_n=3, window=16)

        def forward(self, x):
            return x + self.attn(x)

    model = torch.nn.Sequential(Block(), Block())
    x = torch.randn(1, 64, 32)
    expected = model(x)
    parallelize(model, None, activation_checkpointing=True)
    assert all(type(m).__name__ == "CheckpointWrapper" for m in model)
    assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match="no NativeSparseAttention"):
        parallelize(torch.nn.Linear(2, 2), None)


def test_attention_flops_count_the_causal_work():
    model = ModelConfig(num_heads=4, head_dim=8, num_kv_heads=2)
    # Window and selection covering the whole sequence: each is dense causal attention, T(T+1)/2 pairs.
    T = 128
    nsa = NSAConfig(block_len=16, stride=8, select_size=32, top_n=4, window=T)
    pairs = T * (T + 1) // 2
    visible_cmp = sum(max(0, (t + 1 - 16) // 8 + 1) for t in range(T))
    assert attention_flops(T, model, nsa) == 4 * 8 * (4 * pairs * 2 + 6 * visible_cmp)
    # DESIGN.md's floor for the paper's config at 64k, HQ=64, D=128: 4.4 + 2.2 + 2.2 + 1.1 ≈ 1e13 forward.
    paper_shape = ModelConfig(num_heads=64, num_kv_heads=4, head_dim=128)
    assert attention_flops(65536, paper_shape, NSAConfig()) == pytest.approx(9.9e12, rel=0.02)


@pytest.mark.parametrize("nsa", [NSAConfig(block_len=16, stride=8, select_size=32, top_n=3, window=32),
                                 NSAConfig(block_len=16, stride=8, select_size=32, top_n=3, window=0,
                                           separate_kv=True, compression="mean")])
def test_model_flops_count_the_matrix_products_a_forward_runs(nsa):
    """Beyond attention (and φ's position add, an elementwise op), the forward count is the projections,
    gates, φ's MLP, SwiGLU and the head: what torch's FLOP counter sees in mm / addmm."""
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    T = 128
    with FlopCounterMode(display=False) as counter:
        NSATransformer(config, nsa)(torch.randint(0, 64, (1, T)))
    counted = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    position_add = 2 * 2 * nsa.block_len * config.head_dim * config.num_kv_heads * ((T - nsa.block_len) // nsa.stride + 1)
    beyond_attention = (model_flops_per_sequence(T, config, nsa, training=False)
                        - config.num_layers * (attention_flops(T, config, nsa) + position_add))
    assert counted["mm"] + counted["addmm"] == beyond_attention


def test_dense_baseline_flops_count_its_own_matrix_products():
    """`model.attention=dense` has no φ and no gates: beyond its causal attention, the count is what torch's
    FLOP counter sees in mm / addmm, and the attention is 4·HQ·D per visible (query, key) pair."""
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         attention="dense")
    T = 96
    with FlopCounterMode(display=False) as counter:
        NSATransformer(config, NSAConfig())(torch.randint(0, 64, (1, T)))
    counted = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = 4 * 4 * 8 * T * (T + 1) // 2
    beyond_attention = model_flops_per_sequence(T, config, NSAConfig(), training=False) - config.num_layers * attention
    assert counted["mm"] + counted.get("addmm", 0) == beyond_attention
