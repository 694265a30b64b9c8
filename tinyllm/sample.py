"""`tinyllm sample`: generate text from a checkpoint."""
import argparse
import os
import sys
from pathlib import Path

import numpy

from tinyllm import backend


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
    """The GPT of a checkpoint, in eval mode, and the checkpoint's state.json."""
    from tinyllm.checkpoint import load_checkpoint
    from tinyllm.model import GPT, GPTConfig
    model_state, _, state = load_checkpoint(ckpt_dir)
    model = GPT(GPTConfig.from_dict(state["model_config"]), dtype=state["config"].get("dtype", "float32"),
                device=device)
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


def build_parser():
    p = argparse.ArgumentParser(prog="tinyllm sample", description="Generate text from a trained GPT.")
    p.add_argument("--ckpt", required=True, help="a run directory (--out of train) or its ckpt/ directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        ckpt_dir, run_dir = find_checkpoint(args.ckpt)
        model, state = load_model(ckpt_dir, args.device)
        tokenizer = load_run_tokenizer(run_dir, state)
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
        idx = numpy.array([prompt] * args.num_samples, dtype=numpy.int64)
        out = model.generate(backend.to_device(idx, args.device), args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, use_cache=not args.no_cache)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        print(f"tinyllm sample: error: {e}", file=sys.stderr)
        return 2
    for i, row in enumerate(backend.to_numpy(out)):
        if i:
            print("\n" + "-" * 40)
        print(tokenizer.decode(row.tolist()))
    return 0
