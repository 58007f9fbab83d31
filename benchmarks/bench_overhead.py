"""What watching the engine costs: the CPU batch benchmark with the instrumentation compiled
out, with nobody listening, with a no-op listener, with a Trace recording, and with the
invariant checker.

    python benchmarks/bench_overhead.py [--model PATH] [--prompts 64] [--tokens 32] [--threads 2]
                                        [--iterations 15] [--max-seconds S]

Workload: the one of bench_batch_cpu.py (greedy, ignore_eos, every prompt in one generate).
All variants run in one process on one LLM, taking turns generate by generate (the order
rotates every iteration), so machine drift hits them alike; each variant's time is compared
with the compiled-out time of the same iteration (paired ratios, median over iterations).

  compiled_out   every method of the engine's modules that publishes events is swapped for a
                 copy compiled from its source with each `X.active` test replaced by the
                 constant False (an AST rewrite), so the compiler drops the publishing code:
                 the engine without instrumentation (the copies are swapped back afterwards)
  no_listener    the engine as shipped, nobody subscribed (target: within 2% of compiled_out)
  listener       a subscriber that does nothing: the cost of building and delivering events
  trace          `with llm.trace():` recording every event (to_dataframe() timed apart)
  invariants     InvariantChecker attached (what LLM(check_invariants=True) does): it replays
                 the ledger and inspects the block manager at every step

Timing noise on a shared machine can be larger than the no-listener cost, so the script also
counts how often the publishing sites test `bus.active` during one generate and multiplies by
the measured cost of one such test: a noise-free estimate of the no-listener overhead.
"""
from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time
import timeit
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

VARIANTS = ("compiled_out", "no_listener", "listener", "trace", "invariants")
KEEP = {"labengine.events", "labengine.trace", "labengine.viz", "labengine.widgets"}


# ------------------------------------------------------------------------- compiling out


class _StripActive(ast.NodeTransformer):
    """`if ... X.active ...:` -> the same test with X.active replaced by False."""

    def __init__(self):
        self.sites = 0

    def visit_If(self, node):
        self.generic_visit(node)
        hit = False

        class Repl(ast.NodeTransformer):
            def visit_Attribute(self, a):
                nonlocal hit
                if a.attr == "active":
                    hit = True
                    return ast.copy_location(ast.Constant(False), a)
                return self.generic_visit(a)

        node.test = Repl().visit(node.test)
        if hit:
            self.sites += 1
        return node


