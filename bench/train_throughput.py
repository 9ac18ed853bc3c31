"""Training throughput of one model with NSA against the same model with dense attention, in one run.

For each sequence length and each variant: the model is built on the device (`nsa_dist.build_model`,
seeded alike), AdamW as the trainer builds it, gradient clipping at the trainer's 1.0, bf16 autocast on
CUDA (fp32 on CPU), optional activation checkpointing (`nsa_dist.nn.parallelize`); `--warmup` untimed
then `--steps` timed optimizer steps on random tokens, batch 1. Each row holds the median step time,
tokens/s, peak memory, model FLOPs per second and utilisation (nsa_dist.training.metrics; MFU only where the
card's peak is known) and tokens/s over the baseline's at the same length.

Variants (`--variants`, comma list):
  nsa, dense         this project's NSATransformer with NSA attention / with DenseAttention (baseline: dense)
  hf_nsa, hf_sdpa    a Hugging Face LlamaForCausalLM (random weights) converted to NSA / left with
                     its own SDPA attention (baseline: hf_sdpa)

Shapes: `--preset llama-3.2-1b` (Llama-3.2-1B's config: hidden 2048, 16 layers, 32/8 heads of 64, SwiGLU
8192, vocab 128256, rope_theta 500000, tied embeddings), `--preset base|small` (conf/model/*.yaml),
`--tiny` (hidden 64, 2 layers: smaller than conf/model/tiny.yaml, for CPU smoke runs); `--layers`,
`--hidden`, ... override single fields. NSA settings from conf/nsa/<name>.yaml (`--nsa paper` is the
paper's l=32, d=16, l'=64, n=16, w=512 with the MLP compression; default paper, tiny with `--tiny`).

Peak memory is `torch.cuda.max_memory_allocated` since the variant started (weights, AdamW state and
activations) on CUDA; on CPU it is the process's max RSS, which only grows over the run (the rows say
which). A variant that runs out of GPU memory is recorded as "oom" and the run goes on.

The logits of a 128256-token vocabulary dominate memory at long lengths (64k tokens: 34 GB in fp32,
held about three times over in the backward). `--loss-chunk N` computes the LM head and the loss N
tokens at a time, recomputing each chunk in the backward, for both variants alike; without it the loss
is the trainer's (one fp32 cross-entropy over all logits). Recomputation is not counted in model FLOPs.

The two GPU questions:
    # HF Llama-3.2-1B shape, converted to NSA vs its SDPA attention, bf16, 32k and 64k tokens
    python bench/train_throughput.py --preset llama-3.2-1b --variants hf_nsa,hf_sdpa --seq-lens 32k,64k \\
        --checkpointing --loss-chunk 8192 --results-dir bench/results
    # this project's model: NSA vs dense training throughput at 8k, 32k and 64k
    python bench/train_throughput.py --preset base --nsa paper --variants nsa,dense --seq-lens 8k,32k,64k \\
        --results-dir bench/results
A CPU smoke run: python bench/train_throughput.py --tiny --seq-lens 128,256 --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nsa_dist.training import metrics
from nsa_dist.training.config import TrainConfig
from nsa_dist.nn.layer import NSAConfig
from nsa_dist.nn.model import ModelConfig
from nsa_dist.nn.build import build_model
from nsa_dist.nn.parallelize import parallelize
from nsa_dist.training.loop import build_optimizer

# variant -> (ModelConfig.kind, ModelConfig.attention, the variant its tokens/s is divided by)
VARIANTS = {"nsa": ("nsa", "nsa", "dense"), "dense": ("nsa", "dense", "dense"),
            "hf_nsa": ("hf_llama", "nsa", "hf_sdpa"), "hf_sdpa": ("hf_llama", "dense", "hf_sdpa")}
# Shapes not in conf/model; the others (base, small) are read from there.
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                         head_dim=64, intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True),
    # Llama-3.1-8B's attention and width (32/8 heads, d128); --layers takes fewer of its 32 layers where memory
    # requires, and the row's model.num_layers says how many ran
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, intermediate_size=14336, rope_theta=500000.0),
    "tiny": dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
}
CONF_SHAPES = ("base", "small")
OVERRIDES = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
             "head_dim": "head_dim", "intermediate": "intermediate_size", "vocab": "vocab_size"}
GRAD_CLIP = 1.0  # the trainer's default (TrainConfig.grad_clip): its norm is part of every step


def parse_lengths(text: str) -> list[int]:
    """"8k,32k,300" -> [8192, 32768, 300]."""
    return [int(part[:-1]) * 1024 if part.endswith("k") else int(part)
            for part in (p.strip().lower() for p in text.split(",")) if part]


def conf_group(group: str, option: str) -> dict:
    """The fields conf/<group>/<option>.yaml sets, composed by Hydra against the schemas."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="nsa_dist.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def model_config(args) -> ModelConfig:
    fields = dict(SHAPES[args.preset]) if args.preset in SHAPES else conf_group("model", args.preset)
    fields.update({OVERRIDES[flag]: value for flag, value in vars(args).items()
                   if flag in OVERRIDES and value is not None})
    return ModelConfig(**fields)


