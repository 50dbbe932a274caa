"""Command-line interfaces: ``relu-count`` and ``snl-fx``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from snl_fx.errors import SnlFxError

# torch, the passes, model specs and data sets are imported where a command needs them: reading
# an ONNX file (relu-count FILE.onnx) never imports torch.


def _run(prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace, threads: bool = True) -> int:
    """Run a command: a user-caused failure is one line on stderr and exit code 2, an internal
    error one line saying so and exit code 1 (``--debug``: the traceback); a closed stdout
    (``| head``) ends quietly with 141, as a process killed by SIGPIPE does. ``threads``: set
    torch's threads first (commands that may not need torch set them themselves)."""
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.simplefilter("ignore")  # library noise (deprecations) stays hidden; ours is shown
        warnings.filterwarnings("default", category=UserWarning, module=r"(snl_fx|passes)")
        warnings.showwarning = lambda message, *_, **__: print(f"{prog}: warning: {message}", file=sys.stderr)
    try:
        if threads:
            set_default_threads(getattr(args, "threads", None))
        return body(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as exc:
        if debug:
            raise
        message = _user_error(exc)
        if message is None:
            print(f"{prog}: internal error: {_one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"


def _user_error(exc: BaseException) -> str | None:
    """The one-line message of a failure the user caused (bad input, missing file, no memory), else None."""
    if isinstance(exc, SnlFxError):  # the passes' PassError is this class too
        return " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _is_oom(str(exc))):
        return f"out of memory ({_one_line(exc)[:200]}): use a smaller input shape or batch size"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return None


def _is_oom(text: str) -> bool:
    return any(s in text for s in ("can't allocate memory", "CUDA out of memory", "out of memory", "Tried to allocate"))


def set_default_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads`` if given, else leave an explicit OMP_NUM_THREADS
    alone, else all usable cores but one (at least 1). Returns the number in use.

    torch's default (one OpenMP thread per core) collapses when another process takes a core:
    a thread waiting at a barrier for a descheduled sibling (see BENCHMARKS.md, threads).
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise SnlFxError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores - 1))
    return torch.get_num_threads()


def _relu_count(args: argparse.Namespace) -> int:
    from snl_fx.cost import pi_cost
    from snl_fx.inspect import relu_count

    from ._spec import parse_shape

    shapes = [parse_shape(s) for s in args.input_shape]
    target = args.model
    if os.path.isdir(target):
        raise SnlFxError(f"{target} is a directory: give an .onnx file or a model spec (package.module:factory)")
    if target.endswith(".onnx") or os.path.isfile(target):
        report = relu_count(target, input_shapes=shapes or None)  # no torch for this
    else:
        if not shapes:
            raise SnlFxError("a torch model spec needs --input-shape, e.g. --input-shape 1,3,32,32")
        from ._spec import example_inputs, load_model_spec

        set_default_threads()
        report = relu_count(load_model_spec(target), example_inputs(shapes))
    cost = pi_cost(report, protocol=args.protocol or "crypten", network=args.network or "wan")
    if args.json:
        print(json.dumps({**report.to_dict(), "pi_cost": cost.to_dict()}, indent=2))
    elif args.protocol:
        print(f"{report.table()}\n\n{cost.table()}")
    else:
        print(f"{report.table()}\npredicted private inference (snl_fx.pi_cost): {cost.headline()} "
              "(--protocol P for the per-layer table)")
    return 0


def relu_count_main(argv: Sequence[str] | None = None) -> int:
    """``relu-count MODEL [--input-shape 1,3,32,32] [--protocol P] [--network lan|wan|MBPS,RTT_MS] [--json]``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 2 for bad input (one line on stderr), 1 for an internal error.

    Example:
        >>> relu_count_main(["model.onnx", "--protocol", "spu-cheetah", "--json"])
        0
    """
    from snl_fx.cost.tables import protocol_help

    parser = argparse.ArgumentParser(
        prog="relu-count",
        description="Count ReLUs per sample, site by site, in a torch model or an ONNX file, "
        "with other nonlinearities apart and the predicted private-inference cost (snl_fx.pi_cost).",
    )
    parser.add_argument("model", help="an .onnx file, package.module:factory, or torchvision:<name>")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="N,C,H,W",
        help="example input shape, batch first (repeat for several inputs); pins dynamic ONNX dims",
    )
    parser.add_argument(
        "--protocol",
        help=f"the protocol priced (default crypten), with a per-layer table of bytes, rounds and latency: "
        f"{protocol_help()}; JSON key 'pi_cost'",
    )
    parser.add_argument("--network", help="the network priced: lan (1 Gbit/s, 0.5 ms RTT), wan (100 Mbit/s, 40 ms; "
                        "default) or MBPS,RTT_MS")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: 'total' is ReLUs per sample, 'pi_cost' the predicted cost")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and warnings")
    return _run("relu-count", _relu_count, parser.parse_args(argv), threads=False)


