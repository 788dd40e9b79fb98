"""
ArcanaGPT benchmarks: scripts that measure, with their output recorded in bench/RESULTS.md.

    python bench.py                 # every suite that applies to this machine
    python bench.py tokenize ...    # prepare.py: tokens/s with N processes vs one process
    python bench.py kernels ...     # LayerNorm / GELU kernels vs PyTorch eager and torch.compile (GPU)
    python bench.py attention ...   # causal attention vs F.scaled_dot_product_attention backends (GPU)
    python bench.py train ...       # whole training steps: tokens/s, MFU, peak memory per configuration

Each suite parses its own flags: `python bench.py SUITE --help`.
"""

import sys

SUITES = {}  # name -> (function taking argv, one-line description)


def suite(name, description):
    def register(fn):
        SUITES[name] = (fn, description)
        return fn
    return register


# -----------------------------------------------------------------------------
# entry point

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        for name, (_, description) in SUITES.items():
            print(f"  {name:10s} {description}")
        return 0
    if not argv or argv[0] == "all":
        for name, (fn, _) in SUITES.items():
            print(f"=== {name}")
            fn([])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUITES:
        print(f"unknown suite {name!r}; choose from: {', '.join(SUITES)} (or 'all')", file=sys.stderr)
        return 2
    return SUITES[name][0](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