def nsa_config(args) -> NSAConfig:
    name = args.nsa or ("tiny" if args.preset == "tiny" else "paper")
    return NSAConfig(**conf_group("nsa", name))


def variant_config(model_cfg: ModelConfig, variant: str) -> ModelConfig:
    kind, attention, _ = VARIANTS[variant]
    # A random-weight Llama is trained from scratch: every gate starts open, as conf/model/hf_llama.yaml says.
    gate_init = "uniform" if kind == "hf_llama" else model_cfg.gate_init
    return dataclasses.replace(model_cfg, kind=kind, attention=attention, gate_init=gate_init)


def chunked_loss_head(model: nn.Module, chunk: int):
    """Take the LM head out of `model`'s forward (which then returns the final hidden states) and return
    `loss(hidden, targets)`: the mean cross-entropy, `chunk` tokens of logits at a time, each recomputed
    in the backward so that only one chunk's logits exist at once."""
    owner = getattr(model, "causal_lm", model)  # nsa_dist.nn.build.HFCausalLM wraps the HF model
    head = owner.lm_head
    owner.lm_head = nn.Identity()
    model.loss_head = head  # still a submodule: the optimizer, clipping and weight tying see its weight

    def chunk_loss_sum(hidden, targets):
        return F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), reduction="sum")

    def loss(hidden, targets):
        total = sum(checkpoint(chunk_loss_sum, hidden[:, s:s + chunk], targets[:, s:s + chunk], use_reentrant=False)
                    for s in range(0, hidden.shape[1], chunk))
        return total / targets.numel()

    return loss