def _linearize(args: argparse.Namespace) -> int:
    import torch

    from snl_fx._files import file_ids
    from snl_fx.inspect import relu_count
    from snl_fx.lifecycle import linearize
    from snl_fx.train import distributed
    from snl_fx.train.config import TrainConfig
    from snl_fx.train.loop import evaluate

    from . import jobs
    from .data import split_train_val

    budget = _check_linearize_args(args)
    before = file_ids(args.out)  # what an earlier run left there: its outputs that this run does not rewrite go
    cfg = TrainConfig(**{name: getattr(args, name) for name in TRAIN_OPTIONS}, kd=not args.no_kd,
                      refine=args.refine, progress=not args.quiet)
    torch.manual_seed(args.seed)
    train, test = jobs.load_datasets(args.data, args.data_root, args.subset, args.seed)
    fit, val = split_train_val(train, 0.1, seed=args.seed)
    model = jobs.build_model(args.model, args.data)
    example = next(iter(torch.utils.data.DataLoader(fit, batch_size=32)))[0]
    _check_fits(model, example, args)
    if args.weights:
        try:
            model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - a bad weights file is a user error
            raise SnlFxError(f"cannot load weights {args.weights}: {type(exc).__name__}: {exc}") from None
    elif args.pretrain_epochs:
        key = {"model": args.model, "data": args.data, "subset": args.subset}
        jobs.pretrain(model, fit, val, cfg, args.pretrain_epochs, cache_dir=args.out, cache_key=key)
    model.cpu().eval()
    acc_before = evaluate(model.to(cfg.resolved_device()), test, cfg)
    result = linearize(
        model, example.to(cfg.resolved_device()), budget, None if args.one_shot else fit, val_data=val,
        granularity=args.granularity, skip=args.skip, out_dir=args.out, resume=args.resume,
        units=_pairs(args.unit, "--unit"), replacements=_pairs(args.replace, "--replace"), **vars(cfg),
    )
    acc_after = evaluate(result.model, test, cfg)
    result.model.cpu()
    extra = {"model_spec": args.model, "data": args.data, "test_acc_before": acc_before, "test_acc_after": acc_after}
    report = jobs.write_outputs(result, example, args.out, extra, profile=args.profile, before=before,
                                resume=args.resume, plot_title=f"{args.model}: ReLUs per layer")
    if not distributed.is_main():  # under torchrun, rank 0 alone writes and prints
        return 0
    if args.json:
        print(json.dumps(report, default=str))
    else:
        before = relu_count(model.cpu(), example[:1])
        after = relu_count(result.model, example[:1])
        print(jobs.summary(before, after, acc_before, acc_after, args.protocol, args.network,
                           families=list(result.counts)))
        if result.cost:
            b, a, lim = result.cost["before"], result.cost["after"], result.cost["budget"]
            print(f"predicted {lim['protocol']} cost on {lim['network']['name']}: {b['bytes'] / 1e6:.2f} MB, {b['rounds']} rounds, "
                  f"{b['seconds']:.3f} s -> {a['bytes'] / 1e6:.2f} MB, {a['rounds']} rounds, {a['seconds']:.3f} s "
                  f"(budget {lim['limit']:g} {lim['unit']})")
        print(f"outputs in {args.out}: {', '.join(report['outputs'])}")
    return 0


def _pairs(values: list[str], option: str) -> dict[str, str]:
    """``["softmax=relu", "gelu=quad"]`` -> ``{"softmax": "relu", "gelu": "quad"}``; one-line error otherwise."""
    pairs = {}
    for value in values:
        key, sep, name = value.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise SnlFxError(f"{option} {value!r}: write FAMILY=NAME, e.g. softmax=relu")
        pairs[key.strip()] = name.strip()
    return pairs


def _check_linearize_args(args: argparse.Namespace) -> Any:
    """Refuse bad ``snl-fx linearize`` options before any work; returns the parsed budget."""
    from snl_fx._files import check_writable_dir
    from snl_fx.budget import as_budget

    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    budget = as_budget(args.budget, args.protocol, args.network, families)
    _pairs(args.unit, "--unit"), _pairs(args.replace, "--replace")
    if args.pretrain_epochs < 0:
        raise SnlFxError(f"--pretrain-epochs must be >= 0, got {args.pretrain_epochs}")
    if args.subset is not None and args.subset < 1:
        raise SnlFxError(f"--subset must be a number of training images >= 1, got {args.subset}")
    if args.weights and not os.path.isfile(args.weights):
        raise SnlFxError(f"--weights {args.weights}: no such file")
    check_writable_dir(args.out, "--out")  # not after the first epoch; leaves no folder or file behind
    return budget


