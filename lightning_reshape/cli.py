"""The ``lightning-reshape`` command: ``groups``, ``inspect``, ``convert``, ``verify``, ``export``.

Every error from bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning_reshape.errors import ReshapeError
from lightning_reshape.topology import DEFAULT_ORDER, GROUP_KINDS, ParallelConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# largest parallel degree or world size accepted: far above any real job, and small enough
# that planning or listing the groups answers at once instead of running for minutes
MAX_DEGREE = 2**20


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def _degree(text: str) -> int:
    """A parallel degree or world size: a whole number from 1 to MAX_DEGREE."""
    if len(text.strip()) > 20:  # int() of a huge digit string is itself slow (and limited)
        raise argparse.ArgumentTypeError(f"{text[:20]}... is above {MAX_DEGREE} (2**20)")
    value = _positive_int(text)
    if value > MAX_DEGREE:
        raise argparse.ArgumentTypeError(f"{value} is above {MAX_DEGREE} (2**20)")
    return value


def _parse_tp_rule(text: str) -> object:
    """``REGEX=DIM[:STRIDE]`` or ``REGEX=replicated`` -> a reader TPRule; ReshapeError if not."""
    from lightning_reshape.checkpoint.reader import TPRule
    from lightning_reshape.checkpoint.sidecar import TPSplit

    pattern, sep, split = text.rpartition("=")
    if not sep or not pattern:
        raise ReshapeError(
            f"--tp-rule {text!r}: expected REGEX=DIM[:STRIDE] or REGEX=replicated "
            "(e.g. 'dense_4h=0')"
        )
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ReshapeError(
            f"--tp-rule {text!r}: {pattern!r} is not a valid regex ({exc})"
        ) from None
    if split == "replicated":
        return TPRule(pattern, None)
    dim, _, stride = split.partition(":")
    try:
        return TPRule(pattern, TPSplit(dim=int(dim), stride=int(stride or 1)))
    except (ValueError, ReshapeError) as exc:
        raise ReshapeError(
            f"--tp-rule {text!r}: {split!r} is not DIM[:STRIDE] (whole numbers, DIM >= 0, "
            f"STRIDE >= 1) or 'replicated' ({exc})"
        ) from None


def _tp_rule(text: str) -> object:
    """argparse type of ``--tp-rule``: a bad rule is a usage error (one line, exit 2)."""
    try:
        return _parse_tp_rule(text)
    except ReshapeError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--tp-rule ")) from None


DESCRIPTION = (
    "Inspect, reshape (new tp / pp / dp / ZeRO stage), compare and export DeepSpeed checkpoints "
    "without starting DeepSpeed, and print the rank groups of a parallel layout."
)
SRC_HELP = (
    "the checkpoint: a Lightning X.ckpt folder, a DeepSpeed save folder (with 'latest', or "
    "holding a single tag folder such as Hugging Face's checkpoint-N/global_stepN), or a tag "
    "folder itself"
)
TRUST_HELP = "allow pickled types outside the allow-list (runs code from the file)"


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    parser.add_argument(
        "--tp-rule",
        type=_tp_rule,
        action="append",
        default=[],
        metavar="REGEX=DIM[:STRIDE]|REGEX=replicated",
        help="how parameters matching REGEX are split across tensor-parallel ranks "
        "(needed when the checkpoint has no lightning-reshape sidecar); repeatable",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lightning-reshape", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    groups = sub.add_parser(
        "groups",
        help="print the rank groups of a parallel layout",
        description="Print which ranks form each group (tp, pp, dp, cp, ep, ...) of a layout.",
    )
    groups.add_argument("--world-size", type=_degree, required=True, help="total number of ranks")
    for axis, what in (
        ("tp", "tensor"),
        ("pp", "pipeline"),
        ("cp", "context"),
        ("ep", "expert"),
    ):
        groups.add_argument(
            f"--{axis}", type=_degree, default=1, help=f"{what}-parallel degree (default 1)"
        )
    groups.add_argument(
        "--etp",
        type=_degree,
        default=None,
        help="tensor-parallel degree inside experts (default: --tp)",
    )
    groups.add_argument(
        "--order",
        default=DEFAULT_ORDER,
        help=f"rank order, fastest-varying axis first, Megatron style (default {DEFAULT_ORDER})",
    )
    groups.add_argument("--json", action="store_true", help="one JSON object keyed by group kind")
    groups.add_argument(
        "--max-groups", type=_positive_int, default=16, help="groups shown per kind in the table"
    )
    groups.set_defaults(run=_run_groups)

    inspect = sub.add_parser(
        "inspect",
        help="describe a DeepSpeed checkpoint",
        description="Describe a checkpoint: layout, ZeRO stage, tensors, steps. "
        "Reads metadata only.",
    )
    inspect.add_argument("path", help=SRC_HELP)
    inspect.add_argument("--json", action="store_true", help="the report as JSON")
    _add_checkpoint_options(inspect)
    inspect.set_defaults(run=_run_inspect)

    convert = sub.add_parser(
        "convert",
        help="reshape a DeepSpeed checkpoint to a new layout",
        description="Write a copy of a checkpoint at a new (tp, pp, dp, ZeRO stage) that stock "
        "DeepSpeed loads. Axes left out keep the source's degree. The source is never modified.",
    )
    convert.add_argument("src", help=SRC_HELP)
    convert.add_argument("dst", help="output save folder (gets the tag folder and 'latest')")
    for axis, what in (("tp", "tensor"), ("pp", "pipeline"), ("dp", "data")):
        convert.add_argument(
            f"--{axis}",
            type=_degree,
            default=None,
            help=f"target {what}-parallel degree (default: the source's)",
        )
    convert.add_argument(
        "--zero-stage", type=int, default=None, help="target ZeRO stage (default: the source's)"
    )
    convert.add_argument(
        "--pp-partition",
        default="parameters",
        metavar="parameters|uniform|B0,B1,...",
        help="partition_method of the target PipelineModule (default: DeepSpeed's 'parameters'), "
        "or explicit stage boundaries as pp + 1 layer offsets",
    )
    convert.add_argument("--tag", default=None, help="output tag (default: the source's)")
    convert.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    convert.add_argument(
        "--workers",
        type=_positive_int,
        default=min(4, os.cpu_count() or 1),
        help="target files written at once (default: up to 4, one per core)",
    )
    convert.add_argument(
        "--tp-rule",
        action="append",
        default=[],
        metavar="REGEX=DIM[:STRIDE]|REGEX=replicated",
        help="tensor-parallel split of matching parameters (repeatable)",
    )
    convert.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument(
        "--no-crc-check",
        action="store_true",
        help="do not check the source's tensor records against their CRC-32s (faster: the "
        "check reads every source record once more; the output's CRC-32s are written anyway)",
    )
    convert.set_defaults(run=_run_convert)

    verify = sub.add_parser(
        "verify",
        help="compare two checkpoints' logical content bit for bit",
        description="Compare the logical content (fp32 masters, optimizer states, buffers, "
        "steps, client state) of two checkpoints of any layouts, bit for bit. Exit 0: equal.",
    )
    verify.add_argument("a", help="first checkpoint (same forms as for inspect)")
    verify.add_argument("b", help="second checkpoint")
    verify.add_argument(
        "--max-differences", type=_positive_int, default=20, help="stop after this many"
    )
    verify.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    verify.set_defaults(run=_run_verify)

    export = sub.add_parser(
        "export",
        help="write the full model weights as safetensors (or torch) files",
        description="Write the full weights of any layout (tp, pp, ZeRO) into a new folder, as "
        "Hugging Face does: model.safetensors, or shards with model.safetensors.index.json. "
        "Names are the module's state_dict names (tied and frozen parameters and buffers "
        "included); fp32 masters are used where the optimizer holds them. One tensor at a time "
        "is in memory.",
    )
    export.add_argument("src", help=SRC_HELP)
    export.add_argument("out", help="output folder (must not exist, or be empty)")
    export.add_argument(
        "--format",
        choices=("safetensors", "torch"),
        default="safetensors",
        help="safetensors (default) or torch (pytorch_model.bin; one shard in memory at a time)",
    )
    export.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="dtype of floating tensors (default fp32)",
    )
    export.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest file before splitting into shards with an index (default 5GB)",
    )
    export.add_argument(
        "--tag", default=None, help="tag to read (default: 'latest', or the only tag folder)"
    )
    export.add_argument(
        "--strip-prefix",
        default=None,
        metavar="PREFIX",
        help="remove PREFIX from the names that start with it, e.g. 'model.' for a Hugging Face "
        "model kept as self.model in a LightningModule, so that from_pretrained of the folder "
        "finds its own names (a PREFIX no name has is an error)",
    )
    _add_checkpoint_options(export)
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=_run_export)
    return parser


def _tp_rules(texts: Sequence[str]) -> list[object]:
    return [_parse_tp_rule(text) for text in texts]


# degrees up to this are planned without a look at the model's size first
_CHEAP_DEGREE = 1024


def _check_degrees(args: argparse.Namespace, rules: Sequence[object]) -> None:
    """Refuse a tp, pp or dp above the number of parameter elements: most ranks would hold
    nothing, and planning a million ranks' files takes minutes. Why only for large degrees:
    this reads the source's metadata a second time, which small degrees never need."""
    degrees = {a: getattr(args, a) for a in ("tp", "pp", "dp") if getattr(args, a)}
    if not degrees or max(degrees.values()) <= _CHEAP_DEGREE:
        return
    from lightning_reshape.checkpoint.manifest import ROLE_PARAM
    from lightning_reshape.checkpoint.reader import read_manifest

    manifest = read_manifest(
        args.src,
        trust_checkpoint=args.trust_checkpoint,
        tp_rules=rules,  # type: ignore[arg-type]
    )
    elements = sum(e.numel for e in manifest.entries(ROLE_PARAM))
    for axis, value in degrees.items():
        if value > elements:
            raise ReshapeError(
                f"--{axis} {value} is larger than the {elements} parameter elements of "
                f"{manifest.root}; every rank needs a share: choose at most {elements}"
            )