def full_loss(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


PRECISIONS = ("autocast", "bf16")  # fp32 weights under bf16 autocast (most training loops); bf16 weights


def time_variant(model_cfg: ModelConfig, nsa: NSAConfig, seq_len: int, args, device: torch.device,
                 precision: str = "autocast") -> dict:
    """Build, warm up and time one variant; the measurements of its row."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)  # both variants of a length start from the same weights where they share them
    model = build_model(model_cfg, nsa).to(device)
    if precision == "bf16" and cuda:
        model = model.to(torch.bfloat16)
    loss_fn = chunked_loss_head(model, args.loss_chunk) if args.loss_chunk else full_loss
    model = parallelize(model, None, activation_checkpointing=args.checkpointing)
    model.train()
    optimizer = build_optimizer(model, TrainConfig())
    tokens = torch.randint(model_cfg.vocab_size, (1, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and precision == "autocast")

    def step():
        with autocast:
            out = model(inputs)
            loss = loss_fn(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    flops = metrics.model_flops_per_sequence(seq_len, model_cfg, nsa)
    peak = metrics.peak_flops_per_device(device, None)
    return dict(step_s=step_s, step_s_all=seconds, tokens_per_s=seq_len / step_s,
                peak_memory_bytes=metrics.peak_memory_bytes(device),
                model_tflops_per_s=flops / step_s / 1e12, mfu=flops / step_s / peak if peak else None,
                parameters=sum(p.numel() for p in model.parameters()))


def measure(model_cfg: ModelConfig, nsa: NSAConfig, seq_len: int, variant: str, args, device,
            precision: str = "autocast") -> dict:
    """One row; out of GPU memory, its measurements are "oom" and the memory is freed for the next."""
    row = dict(seq_len=seq_len, variant=variant, baseline=VARIANTS[variant][2],
               precision=precision if device.type == "cuda" else "fp32",
               peak_memory_source=("cuda max_memory_allocated" if device.type == "cuda"
                                   else "cpu process max RSS (cumulative over the run)"))
    try:
        row.update(time_variant(variant_config(model_cfg, variant), nsa, seq_len, args, device, precision))
    except torch.cuda.OutOfMemoryError as error:
        row.update({key: "oom" for key in ("step_s", "tokens_per_s", "peak_memory_bytes", "model_tflops_per_s",
                                            "mfu")}, oom_message=str(error).splitlines()[0][:200])
    # the failed step's tensors are unreachable once the exception is gone; give their memory back
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """`ratio`: tokens/s over the baseline's at the same length and precision; None where either has no number."""
    speed = {(r["seq_len"], r.get("precision"), r["variant"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        mine, base = r["tokens_per_s"], speed.get((r["seq_len"], r.get("precision"), r["baseline"]))
        numbers = all(isinstance(x, (int, float)) for x in (mine, base))
        r["ratio"] = mine / base if numbers else ("oom" if mine == "oom" else None)


def table(rows: list[dict]) -> str:
    def cell(value, fmt):
        return value if isinstance(value, str) else "-" if value is None else format(value, fmt)

    lines = [f"{'seq_len':>8} {'prec':<8} {'variant':<8} {'step ms':>10} {'tokens/s':>11} {'peak GiB':>9} "
             f"{'TFLOP/s':>8} {'MFU':>6} {'x base':>7}"]
    for r in rows:
        step_ms = r["step_s"] * 1e3 if isinstance(r["step_s"], float) else r["step_s"]
        mem = r["peak_memory_bytes"] / 2**30 if isinstance(r["peak_memory_bytes"], int) else r["peak_memory_bytes"]
        mfu = 100 * r["mfu"] if isinstance(r["mfu"], float) else r["mfu"]
        lines.append(f"{r['seq_len']:>8} {r.get('precision', ''):<8} {r['variant']:<8} {cell(step_ms, '.1f'):>10} "
                     f"{cell(r['tokens_per_s'], '.0f'):>11} {cell(mem, '.2f'):>9} "
                     f"{cell(r['model_tflops_per_s'], '.2f'):>8} {cell(mfu, '.1f'):>6} "
                     f"{cell(r.get('ratio'), '.3f'):>7}")
    return "\n".join(lines)


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_report(report: dict, args) -> list[Path]:
    paths = [Path(args.json)] if args.json else []
    if args.results_dir:
        card = report["card"].replace("NVIDIA ", "").replace(" ", "_")
        paths.append(Path(args.results_dir) / datetime.date.today().isoformat() / f"train_throughput_{card}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=(*SHAPES, *CONF_SHAPES), help="model shape")
    p.add_argument("--tiny", dest="preset", action="store_const", const="tiny", help="same as --preset tiny")
    for flag in OVERRIDES:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help=f"override {OVERRIDES[flag]}")
    p.add_argument("--nsa", default=None, help="conf/nsa/<name>.yaml: paper, fla or tiny (default paper; tiny "
                                               "with --tiny)")
    p.add_argument("--variants", default="nsa,dense", help=f"comma list from {', '.join(VARIANTS)}")
    p.add_argument("--seq-lens", default="8k,32k,64k", help="tokens per sequence, e.g. 8k,32k,64k")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel compilation, allocator)")
    p.add_argument("--precision", default="autocast", help=f"comma list from {PRECISIONS}: fp32 weights under bf16 "
                                                           "autocast, or bf16 weights (CUDA; CPU runs fp32)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of each decoder block")
    p.add_argument("--loss-chunk", type=int, default=0, help="LM head and loss this many tokens at a time "
                                                             "(0: all at once, as the trainer)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--results-dir", default=None, help="also write <dir>/<YYYY-MM-DD>/train_throughput_<card>.json")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    unknown += [x for x in args.precision.split(",") if x not in PRECISIONS]
    if unknown or args.steps < 1 or args.warmup < 0 or args.loss_chunk < 0:
        p.error(f"need variants from {tuple(VARIANTS)} and precisions from {PRECISIONS} (got {unknown}), "
                "--steps >= 1, --warmup >= 0, --loss-chunk >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg, nsa = model_config(args), nsa_config(args)
    variants = args.variants.split(",")
    report = dict(card=card_name(device), versions=versions(), command=shlex.join(["python", *sys.argv]),
                  dtype="bfloat16 (see each row's precision)" if device.type == "cuda" else "float32", batch_size=1,
                  steps=args.steps, warmup=args.warmup, checkpointing=args.checkpointing, loss_chunk=args.loss_chunk,
                  peak_flops_per_device=metrics.peak_flops_per_device(device, None),
                  # kind and attention are each row's variant's (VARIANTS), not the preset's
                  model={k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("kind", "attention")},
                  nsa=dataclasses.asdict(nsa), rows=[])
    print(f"{report['card']}: {args.preset} shape, nsa={nsa}, {report['dtype']}", flush=True)
    precisions = args.precision.split(",") if device.type == "cuda" else ["fp32"]
    for seq_len in parse_lengths(args.seq_lens):
        for precision, variant in itertools.product(precisions, variants):
            report["rows"].append(measure(model_cfg, nsa, seq_len, variant, args, device, precision))
            add_ratios(report["rows"])
            print(table(report["rows"][-1:]).splitlines()[-1], flush=True)
            write_report(report, args)  # after every row: a crash later keeps what was measured
    print(table(report["rows"]))
    for path in write_report(report, args):
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