def _check_fits(model: object, example: object, args: argparse.Namespace) -> None:
    """Run the model once on a batch of the data set (and check a --resume checkpoint belongs to it)."""
    import torch

    from . import jobs

    try:
        with torch.no_grad():
            model.eval()(example)  # type: ignore[operator, union-attr]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model does not take this data set's inputs
        if isinstance(exc, RuntimeError) and _is_oom(str(exc)):
            raise
        raise SnlFxError(
            f"model {args.model} does not run on {args.data} inputs of shape {tuple(example.shape[1:])} "  # type: ignore[attr-defined]
            f"({_one_line(exc)[:200]})"
        ) from None
    if args.resume:
        jobs.check_checkpoint_matches(args.out, model)  # type: ignore[arg-type]


def _pi_bench(args: argparse.Namespace) -> int:
    from .pi import pi_bench

    if args.softmax_broadcast is not None and args.backend == "crypten":
        raise SnlFxError("--softmax-broadcast is an SPU option (as is --no-softmax-broadcast): add --backend spu-semi2k or spu-cheetah")
    r = pi_bench(args.model, runs=args.runs, seed=args.seed, backend=args.backend, softmax_broadcast=args.softmax_broadcast)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    per_relu = f" ({r.relu_bytes / r.relus:.1f} B per ReLU)" if r.relus else ""
    if r.backend == "crypten":
        print(f"{args.model} under CrypTen 2PC: 2 parties on loopback, 1 thread each, online traffic")
    else:
        print(f"{args.model} under SPU {r.backend[4:].upper()} (FM64): 2 parties on loopback, SPU link statistics")
    print(f"  max abs error vs ONNX Runtime  {r.max_abs_error:.3g} (output scale {r.output_scale:.3g})")
    print(f"  ReLUs computed                 {r.relus:,} in {r.relu_layers} ReLU layers ({r.comparisons:,} comparisons in all)")
    print(f"  traffic                        {r.bytes:,} B in {r.rounds} rounds")
    print(f"    inside ReLU ops              {r.relu_bytes:,} B{per_relu} in {r.relu_rounds} rounds")
    if r.backend != "crypten":
        print(f"  one-time: protocol set-up      {r.setup_bytes:,} B in {r.setup_rounds} rounds; weights {r.weight_bytes:,} B")
    print(f"  time per inference             {r.seconds:.3f} s, {r.relu_seconds:.3f} s in ReLU ops (median of {r.runs})")
    return 0


