"""Dispatch `python -m thor_min.bench NAME [args]` to `thor_min.bench.NAME.main(args)` (a dash in NAME is `_`)."""

import importlib
import sys

BENCHES = ("logprobs", "rl-step", "rollout", "sandbox")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m thor_min.bench {{{','.join(BENCHES)}}} [args]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"thor_min.bench.{argv[0].replace('-', '_')}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
