"""Does a small NSATransformer learn a retrieval task on CPU, with sparse NSA and with full attention?

Trains each model for the same steps, on the same batches (one data seed), from the same initial
seed, with the loss on the answers only, and evaluates on a held-out stream. Prints a table and
writes JSON with the learning curves.

The dense baseline is the same model with `attention="dense"` (full causal attention, the trainer's
`model.attention=dense`); `--models window-dense` keeps the older baseline, NSA with a window and
top-n that cover the whole sequence. The sparse model uses the NSA settings given, whose window and
local blocks should reach less far back than `--min-distance`, so that only selection can find the pairs.

    python bench/learn_retrieval.py --json learn_retrieval.json   # needle at 128 tokens, about 4 min on CPU
    python bench/learn_retrieval.py --seq-len 64,128 --results-dir bench/results   # one results file per day and card

`--results-dir DIR` writes `DIR/<YYYY-MM-DD>/retrieval_<card>.json` (docs/retrieval.md): the command,
card, torch version, task settings, and one entry per (model, length) with its final answer accuracy,
steps, tokens trained on and seed.

MQAR (--task mqar) needs far more steps than a CPU affords: at 64 tokens it stayed near 0.3
answer accuracy after 200 steps, where the needle reaches 0.99.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import torch

from nsa_dist import ModelConfig, NSAConfig, NSATransformer
from nsa_dist.data.tasks import MQARTask, NeedleTask, TokenLayout, answer_accuracy, answer_loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("mqar", "needle"), default="needle")
    p.add_argument("--models", default="dense,nsa", help="comma list of dense, nsa and window-dense")
    p.add_argument("--seq-len", default="128", help="context lengths, comma-separated: each trains its own models")
    p.add_argument("--num-pairs", type=int, default=16, help="mqar: key-value pairs per window")
    p.add_argument("--num-queries", type=int, default=16, help="mqar: queries per window")
    p.add_argument("--min-distance", type=int, default=64, help="mqar: fewest tokens from a value to its query")
    p.add_argument("--value-len", type=int, default=2, help="needle: value tokens")
    p.add_argument("--distractors", type=int, default=0, help="needle: needles with other keys")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle: depths evaluated one by one at the end")
    p.add_argument("--key-vocab", type=int, default=8)
    p.add_argument("--value-vocab", type=int, default=8)
    p.add_argument("--filler-vocab", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block-len", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--select-size", type=int, default=16)
    p.add_argument("--top-n", type=int, default=4, help="selected blocks, the initial and 2 local ones included")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--all-tokens-weight", type=float, default=0.0, help="weight of the loss over every target")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="where to write the results")
    p.add_argument("--results-dir", default=None, help="write DIR/<date>/retrieval_<card>.json as well")
    return p.parse_args(argv)


def make_task(args, seed: int, depth=(0.0, 1.0)):
    layout = TokenLayout(vocab_size=args.filler_vocab + args.key_vocab + args.value_vocab,
                         filler_vocab=args.filler_vocab, key_vocab=args.key_vocab, value_vocab=args.value_vocab)
    generator = torch.Generator().manual_seed(seed)
    if args.task == "mqar":
        # pairs start after the initial selection block, which NSA attends to whatever it selects
        return MQARTask(seq_len=args.seq_len, num_pairs=args.num_pairs, num_queries=args.num_queries,
                        min_distance=args.min_distance, pair_start=args.select_size, layout=layout,
                        generator=generator)
    return NeedleTask(seq_len=args.seq_len, value_len=args.value_len, num_distractors=args.distractors,
                      depth=depth, layout=layout, generator=generator)


def nsa_settings(args, kind: str) -> NSAConfig:
    sparse = NSAConfig(block_len=args.block_len, stride=args.stride, select_size=args.select_size, top_n=args.top_n,
                       window=args.window, backend="torch")
    if kind != "window-dense":
        return sparse
    blocks = -(-args.seq_len // args.select_size)
    return NSAConfig(block_len=args.block_len, stride=args.stride, select_size=args.select_size,
                     top_n=max(blocks, sparse.num_init + sparse.num_local), window=args.seq_len, backend="torch")


def evaluate(model, batches, device) -> dict:
    model.eval()
    scores = []
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            logits = model(batch.inputs)
            scores.append({**answer_accuracy(logits, batch), "loss": float(answer_loss(logits, batch))})
    model.train()
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def train(args, kind: str, eval_batches, depth_batches) -> dict:
    torch.manual_seed(args.seed)
    task = make_task(args, args.seed)
    config = ModelConfig(vocab_size=task.layout.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim)
    config = replace(config, attention="dense" if kind == "dense" else "nsa")
    nsa = nsa_settings(args, kind)
    model = NSATransformer(config, nsa).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = task.sample(args.batch_size).to(args.device)
        loss = answer_loss(model(batch.inputs), batch, args.all_tokens_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            train_seconds = time.perf_counter() - start
            point = {"step": step, "train_loss": float(loss.detach()), "seconds": round(train_seconds, 1),
                     **evaluate(model, eval_batches, args.device)}
            curve.append(point)
            print(f"  {kind:5s} step {step:4d}  loss {point['loss']:.3f}  answer acc {point['token']:.3f}  "
                  f"exact {point['exact']:.3f}  {train_seconds:.0f}s", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    by_depth = {depth: evaluate(model, batches, args.device)["token"] for depth, batches in depth_batches.items()}
    if by_depth:
        print(f"  {kind:5s} answer acc by needle depth: " + "  ".join(f"{d}: {a:.3f}" for d, a in by_depth.items()))
    return {"model": kind, "seq_len": args.seq_len, "accuracy": curve[-1]["token"], "steps": args.steps,
            "tokens": args.steps * args.batch_size * args.seq_len, "seed": args.seed, "attention": config.attention,
            "nsa": asdict(nsa), "final": curve[-1], "curve": curve, "seconds": seconds, "accuracy_by_depth": by_depth}


def card_name(device: str) -> str:
    """The device as results files name it: `cpu`, or the GPU's name without the vendor (`H200`)."""
    if not device.startswith("cuda"):
        return "cpu"
    return torch.cuda.get_device_name(torch.device(device)).removeprefix("NVIDIA ").replace(" ", "_")