# TrainConfig fields that `snl-fx linearize` takes as options; defaults and choices come from TrainConfig
TRAIN_OPTIONS = {
    "epochs": "gate-phase epochs: the target schedule reaches the budget near their end",
    "finetune_epochs": "fine-tune epochs; the best on the validation split is kept",
    "schedule": "lambda schedule: target (per step, no tuning), budget or paper (per epoch)",
    "lambda0": "starting lambda",
    "kappa": "lambda factor per stalled epoch (budget and paper schedules)",
    "eps": "a gate counts as a ReLU while c > eps",
    "lr": "Adam lr of the weights in the gate phase",
    "gate_lr": "Adam lr of the gates (default: tied to the steps available)",
    "finetune_lr": "SGD lr of the fine-tune",
    "finetune_schedule": "fine-tune lr schedule",
    "batch_size": "global batch size",
    "device": "cpu, cuda, cuda:1 (default: CUDA when present)",
    "seed": "seed of data order, split and initialisation",
}


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per :data:`TRAIN_OPTIONS` field, its default, type and choices (a Literal's
    values) taken from TrainConfig."""
    from snl_fx.train.config import TrainConfig

    hints, defaults = typing.get_type_hints(TrainConfig), TrainConfig()
    for name, text in TRAIN_OPTIONS.items():
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"default": default, "help": f"{text} (default: {default})"}
        if typing.get_origin(hints[name]) is Literal:
            kwargs["choices"] = typing.get_args(hints[name])
        else:  # int, float, or X | None: X
            kwargs["type"] = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def snl_fx_main(argv: Sequence[str] | None = None) -> int:
    """``snl-fx linearize MODEL --data NAME --budget B``; ``snl-fx pi-bench FILE.onnx``; ``snl-fx count`` is ``relu-count``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["count"]:  # forwarded before parsing: argparse would claim relu-count's options
        return relu_count_main(argv[1:])
    from snl_fx.cost.tables import BACKENDS
    from snl_fx.export import PROFILES
    from snl_fx.passes import GRANULARITIES

    from .data import DATASETS

    parser = argparse.ArgumentParser(prog="snl-fx", description="Selective Network Linearization for torch models")
    sub = parser.add_subparsers(dest="command", required=True)
    lin = sub.add_parser("linearize", help="pretrain (optional), linearize to a ReLU budget, fine-tune, export")
    lin.add_argument("model", help="zoo name (small_resnet, cifar_resnet18, cifar_resnet34, wrn22_8, vit_tiny_fm) or "
                     "pkg.module:factory")
    lin.add_argument("--data", required=True, choices=list(DATASETS))
    lin.add_argument("--data-root", help="folder of the data set (CIFAR, Tiny-ImageNet); never downloaded")
    lin.add_argument("--budget", required=True, help="ReLUs per sample (int), a fraction in (0, 1) such as 0.05, or 5%%; "
                     "or a predicted private-inference cost: 1.5s, 800ms, 200MB, 1.5GB, 150rounds (see --protocol); "
                     "or per nonlinearity family: gelu=0.1,softmax=25%% (GELU gated per token, softmax per head row)")
    lin.add_argument("--families", help="for a cost --budget: the nonlinearity families it trades, e.g. gelu,softmax "
                     "(default relu)")
    lin.add_argument("--replace", action="append", default=[], metavar="FAMILY=NAME",
                     help="what a cut unit of a family computes: softmax=square (default, PriViT), relu, quad, scaled; "
                          "gelu=identity (default) or quad")
    lin.add_argument("--unit", action="append", default=[], metavar="FAMILY=UNIT",
                     help="gate unit of a family: gelu=token (default) or element; softmax=row")
    lin.add_argument("--protocol", default="crypten", help="for a cost --budget: the protocol priced (default crypten)")
    lin.add_argument("--network", default="wan", help="for a cost --budget: lan, wan (default) or MBPS,RTT_MS")
    lin.add_argument("--granularity", choices=GRANULARITIES, default="pixel")
    lin.add_argument("--out", default="runs/snl", help="output dir: checkpoints, model, ONNX, report.json")
    lin.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    lin.add_argument("--weights", help="pretrained state_dict of the model (else --pretrain-epochs)")
    lin.add_argument("--pretrain-epochs", type=int, default=0, help="pretrain first (cached in --out)")
    lin.add_argument("--one-shot", action="store_true", help="training-free selection on a calibration batch")
    _add_train_options(lin)
    lin.add_argument("--no-kd", action="store_true", help="plain cross-entropy, no distillation")
    lin.add_argument("--refine", action="store_true",
                     help="after binarizing, swap kept and removed ReLUs while the loss falls (ReLU budgets; "
                          "helps short fine-tunes, not measurably longer ones)")
    lin.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="site names left as ReLUs")
    lin.add_argument("--subset", type=int, help="use a fixed random sample of N training images (quick runs)")
    lin.add_argument("--profile", choices=PROFILES, default="default", help="ONNX export profile")
    lin.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS if set, else cores - 1)")
    lin.add_argument("--json", action="store_true", help="print report.json's content as one JSON object")
    lin.add_argument("--quiet", action="store_true", help="no progress bars")
    lin.add_argument("--debug", action="store_true", help="show tracebacks and warnings")
    pib = sub.add_parser("pi-bench", help="run an ONNX file (export profile 'pi') under 2PC: CrypTen or SPU")
    pib.add_argument("model", help="an .onnx file with a static input shape")
    pib.add_argument("--backend", choices=BACKENDS, default="crypten",
                     help="CrypTen 2PC (default), or SPU's CHEETAH / SEMI2K (in .venv-spu)")
    pib.add_argument("--runs", type=int, default=3, help="timed inferences; the median is reported")
    pib.add_argument("--seed", type=int, default=0, help="seed of the random client input")
    pib.add_argument("--softmax-broadcast", action=argparse.BooleanOptionalAction, default=None,
                     help="SPU: compile softmax with enable_optimize_denominator_with_broadcast (one reciprocal per "
                          "row; the default); --no-softmax-broadcast runs SPU's plain softmax")
    pib.add_argument("--json", action="store_true", help="one JSON object: max_abs_error, bytes, rounds, seconds, relus, ...")
    pib.add_argument("--debug", action="store_true", help="show tracebacks and warnings")
    sub.add_parser("count", help="same as relu-count (takes all its arguments)", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "pi-bench":
        return _run("snl-fx", _pi_bench, args)
    return _run("snl-fx", _linearize, args)


if __name__ == "__main__":
    sys.exit(snl_fx_main())
