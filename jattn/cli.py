"""The ``jattn`` console script.

* ``jattn papers [--status S] [--methods]`` prints the catalogue; its ``Attention(method=)`` column names
  each paper's ``jattn.nn.Attention(method=...)`` method; ``--methods`` also prints every method's config
  keys, defaults and meaning.
* ``jattn show-mask NAME --out FILE.png [--set key=value ...] [--head H]`` draws a named pattern from
  ``jattn.patterns``; ``jattn show-mask --list`` lists the names, their help and their options.
  ``--head`` picks the head of a per-head pattern (s2, moa, sinklora_*); on a pattern that is the same
  for every head it has no effect and a note on stderr says so. Large patterns are drawn tile by tile
  and too large ones refused with a message (see ``jattn.patterns``): no ``[T, S]`` mask is allocated
  beyond ``jattn.patterns.DENSE_LIMIT`` elements.

Usage errors (an unknown name, a bad option) exit with status 2 and a message naming what arrived and
what was expected, as argparse does for its own errors.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="jattn", description="jattn: attention methods in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    papers = commands.add_parser("papers", help="print the catalogue of the 75 papers")
    papers.add_argument("--status", choices=("planned", "partial", "works"), help="only rows with this status")
    papers.add_argument("--methods", action="store_true",
                        help="also print each jattn.nn.Attention(method=...) name with its config keys")
    show = commands.add_parser(
        "show-mask", help="draw a named attention pattern to an image file",
        description="Draw a named attention pattern (see --list) to an image file.")
    show.add_argument("name", nargs="?", metavar="NAME", help="pattern name (see --list)")
    show.add_argument("--list", action="store_true", help="print the pattern names, their help and options")
    show.add_argument("--out", metavar="FILE.png", help="image file to write (format from the suffix)")
    show.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                      help="set a pattern option, e.g. --set seq=128 --set block=16 (repeatable)")
    show.add_argument("--head", type=int, default=None, metavar="H",
                      help="head to draw for a per-head pattern (default 0); no effect on the others")
    return parser, {"papers": papers, "show-mask": show}


# ------------------------------------------------------------------------------------------ papers

def _papers(args) -> int:
    from jattn.catalog import PAPERS, format_table
    rows = [p for p in PAPERS if args.status is None or p.status == args.status]
    print(format_table(rows))
    if args.methods:
        from jattn.nn import available_methods, describe_method
        print("\njattn.nn.Attention(method=NAME, **config):")
        for name in available_methods():
            print(describe_method(name))
        print("\nBuilt papers that are not an attention layer (- above):")
        for p in PAPERS:
            if p.not_a_layer:
                print(f"{p.id}  {p.name}: {p.not_a_layer}")
    return 0


# ------------------------------------------------------------------------------------------ show-mask

def parse_option_value(key: str, text: str, default):
    """``text`` converted to the type of ``default`` (bool, int or float); ``ValueError`` if it does not fit."""
    from jattn.patterns import option_type

    kind = option_type(default)
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"option {key!r} expects a bool ({'/'.join(_TRUE + _FALSE)}), got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"option {key!r} expects {'an int' if kind is int else 'a float'}, got {text!r}") from None


def parse_options(pattern, items: list[str]) -> dict:
    """``["key=value", ...]`` -> keyword options for ``pattern``; ``ValueError`` names the bad item."""
    from jattn.patterns import describe_options

    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in pattern.options:
            raise ValueError(f"--set {item!r}: pattern {pattern.name!r} has no option {key!r}; expected one of: "
                             f"{describe_options(pattern)}")
        try:
            options[key] = parse_option_value(key, text.strip(), pattern.options[key])
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from None
    return options


def _list_patterns() -> str:
    from jattn.patterns import PATTERNS, describe_options

    width = max((len(name) for name in PATTERNS), default=0)
    lines = []
    for name, pattern in PATTERNS.items():
        lines.append(f"{name:<{width}}  {pattern.help}")
        lines.append(f"{'':<{width}}  options: {describe_options(pattern)}")
    return "\n".join(lines)


def _check_out(out: str | None) -> pathlib.Path:
    """The ``--out`` path; ``ValueError`` when missing or when matplotlib cannot write its suffix."""
    from matplotlib.figure import Figure

    if not out:
        raise ValueError("--out FILE.png is required (the image to write)")
    path = pathlib.Path(out)
    formats = sorted(Figure().canvas.get_supported_filetypes())
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(f"--out {out!r}: cannot tell the image format from suffix {path.suffix!r}; "
                         f"expected one of: {', '.join('.' + f for f in formats)}")
    return path


def num_heads(mask) -> int:
    """The head dim of a pattern's mask: ``BlockMask.shape[1]``, ``[H, T, S]``/``[B, H, T, S]`` dense, else 1."""
    from jattn.core.block_mask import BlockMask

    if isinstance(mask, BlockMask):
        return mask.shape[1]
    return mask.shape[-3] if mask.ndim >= 3 else 1


def _show_mask(args, parser: argparse.ArgumentParser) -> int:
    from jattn.patterns import PATTERNS
    from jattn.viz import plot_mask

    if args.list:
        print(_list_patterns())
        return 0
    if args.name is None:
        parser.error(f"a pattern NAME is required (or --list); expected one of: {', '.join(PATTERNS)}")
    if args.name not in PATTERNS:
        parser.error(f"unknown pattern {args.name!r}; expected one of: {', '.join(PATTERNS)}")
    pattern = PATTERNS[args.name]
    try:
        out = _check_out(args.out)
        options = parse_options(pattern, args.options)
    except ValueError as err:
        parser.error(str(err))
    head = args.head
    try:
        mask, mask_fn = pattern.build(**options)
        heads = num_heads(mask)
        settings = ", ".join(f"{k}={v}" for k, v in {**pattern.options, **options}.items())
        title = f"{pattern.name} ({settings})"
        if heads == 1:
            if head is not None:
                print(f"note: pattern {pattern.name!r} is the same for every head: --head {head} has no effect",
                      file=sys.stderr)
            head = 0
        else:
            head = 0 if head is None else head
            if not 0 <= head < heads:
                raise ValueError(f"--head must be in [0, {heads}): this pattern has {heads} heads, got {head}")
            title += f", head {head} of {heads}"
        fig = plot_mask(mask, mask_fn=mask_fn, head=head, title=title)
    except ValueError as err:  # a builder or plot_mask rejecting an option value or --head
        parser.error(f"pattern {pattern.name!r} with {options or 'its defaults'}"
                     f"{'' if args.head is None else f' and --head {args.head}'}: {err}")
    try:
        fig.savefig(out, dpi=120)
    except OSError as err:
        parser.error(f"cannot write --out {str(out)!r}: {err}")
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser, subparsers = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "papers":
        return _papers(args)
    return _show_mask(args, subparsers["show-mask"])


if __name__ == "__main__":
    sys.exit(main())