def train_at_length(args, seq_len: int) -> list[dict]:
    """Every model of `--models` trained and evaluated at `seq_len` on the same batches."""
    args = argparse.Namespace(**{**vars(args), "seq_len": seq_len})
    held_out = make_task(args, args.seed + 1_000_003)
    eval_batches = [held_out.sample(args.batch_size) for _ in range(args.eval_batches)]
    depth_batches = {}
    if args.task == "needle":
        for i, depth in enumerate(float(d) for d in args.depths.split(",")):
            at_depth = make_task(args, args.seed + 2_000_003 + i, depth=depth)
            depth_batches[depth] = [at_depth.sample(args.batch_size) for _ in range(args.eval_batches)]
    print(f"{args.task}: seq_len {seq_len}, chance {1 / args.value_vocab:.3f}, {args.steps} steps of "
          f"{args.batch_size}", flush=True)
    return [train(args, kind, eval_batches, depth_batches) for kind in args.models.split(",")]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [r for n in args.seq_len.split(",") for r in train_at_length(args, int(n))]
    print("\n| model | seq_len | steps | answer acc | exact | answer loss | seconds |\n|---|---|---|---|---|---|---|")
    for r in results:
        f = r["final"]
        print(f"| {r['model']} | {r['seq_len']} | {f['step']} | {f['token']:.3f} | {f['exact']:.3f} | {f['loss']:.3f} "
              f"| {r['seconds']} |")
    command = "python bench/learn_retrieval.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                      else argv))
    record = {"kind": "retrieval", "date": date.today().isoformat(), "card": card_name(args.device),
              "torch": torch.__version__, "command": command, "task": args.task, "chance": 1 / args.value_vocab,
              "args": vars(args), "results": results}
    paths = [Path(args.json)] if args.json else []
    if args.results_dir:
        paths.append(Path(args.results_dir) / record["date"] / f"retrieval_{record['card']}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
    return results


if __name__ == "__main__":
    main()