def compiled_out_patches():
    """[(owner, name, instrumented, stripped)] for every function and method of the loaded
    labengine modules whose source tests `.active`; and {module: number of sites}."""
    patches, sites = [], {}
    for modname, mod in sorted(sys.modules.items()):
        if not modname.startswith("labengine.") or modname in KEEP or mod is None:
            continue
        path = getattr(mod, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        tree = ast.parse(open(path).read(), filename=path)
        t = _StripActive()
        tree = ast.fix_missing_locations(t.visit(tree))
        if not t.sites:
            continue
        sites[modname] = t.sites
        ns = {"__name__": modname, "__file__": path}
        exec(compile(tree, path, "exec", dont_inherit=True), ns)
        # the stripped functions must see the real module's classes, enums and helpers
        copies = {k: v for k, v in ns.items() if isinstance(v, (type, types.FunctionType))}
        for k in list(ns):
            if k in mod.__dict__:
                ns[k] = mod.__dict__[k]
        for k, new in copies.items():
            old = mod.__dict__.get(k)
            if isinstance(new, types.FunctionType) and isinstance(old, types.FunctionType):
                patches.append((mod, k, old, new))
            elif isinstance(new, type) and isinstance(old, type) and old.__module__ == modname:
                for name, v in vars(new).items():
                    if isinstance(v, (types.FunctionType, staticmethod, classmethod, property)) \
                            and name in vars(old):
                        patches.append((old, name, vars(old)[name], v))
    return patches, sites


def apply(patches, stripped: bool) -> None:
    for owner, name, old, new in patches:
        setattr(owner, name, new if stripped else old)


def count_active_reads(llm, prompts, params) -> dict:
    """How many times the publishing sites test `bus.active` in one generate, and what one
    test costs: reads x cost is the no-listener overhead, free of timing noise."""
    from labengine.events import EventBus

    class CountingBus(EventBus):
        reads = 0

        @property
        def active(self):
            CountingBus.reads += 1
            return self.__dict__.get("_active", False)

        @active.setter
        def active(self, v):
            self.__dict__["_active"] = v

    bus = llm.llm_engine.event_bus
    bus.__dict__["_active"] = bus.__dict__.pop("active", False)
    bus.__class__ = CountingBus
    steps0 = bus.step
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        bus.__class__ = EventBus
        bus.__dict__["active"] = bus.__dict__.pop("_active")
    reads, steps = CountingBus.reads, bus.step - steps0
    plain = EventBus()
    n = 2_000_000
    t_if = min(timeit.repeat("if b.active:\n    pass", globals={"b": plain}, number=n, repeat=3)) / n
    t_none = min(timeit.repeat("pass", number=n, repeat=3)) / n
    return dict(active_reads=reads, steps=steps, read_cost_s=max(t_if - t_none, 0.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--max-seconds", type=float, default=float("inf"),
                    help="stop starting new iterations after this long (at least 2 iterations)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if "compiled_out" not in variants:
        variants.insert(0, "compiled_out")

    import torch
    torch.set_num_threads(args.threads)
    import labengine
    from labengine import LLM, SamplingParams
    from labengine.trace import InvariantChecker

    model = args.model or labengine.DEFAULT_MODEL
    llm = LLM(model=model, device="cpu", max_num_seqs=max(64, args.prompts))
    prompts = [f"Question {i}: What is the meaning of life?" for i in range(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up (and loads every module)
    patches, sites = compiled_out_patches()

    # the stripped engine really publishes nothing, and gives the same tokens
    seen = []
    apply(patches, True)
    llm.add_event_listener(seen.append)
    stripped_out = llm.generate(prompts[:4], params, use_tqdm=False)
    llm.remove_event_listener(seen.append)
    apply(patches, False)
    assert not seen, f"compiled-out engine still published {len(seen)} events"
    normal_out = llm.generate(prompts[:4], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in stripped_out] == [o.outputs[0].token_ids for o in normal_out]

    events = [0]

    def noop(e):
        events[0] += 1

    def run(v):
        t0 = time.perf_counter()
        if v == "compiled_out":
            apply(patches, True)
            try:
                outs = llm.generate(prompts, params, use_tqdm=False)
            finally:
                apply(patches, False)
        elif v == "listener":
            llm.add_event_listener(noop)
            outs = llm.generate(prompts, params, use_tqdm=False)
            llm.remove_event_listener(noop)
        elif v == "trace":
            with llm.trace() as tr:
                outs = llm.generate(prompts, params, use_tqdm=False)
            run.trace = tr
        elif v == "invariants":
            checker = InvariantChecker(llm.llm_engine).attach()
            outs = llm.generate(prompts, params, use_tqdm=False)
            checker.detach()
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.prompts * args.tokens
        return dt

    for v in variants:  # one untimed full-size round: allocator, caches and branch history warm
        run(v)
    events[0] = 0
    times = {v: [] for v in variants}
    t_start = time.perf_counter()
    for i in range(args.iterations):
        if i >= 2 and time.perf_counter() - t_start > args.max_seconds:
            print(f"stopping after {i} iterations (--max-seconds {args.max_seconds:g})", file=sys.stderr)
            break
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        for v in order:
            times[v].append(run(v))
        print(f"iteration {i + 1}/{args.iterations}: " + "  ".join(f"{v} {times[v][-1]:.3f}" for v in variants),
              file=sys.stderr, flush=True)

    n_tok = args.prompts * args.tokens
    ref = times["compiled_out"]
    print(f"model: {model}")
    print(f"{args.prompts} prompts x {args.tokens} tokens (greedy, ignore_eos), {args.threads} threads, "
          f"{len(ref)} iterations, variants interleaved in one process")
    print(f"{'variant':<14}{'median s':>10}{'min s':>9}{'tokens/s':>10}{'paired ratio':>14}{'min/min':>9}")
    for v in variants:
        ts = times[v]
        ratios = [a / b for a, b in zip(ts, ref)]
        med = statistics.median(ts)
        print(f"{v:<14}{med:>10.3f}{min(ts):>9.3f}{n_tok / med:>10.1f}{statistics.median(ratios):>14.3f}"
              f"{min(ts) / min(ref):>9.3f}")
    print("paired ratio: median over iterations of (variant time / compiled_out time of the same iteration)")
    per_module = ", ".join(f"{k.rsplit('.', 1)[-1]}: {n}" for k, n in sorted(sites.items()))
    print(f"compiled out: {sum(sites.values())} publishing sites in {len(sites)} modules ({per_module}); "
          f"{len(patches)} functions swapped; checked: no event published, same greedy tokens")
    c = count_active_reads(llm, prompts, params)
    cost = c["active_reads"] * c["read_cost_s"]
    print(f"no listener, counted: {c['active_reads']} `bus.active` tests in one generate ({c['steps']} steps, "
          f"{c['active_reads'] / max(c['steps'], 1):.1f} per step) x {c['read_cost_s'] * 1e9:.1f} ns = "
          f"{cost * 1e3:.3f} ms = {100 * cost / statistics.median(ref):.4f}% of the compiled-out run")
    if "trace" in variants:
        tr = run.trace
        t0 = time.perf_counter()
        df = tr.to_dataframe()
        print(f"trace: {len(tr)} events per generate ({len(tr) / max(c['steps'], 1):.1f} per step); "
              f"to_dataframe() {time.perf_counter() - t0:.3f} s for {len(df)} rows (after the run, not timed above)")
    if "listener" in variants:
        print(f"listener: {events[0] // max(1, len(times['listener']))} events delivered per generate")


if __name__ == "__main__":
    main()
