"""Command line: ``python -m mmfast <command>``; ``bench`` times the losses against eager and compile, ``demo`` runs
the end-to-end KD recipes on AV-Digits and writes their tables and figures."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfast", description="mmfast command line")
    commands = parser.add_subparsers(dest="command", title="commands")
    bench_parser = commands.add_parser(
        "bench", help="loss forward+backward: mmfast backends vs eager vs torch.compile",
        description="Time each loss's forward+backward for every available mmfast backend against the eager "
                    "PyTorch loss and its torch.compile, on the device present, and print a table per case.",
    )
    from mmfast import bench, demo

    bench.add_arguments(bench_parser)
    demo_parser = commands.add_parser(
        "demo", help="end-to-end KD recipes on AV-Digits: tables, curves and reliability diagrams",
        description="Train the MST-Distill, ensemble-KD and UME/UMT recipes on the offline AV-Digits data and the "
                    "one-step diffusion distillation of a 2-D ring; write results.md, results.json, curves.png, "
                    "reliability.png and ring_<divergence>.png to --out and print the tables. Never downloads.",
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        return demo.run(args, argv)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
