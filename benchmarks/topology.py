"""Build every group list at 1k..1M ranks (tp = pp = 8): ours vs Megatron-core vs DeepSpeed.

Run: ``python benchmarks/topology.py`` (``--sizes`` to choose world sizes, ``--budget`` for
the longest a peer may be projected to take before it is skipped). Prints seconds per
world size and how many times faster ours is, both for our native form (one numpy array
of shape (groups, group size) per kind) and converted to Python lists as the peers return.
Targets: >= 50x Megatron-core at 128k ranks, all groups at 1M ranks in under 1 s.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from collections.abc import Callable

from lightning_reshape.topology import GROUP_KINDS, ParallelConfig

TP = PP = 8
SIZES = [1 << 10, 1 << 13, 1 << 16, 1 << 17, 1 << 20]


def ours_arrays(world: int) -> int:
    groups = ParallelConfig(tp=TP, pp=PP).resolve(world).all_group_arrays()
    return sum(len(g) for g in groups.values())


def ours_lists(world: int) -> int:
    groups = ParallelConfig(tp=TP, pp=PP).resolve(world).all_groups()
    return sum(len(g) for g in groups.values())


def megatron(world: int) -> int:
    """The same 12 group kinds, built as ``initialize_model_parallel`` builds the lists."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator, default_embedding_ranks

    dp = world // (TP * PP)
    dense = RankGenerator(tp=TP, ep=1, dp=dp, pp=PP, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=TP, ep=1, dp=dp, pp=PP, cp=1, order="tp-cp-ep-dp-pp")
    lists = [dense.get_ranks(t) for t in ("tp", "pp", "dp", "cp", "dp-cp", "tp-pp")]
    lists += [expert.get_ranks(t) for t in ("ep", "tp", "tp-ep", "tp-ep-pp", "dp")]
    lists.append([default_embedding_ranks(g) for g in dense.get_ranks("pp")])
    return sum(len(g) for g in lists)


def deepspeed(world: int) -> int:
    """The lists DeepSpeed's ``PipelineParallelGrid`` builds at set-up, without communicators."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=world // (TP * PP))
    model = [sorted(topo.get_axis_list("data", d)) for d in range(topo.get_dim("data"))]
    data = topo.get_axis_comm_lists("data")
    pipe = topo.get_axis_comm_lists("pipe")
    slices = topo.get_axis_comm_lists("model")
    p2p = []
    for rank in range(world):  # PipelineParallelGrid._build_p2p_groups
        for group in pipe:
            if rank in group:
                p2p.append([rank, group[(group.index(rank) + 1) % PP]])
                break
    return len(model) + len(data) + len(pipe) + len(slices) + len(p2p)


def timed(fn: Callable[[int], int], world: int, repeat: int) -> float:
    """Best wall time of ``repeat`` runs, with the garbage collector off (as timeit does)."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            fn(world)
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per peer and size")
    args = parser.parse_args()
    for fn in (ours_lists, megatron, deepspeed):  # imports and first-call costs, untimed
        fn(TP * PP)

    # name -> (builder, growth exponent used to skip a size projected past the budget)
    peers = {"megatron-core": (megatron, 1.0), "deepspeed": (deepspeed, 2.0)}
    last: dict[str, tuple[int, float]] = {}
    print(f"all {len(GROUP_KINDS)} group kinds, tp={TP} pp={PP}; seconds, best of 3 for ours,")
    print("one run for peers; 'x' = peer time / ours as arrays (/ ours as Python lists)")
    print(f"{'ranks':>9} {'ours arrays':>12} {'ours lists':>11} {'megatron-core':>14} "
          f"{'x':>13} {'deepspeed':>10} {'x':>13}")  # fmt: skip
    for world in args.sizes:
        arrays = timed(ours_arrays, world, repeat=3)
        lists = timed(ours_lists, world, repeat=5)
        row = f"{world:>9} {arrays:>12.4f} {lists:>11.4f}"
        notes = []
        for name, (fn, exponent) in peers.items():
            width = 14 if name == "megatron-core" else 10
            if name in last:
                w0, t0 = last[name]
                projected = t0 * (world / w0) ** exponent
                if projected > args.budget:
                    row += f" {'skipped':>{width}} {'':>13}"
                    notes.append(f"{name} projected {projected:.0f} s")
                    continue
            theirs = timed(fn, world, repeat=1)
            last[name] = (world, theirs)
            ratios = f"{theirs / arrays:.0f}x ({theirs / lists:.0f}x)"
            row += f" {theirs:>{width}.3f} {ratios:>13}"
        print(row + (f"  ({'; '.join(notes)})" if notes else ""), flush=True)


if __name__ == "__main__":
    main()