def _run_convert(args: argparse.Namespace) -> int:
    from lightning_reshape.checkpoint.convert import convert_checkpoint, plan_conversion
    from lightning_reshape.checkpoint.plan import Target, format_plan

    rules = _tp_rules(args.tp_rule)
    _check_degrees(args, rules)
    if args.dry_run:
        plan = plan_conversion(
            args.src,
            tp=args.tp,
            pp=args.pp,
            dp=args.dp,
            zero_stage=args.zero_stage,
            trust=args.trust_checkpoint,
            tp_rules=rules,  # type: ignore[arg-type]
            pp_partition=args.pp_partition,
        )
        print(format_plan(plan))
        return 0
    done: list[tuple[Target, bool]] = []
    out = convert_checkpoint(
        args.src,
        args.dst,
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        zero_stage=args.zero_stage,
        tag=args.tag,
        trust=args.trust_checkpoint,
        progress=not args.quiet and sys.stderr.isatty(),
        workers=args.workers,
        tp_rules=rules,  # type: ignore[arg-type]
        pp_partition=args.pp_partition,
        check_crc=not args.no_crc_check,
        on_done=lambda plan, reused: done.append((plan.target, reused)),
    )
    target, reused = done[0]
    layout = f"tp={target.tp} pp={target.pp} dp={target.dp}, ZeRO stage {target.zero_stage}"
    if reused:
        print(f"reused {out} (already complete; {layout})")
    else:
        print(f"wrote {out} ({layout})")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from lightning_reshape.checkpoint.export import export_checkpoint

    out = export_checkpoint(
        args.src,
        args.out,
        fmt=args.format,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        tag=args.tag,
        trust=args.trust_checkpoint,
        tp_rules=args.tp_rule,
        progress=not args.quiet and sys.stderr.isatty(),
        strip_prefix=args.strip_prefix,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out} ({', '.join(files)})")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from lightning_reshape.checkpoint.verify import verify

    diffs = verify(args.a, args.b, trust=args.trust_checkpoint, limit=args.max_differences)
    if not diffs:
        print("equal: same logical tensors and state, bit for bit")
        return 0
    for d in diffs:
        print(d)
    print(f"{len(diffs)}{'+' if len(diffs) >= args.max_differences else ''} differences")
    return 1


