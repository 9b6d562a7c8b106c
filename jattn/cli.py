"""The ``jattn`` console script: ``jattn papers`` prints the catalogue."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jattn", description="jattn: attention methods in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    papers = commands.add_parser("papers", help="print the catalogue of the 75 papers")
    papers.add_argument("--status", choices=("planned", "partial", "works"), help="only rows with this status")
    args = parser.parse_args(argv)
    if args.command == "papers":
        from jattn.catalog import PAPERS, format_table
        rows = [p for p in PAPERS if args.status is None or p.status == args.status]
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
