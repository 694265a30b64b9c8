"""`tinyllm sample`: generate text from a checkpoint."""
import argparse
import os
import sys
from pathlib import Path

import numpy

from tinyllm import backend

# What `tinyllm sample` does when not told otherwise; the sample printed at the end of
# `tinyllm train` uses the very same settings.
SAMPLE_DEFAULTS = {"prompt": "\n", "max_new_tokens": 200, "temperature": 0.8, "top_k": None, "top_p": None,
                   "seed": None}


def find_checkpoint(path):
    """Accept a run directory (holding ckpt/) or a checkpoint directory (holding state.json)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path, path.parent
    if (path / "ckpt" / "state.json").is_file():
        return path / "ckpt", path
    raise ValueError(f"{path} holds no checkpoint (no state.json in it or in {path / 'ckpt'}); "
                     "pass the --out directory of a training run")


def load_model(ckpt_dir, device="cpu"):
    """The GPT of a checkpoint, in eval mode, and the checkpoint's state.json.

    Everything is checked first (load_run_checkpoint); the optimizer's file is not read."""
    from tinyllm.checkpoint import CheckpointError, load_run_checkpoint
    from tinyllm.model import GPT
    config, model_state, _, state = load_run_checkpoint(ckpt_dir, optimizer=False)
    try:
        model = GPT(config, dtype=state["config"].get("dtype", "float32"), device=device)
    except MemoryError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: the model of its state.json does not fit in "
                              f"memory ({config})") from None
    model.load_state_dict(model_state)
    return model.eval(), state


def load_run_tokenizer(run_dir, state):
    from tinyllm.tokenizer import load_tokenizer
    candidates = [Path(run_dir) / state["tokenizer"]["file"],
                  Path(state["tokenizer"]["data_dir"]) / "tokenizer.txt"]
    for path in candidates:
        if path.is_file():
            return load_tokenizer(path)
    raise ValueError(f"the tokenizer of this run is missing (looked in {', '.join(map(str, candidates))})")


def generate_text(model, tokenizer, *, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                  num_samples=1, device="cpu", use_cache=True):
    """`num_samples` continuations of `prompt` (each includes the prompt), as strings."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    idx = numpy.array([ids] * num_samples, dtype=numpy.int64)
    out = model.generate(backend.to_device(idx, device), max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache)
    return [tokenizer.decode(row.tolist()) for row in backend.to_numpy(out)]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser():
    from tinyllm.cli import ArgumentParser
    d = SAMPLE_DEFAULTS
    p = ArgumentParser(prog="tinyllm sample", description="Generate text from a trained GPT.")
    p.add_argument("--ckpt", required=True, help="a run directory (--out of train) or its ckpt/ directory")
    p.add_argument("--prompt", default=d["prompt"], help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help=f"tokens to generate, 0 or more (default: {d['max_new_tokens']})")
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help=f"0 means greedy (default: {d['temperature']})")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="keep the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=d["top_p"],
                   help="keep the likeliest tokens whose probabilities add up to p, in (0, 1] (default: all)")
    p.add_argument("--seed", type=int, default=d["seed"], help="for repeatable samples (default: a fresh one)")
    p.add_argument("--num-samples", type=_positive_int, default=1, help="how many samples, 1 or more (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    return p


def main(argv=None):
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        ckpt_dir, run_dir = find_checkpoint(args.ckpt)
        model, state = load_model(ckpt_dir, args.device)
        tokenizer = load_run_tokenizer(run_dir, state)
        texts = generate_text(model, tokenizer, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              num_samples=args.num_samples, device=args.device, use_cache=not args.no_cache)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        print(f"tinyllm sample: error: {e}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(text)
    return 0
