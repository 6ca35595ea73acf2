"""Run one Python cell in thor-min's sandbox and print what the model would see, or run the sandbox bench.

    python sandbox.py -c "print(2 ** 10)"        # prints 1024, exits 0
    python sandbox.py cell.py                    # a file ('-' reads stdin); exits 1 if the cell did not pass
    python sandbox.py --bench                    # executions/s vs a fresh python3 per cell, and the ratio

The exit status is 0 when the cell passed (exited cleanly and printed something), 1 when it did not,
2 for a usage error. `--json` prints every ExecResult field instead of the observation.
"""

import argparse
import dataclasses
import json
import sys

from thor_min.bench import sandbox as sandbox_bench
from thor_min.sandbox import Sandbox

DEFAULT_TIMEOUT = 5.0


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="sandbox.py", description="Run one Python cell in the thor-min sandbox and print its observation "
        "(stdout on success, else the error's last line). Exit status: 0 passed, 1 failed, 2 usage error.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("file", nargs="?", metavar="FILE", help="file holding the cell ('-' reads stdin)")
    source.add_argument("-c", dest="code", metavar="CODE", help="the cell's code as a string")
    source.add_argument("--bench", action="store_true",
                        help="print executions/s of ours vs a fresh python3 process per cell, and the ratio")
    parser.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds (default 5; "
                        "30 with --bench)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per cell (default 1024)")
    parser.add_argument("--json", action="store_true", help="print all result fields as JSON")
    parser.add_argument("--workers", type=int, default=None, help="--bench only: parallelism (default: CPUs)")
    parser.add_argument("--cells", type=int, default=200, help="--bench only: sandbox cells (default 200)")
    parser.add_argument("--fresh-cells", type=int, default=16, help="--bench only: fresh-process cells (default 16)")
    return parser


def read_cell(parser: argparse.ArgumentParser, path: str) -> str:
    """The file's text; bytes that are not UTF-8 become lone surrogates, which the cell then reports."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as error:
        parser.error(f"cannot read {path}: {error.strerror}")
    return data.decode("utf-8", "surrogateescape")


def main(argv: list) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0 or args.memory_mb < 64:
        parser.error("--timeout must be > 0 and --memory-mb >= 64")
    if args.bench:
        bench_argv = ["--cells", str(args.cells), "--fresh-cells", str(args.fresh_cells)]
        bench_argv += ["--workers", str(args.workers)] if args.workers else []
        bench_argv += ["--timeout", str(args.timeout)] if args.timeout is not None else []
        return sandbox_bench.main(bench_argv)
    if args.code is None and args.file is None:
        parser.error("give -c CODE, a FILE or --bench")
    code = args.code if args.code is not None else read_cell(parser, args.file)
    with Sandbox(workers=1, timeout=args.timeout or DEFAULT_TIMEOUT, memory_limit=args.memory_mb << 20) as sandbox:
        result = sandbox.run(code)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else result.observation)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
