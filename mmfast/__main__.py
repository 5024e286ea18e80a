"""Command line: ``python -m mmfast <command>``; ``bench`` times the losses against eager and compile."""

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
    from mmfast import bench

    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
