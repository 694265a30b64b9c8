"""The `tinyllm` command (also `python -m tinyllm`): prepare, train, sample, plot, gradcheck."""
import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is a ValueError that `main` prints as one line (no usage block)."""

    def error(self, message):
        raise ValueError(message)


def cmd_gradcheck(args):
    from tinyllm.autograd import OPS
    from tinyllm.cases import load_all, run_all
    if args.only:
        load_all()  # the layers and the model register ops of their own
        unknown = sorted(set(args.only) - set(OPS))
        if unknown:
            raise ValueError(f"--only: no op named {', '.join(unknown)}; the ops are {', '.join(sorted(OPS))}")
    rows = run_all(device=args.device, only=set(args.only) if args.only else None)
    width = max(len(r[0]) for r in rows)
    print(f"{'op':<{width}}  cases  checks  worst rel. error  seconds  result")
    failed = 0
    for name, cases, checks, worst, seconds, failure in rows:
        ok = failure is None and cases > 0 and worst < 1e-6
        failed += not ok
        result = "pass" if ok else ("NO CASE" if cases == 0 else "FAIL")
        print(f"{name:<{width}}  {cases:5d}  {checks:6d}  {worst:15.2e}  {seconds:7.2f}  {result}")
        if failure:
            print(f"    {failure}")
    print(f"{len(rows) - failed} of {len(rows)} ops pass (float64 central differences, worst relative "
          "error < 1e-6 and within gradcheck's atol/rtol)")
    return 1 if failed else 0


def cmd_prepare(args):
    from tinyllm.data import prepare_dataset
    prepare_dataset(args.dataset, args.out, input_path=args.input, vocab_size=args.vocab_size,
                    gpt2_dir=args.gpt2_dir)
    return 0


def cmd_train(args):
    from tinyllm.train import main as train_main
    return train_main(args.rest)


def cmd_sample(args):
    from tinyllm.sample import main as sample_main
    return sample_main(args.rest)


def cmd_plot(args):
    from tinyllm.plot import plot_run
    path = plot_run(args.run_dir, args.output)
    print(f"wrote {path}")
    return 0


def build_parser():
    parser = ArgumentParser(prog="tinyllm", description="A GPT built from first principles.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="finite-difference check of every op and layer; prints a table")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--only", nargs="*", help="op names to show (e.g. MatMul LayerNorm)")
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("prepare", help="tokenize a dataset into train.bin/val.bin")
    p.add_argument("dataset", choices=["pystdlib", "shakespeare_char", "shakespeare", "text"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input", help="a local text file (skips the download)")
    p.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size")
    p.add_argument("--gpt2-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    p.set_defaults(func=cmd_prepare)

    # train and sample parse their own (long) option lists
    p = sub.add_parser("train", help="train a GPT (no arguments: the embedded default, ~2 minutes on a CPU)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("plot", help="draw a run's loss curves to a PNG (needs matplotlib)")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in ("train", "sample"):  # they parse their own long option lists
            args = argparse.Namespace(func=cmd_train if argv[0] == "train" else cmd_sample, rest=argv[1:])
        else:
            args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # bad input, missing files, no network: one line
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        command = f"tinyllm {argv[0]}" if argv and not argv[0].startswith("-") else "tinyllm"
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
