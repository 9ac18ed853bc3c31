"""How much of the selected K/V lies on other ranks, on the selections a (trained) model really makes.

Runs an NSATransformer on one device over a sequence of N tokens — the weights and the data task of
a training run's `final.pt`, or random weights and random tokens without one — records each layer's
top-n block ids (nsa_dist.analysis.selection_stats: recomputed from the layer's own projections and φ with
the public ops, by a forward pre-hook; the layer is not changed), and for every rank of a zigzag
split over P ranks reports the fraction of its queries' selections that are remote, the bytes it would fetch
(the union of remote blocks, with their ids) against the all-gather of all K/V, and which way the
library's fallback rule would move each layer's selected K/V.

    python bench/exchange_fraction.py --checkpoint outputs/RUN/final.pt --n 4k,16k --p 1,2,4,8 --json ef.json
    python bench/exchange_fraction.py --n 1k --p 1,2,4          # random tiny model (conf/model/tiny, conf/nsa/tiny)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # project.py beside this file holds the byte model

from project import exchange_bytes, parse_sizes, remote_blocks, split_problem, Shape  # noqa: E402

from nsa_dist.data.sources import DataConfig, build_source  # noqa: E402
from nsa_dist.analysis.selection_stats import selected_blocks_per_layer  # noqa: E402
from nsa_dist.nn.layer import NSAConfig  # noqa: E402
from nsa_dist.parallel.sharding import chunk_owner, rank_chunks  # noqa: E402
from nsa_dist.training.checkpoint import load_final_model, model_from_config  # noqa: E402


def conf_groups(model_conf: str, nsa_conf: str) -> tuple[dict, dict]:
    """The model and nsa sections that `model=<model_conf> nsa=<nsa_conf>` compose to."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model_conf}", f"nsa={nsa_conf}"])
    return OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.nsa, resolve=True)


def load_model(checkpoint: Path | None, model_conf: str, nsa_conf: str, seed: int):
    """The model and the run config it was trained with (None for random weights), on the reference
    backend: the selections are read on the CPU."""
    if checkpoint is None:
        torch.manual_seed(seed)
        model_values, nsa_values = conf_groups(model_conf, nsa_conf)
        return model_from_config({"model": model_values, "nsa": nsa_values}, backend="torch").eval(), None
    model, config, _ = load_final_model(checkpoint, backend="torch")
    return model, config


def sample_tokens(config: dict | None, vocab_size: int, N: int, batch: int, seed: int) -> torch.Tensor:
    """A batch from the task the checkpoint trained on (at length N), or random tokens."""
    generator = torch.Generator().manual_seed(seed)
    if config is not None:
        try:
            known = {f.name for f in fields(DataConfig)}
            data = DataConfig(**{**{k: v for k, v in config["data"].items() if k in known}, "seq_len": N})
            return build_source(data, vocab_size=vocab_size, generator=generator).sample(batch).inputs
        except (ValueError, FileNotFoundError) as err:
            print(f"random tokens: the training data does not give {N} tokens here ({err})", file=sys.stderr)
    return torch.randint(0, vocab_size, (batch, N), generator=generator)


def remote_selection_fraction(idx_chunks: list[torch.Tensor], rank: int, P: int, chunk_len: int,
                              select_size: int) -> float:
    """Of the (query, head, slot) selections of the rank's queries, the fraction whose block is remote."""
    ids = torch.cat([i.flatten() for i in idx_chunks]).long()
    ids = ids[ids >= 0]
    if not ids.numel():
        return 0.0
    return float((chunk_owner(ids * select_size // chunk_len, P) != rank).float().mean())


def split_layer(idx: torch.Tensor, layer: int, P: int, N: int, nsa: NSAConfig, row_bytes: int) -> tuple[list, dict]:
    """Per-rank rows and the layer's summary for one zigzag split of `idx [B, N, H, n]`."""
    C = N // (2 * P)
    rows, wanted = [], []
    for r in range(P):
        chunks = [idx[:, c * C:(c + 1) * C] for c in rank_chunks(r, P)]
        wanted.append(remote_blocks(chunks, r, P, C, nsa.select_size))
        rows.append({"layer": layer, "P": P, "N": N, "rank": r,
                     "remote_fraction": remote_selection_fraction(chunks, r, P, C, nsa.select_size),
                     "remote_blocks": sum(wanted[-1].values())})
    xb = exchange_bytes(wanted, P, C, row_bytes, nsa.select_size)
    for row, received in zip(rows, xb.received):
        row.update(fetch_bytes=received, allgather_bytes=xb.allgather_bytes,
                   fetch_over_allgather=received / xb.allgather_bytes if xb.allgather_bytes else 0.0)
    summary = {"layer": layer, "P": P, "N": N,
               "mean_remote_fraction": statistics.fmean(r["remote_fraction"] for r in rows),
               "max_remote_fraction": max(r["remote_fraction"] for r in rows),
               "max_fetch_bytes": max(xb.received), "allgather_bytes": xb.allgather_bytes,
               "choice": "all-gather" if xb.fall_back else ("exchange" if P > 1 else "none (P = 1)")}
    return rows, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a training run's final.pt; random weights without it")
    p.add_argument("--model", default="tiny", help="conf/model/ entry for random weights")
    p.add_argument("--nsa", default="tiny", help="conf/nsa/ entry for random weights")
    p.add_argument("--n", default="1k", help="sequence lengths (k = 1024, M = 1024^2)")
    p.add_argument("--p", default="1,2,4", help="sequence-parallel sizes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bytes-per-element", type=int, default=2, help="K/V element size moved (2: bf16 on GPUs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, config = load_model(args.checkpoint, args.model, args.nsa, args.seed)
    device = torch.device(args.device)
    model = model.to(device)
    nsa, mc = model.nsa, model.config
    row_bytes = args.batch * mc.num_kv_heads * 2 * mc.head_dim * args.bytes_per_element
    split_shape = Shape(heads=mc.num_heads, kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, nsa=nsa)
    rows, layers = [], []
    for N in parse_sizes(args.n):
        tokens = sample_tokens(config, mc.vocab_size, N, args.batch, args.seed).to(device)
        picked = selected_blocks_per_layer(model, tokens)
        for P in parse_sizes(args.p):
            problem = split_problem(split_shape, P, N)
            if problem:
                print(f"skip P={P} N={N}: {problem}", file=sys.stderr)
                continue
            for layer, idx in enumerate(picked):
                per_rank, summary = split_layer(idx.cpu(), layer, P, N, nsa, row_bytes)
                rows += per_rank
                layers.append(summary)
    print(f"{'layer':>5} {'P':>3} {'N':>8} {'remote sel. mean':>16} {'max':>6} {'fetch/all-gather max':>20} choice")
    for s in layers:
        ratio = s["max_fetch_bytes"] / s["allgather_bytes"] if s["allgather_bytes"] else 0.0
        print(f"{s['layer']:>5} {s['P']:>3} {s['N']:>8} {s['mean_remote_fraction']:>16.3f} "
              f"{s['max_remote_fraction']:>6.3f} {ratio:>20.3f} {s['choice']}")
    result = {"kind": "exchange_fraction", "checkpoint": str(args.checkpoint) if args.checkpoint else None,
              "bytes_per_element": args.bytes_per_element, "batch": args.batch, "row_bytes": row_bytes,
              "select_size": nsa.select_size, "layers": layers, "ranks": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