def _run_groups(args: argparse.Namespace) -> int:
    config = ParallelConfig(
        tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=args.etp, order=args.order
    )
    layout = config.resolve(args.world_size)
    groups = layout.all_groups()
    if args.json:
        json.dump(groups, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
        return 0
    print(layout.describe())
    width = max(len(k) for k in GROUP_KINDS)
    print(f"{'group':<{width}}  {'count':>7} x {'size':<5} ranks")
    for kind in GROUP_KINDS:
        lists = groups[kind]
        shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in lists[: args.max_groups])
        more = f" ... +{len(lists) - args.max_groups} more" if len(lists) > args.max_groups else ""
        print(f"{kind:<{width}}  {len(lists):>7} x {len(lists[0]):<5} {shown}{more}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from lightning_reshape.checkpoint.inspect import format_inspect, inspect_checkpoint

    report = inspect_checkpoint(args.path, trust=args.trust_checkpoint, tp_rules=args.tp_rule)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_inspect(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ReshapeError as err:
        text = " ".join(str(err).splitlines())  # one line, whatever a file put in the message
        print(f"lightning-reshape {args.command}: error: {text}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly, as Unix tools do
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C: partial output is left for the re-run to resume
        print(f"lightning-reshape {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RecursionError:  # a hostile file nested too deep for any parser we call
        print(
            f"lightning-reshape {args.command}: error: an input file is nested too deeply to "
            "read (a JSON or pickle structure thousands of levels deep); it is not one we wrote",
            file=sys.stderr,
        )
        return EXIT_USAGE


def console_main() -> None:
    """The console script: ``main``, then exit without the interpreter's teardown.

    Why: once torch and DeepSpeed are imported, the normal shutdown (module teardown, garbage
    collection of their globals) takes most of a second, longer than reshaping a small
    checkpoint. Everything we write is fsynced and renamed into place before ``main``
    returns, so skipping the teardown loses nothing; output streams are flushed first.
    SIGXFSZ is ignored so that exceeding ``ulimit -f`` is an EFBIG error (one line, exit 2,
    partial output removed) rather than a kill that leaves the partial folder behind.
    """
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit becomes EFBIG, one error line, not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # closed by a reader that went away
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
