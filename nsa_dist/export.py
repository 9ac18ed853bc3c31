"""`python -m nsa_dist.export RUN/final.pt OUT_DIR`: a `model=hf_llama` run's weights as a Hugging Face directory.

The directory is what `save_pretrained` writes for the converted model: `config.json` (with the NSAConfig
under `nsa_config`), `model.safetensors` (the Llama weights under their usual names, and the NSA gates and
φ beside them) and `generation_config.json`. It loads back with the classes people use:

    model = LlamaForCausalLM.from_pretrained(OUT_DIR)                  # the Llama weights
    model = nsa_dist.convert_attention(model, pretrained=OUT_DIR)      # NSA again, with its trained gates and φ

and then computes the logits the run's final weights computed. A `model.attention=dense` run exports a
plain Llama. `final.pt` is verified before anything is written; an existing OUT_DIR is refused unless
`--overwrite`.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from nsa_dist.eval import OneLineParser
from nsa_dist.training.checkpoint import load_final_model

log = logging.getLogger(__name__)


def export(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the Hugging Face directory of a `model=hf_llama` run's `final.pt` into `out`; returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose a new directory, or pass --overwrite")
    model, config, step = load_final_model(checkpoint, backend="torch")
    kind = config["model"].get("kind", "nsa")
    if kind != "hf_llama":
        raise ValueError(f"{checkpoint} is a model.kind={kind} run: nsa_dist's own decoder has no Hugging Face "
                         "class to export to; load it with nsa_dist.training.checkpoint.load_final_model, or train "
                         "with model=hf_llama")
    causal_lm = model.causal_lm
    backend = config["nsa"].get("backend", "auto")
    if hasattr(causal_lm.config, "nsa_config"):
        causal_lm.config.nsa_config = {**causal_lm.config.nsa_config, "backend": backend}  # as trained, not as read
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    causal_lm.save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)  # a reader never sees half a directory
    log.info("exported %s (step %s, %s attention) to %s", checkpoint, step, config["model"].get("attention"), out)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m nsa_dist.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a model=hf_llama run's final.pt")
    p.add_argument("out", type=Path, help="the Hugging Face directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT_DIR")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"nsa_dist.export: error: {e}") from None
    print(f"load it with: LlamaForCausalLM.from_pretrained({str(out)!r}), then "
          f"nsa_dist.convert_attention(model, pretrained={str(out)!r})")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
