"""Command-line interfaces: ``relu-count`` and ``snl-fx``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from passes import PassError

from ._errors import SnlFxError
from ._spec import example_inputs, load_model_spec, parse_shape


def _run(prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; user errors become one line on stderr and exit code 2 (``--debug``: traceback)."""
    if not getattr(args, "debug", False):
        warnings.simplefilter("ignore")
    try:
        return body(args)
    except PassError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _relu_count(args: argparse.Namespace) -> int:
    from ._count import relu_count

    shapes = [parse_shape(s) for s in args.input_shape]
    target = args.model
    if target.endswith(".onnx") or os.path.isfile(target):
        report = relu_count(target, input_shapes=shapes or None)
    else:
        if not shapes:
            raise SnlFxError("a torch model spec needs --input-shape, e.g. --input-shape 1,3,32,32")
        report = relu_count(load_model_spec(target), example_inputs(shapes))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


def relu_count_main(argv: Sequence[str] | None = None) -> int:
    """``relu-count MODEL [--input-shape 1,3,32,32] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="relu-count",
        description="Count ReLUs per sample, site by site, in a torch model or an ONNX file, "
        "with other nonlinearities apart and private-inference cost estimates.",
    )
    parser.add_argument("model", help="an .onnx file, package.module:factory, or torchvision:<name>")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="N,C,H,W",
        help="example input shape, batch first (repeat for several inputs); pins dynamic ONNX dims",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object; its 'total' is ReLUs per sample")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and warnings")
    return _run("relu-count", _relu_count, parser.parse_args(argv))


def snl_fx_main(argv: Sequence[str] | None = None) -> int:
    """``snl-fx linearize ...``: see ``snl-fx --help``."""
    parser = argparse.ArgumentParser(prog="snl-fx", description="Selective Network Linearization for torch models")
    sub = parser.add_subparsers(dest="command", required=True)
    count = sub.add_parser("count", help="same as relu-count")
    count.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "count":
        return relu_count_main(args.rest)
    return 2


if __name__ == "__main__":
    sys.exit(relu_count_main())
