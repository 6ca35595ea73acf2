"""Solve math problems with a tool-integrated model, or score it on a benchmark.

    python generate.py --model qwen-1.5b "What is 7^222 mod 1000?"          # print each trajectory
    python generate.py --model runs/tiny/rl --bench tiny --samples 4          # score a benchmark
    python generate.py --model M --data problems.jsonl --out samples.jsonl --summary summary.json

A thin layer over `thor_min.rollout.RolloutEngine` (batched KV-cache sampling; python cells run in
`thor_min.sandbox.Sandbox` mid-generation) and `thor_min.evaluate` (grading and metrics). Problem mode prints
each sample's trajectory with its code and outputs; benchmark mode (`--bench NAME` or `--data FILE.jsonl`) prints
avg@k with a 95% interval, pass@k, maj@k, self-rewarded best-of-N (a sample whose cells all passed), the cell call
and pass rates and the sampled tokens per sample (self-correction retries included), writes every sample to
`--out` (JSONL) and the summary to `--summary` (JSON). Bad input (unknown model or benchmark, a missing or
malformed file) is reported in one line with exit status 2.
"""

import argparse
import json
import math
import sys
from pathlib import Path

OUTPUT_COLOUR, CODE_COLOUR, RESET = "\033[2m", "\033[36m", "\033[0m"


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="generate.py", description=__doc__.split("\n")[0])
    parser.add_argument("problems", nargs="*", metavar="PROBLEM", help="problem texts to solve (problem mode)")
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", required=True, help="alias (qwen-1.5b, qwen-7b, qwen3-1.7b, ...), hub id or "
                      "local directory (e.g. runs/tiny/rl)")
    what.add_argument("--bench", metavar="NAME", help="benchmark: math500, aime24, amc23, minerva, olympiadbench, "
                      "gsm8k, tiny, tiny-heldout, or hf:OWNER/NAME[:SPLIT]")
    what.add_argument("--data", metavar="FILE", help="a .jsonl file of problems (problem/question + answer)")
    what.add_argument("--limit", type=int, metavar="N", help="only the first N problems")
    what.add_argument("--template", default="auto", help="prompt template: auto (from the model), none (the "
                      "problem text verbatim), tiny, qwen-math or qwen3")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--samples", type=int, help="samples per problem (default: 4 for a benchmark, else 1)")
    sampling.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    sampling.add_argument("--max-new-tokens", type=int, default=3200, help="completion tokens, outputs included (default 3200)")
    sampling.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    tools = parser.add_argument_group("tools")
    tools.add_argument("--max-tool-calls", type=int, default=10, help="executed cells per sample; 0 = plain "
                       "chain-of-thought, nothing is executed (default 10)")
    tools.add_argument("--self-correct", type=int, default=0, metavar="N", help="retries per failed cell: "
                       "drop the block and resample it (THOR uses 4; default 0)")
    tools.add_argument("--backtrack-tokens", type=int, default=500, help="tokens before a failed block that a "
                       "retry also resamples (default 500)")
    tools.add_argument("--timeout", type=float, default=10.0, help="seconds per cell (default 10)")
    tools.add_argument("--workers", type=int, default=None, help="sandbox worker processes (default: CPUs)")
    runtime = parser.add_argument_group("runtime and output")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    runtime.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    runtime.add_argument("--load-in-4bit", action="store_true", help="quantise the weights to NF4 (bitsandbytes)")
    runtime.add_argument("--random-init", action="store_true", help="random weights in the model's real "
                         "architecture (alias or config.json file), real tokenizer, no download: a rehearsal")
    runtime.add_argument("--out", metavar="FILE", help="write every sample as one JSON object per line")
    runtime.add_argument("--summary", metavar="FILE", help="benchmark mode: write the summary as JSON")
    return parser


def check_args(parser, args) -> None:
    sources = sum(map(bool, (args.problems, args.bench, args.data)))
    if sources != 1:
        parser.error("give problem texts, --bench NAME or --data FILE (exactly one of them)")
    if args.summary and not (args.bench or args.data):
        parser.error("--summary needs --bench or --data")
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.max_tool_calls, args.self_correct, args.backtrack_tokens, args.limit or 0) < 0:
        parser.error("--max-tool-calls, --self-correct, --backtrack-tokens and --limit must be >= 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.timeout <= 0:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1 and --timeout > 0")


def load_problem_list(args):
    """Problems of the benchmark, the file, or the texts given on the command line (a DataError if unreadable)."""
    from thor_min.data import DataError, Problem, load_jsonl, load_problems

    if args.problems:
        texts = args.problems[:args.limit] if args.limit is not None else args.problems
        problems = [Problem(id=f"problem-{i}", question=text, answer="") for i, text in enumerate(texts)]
    elif args.data:
        if not Path(args.data).is_file():
            raise DataError(f"no such file: {args.data}")
        problems = load_jsonl(Path(args.data), limit=args.limit)
    else:
        problems = load_problems(args.bench, limit=args.limit)
    if not problems:
        raise DataError(f"no problems to solve in {args.data or args.bench or 'the command line'}")
    return problems


def eval_config(args):
    from thor_min.evaluate import EvalConfig

    samples = args.samples or (1 if args.problems else 4)
    return EvalConfig(samples=samples, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, max_tool_calls=args.max_tool_calls,
                      self_correct=args.self_correct, backtrack_tokens=args.backtrack_tokens,
                      batch_size=args.batch_size, seed=args.seed)


# ----------------------------------------------------------------------------------------------
# Problem mode


def solve(engine, problems, template: str, config, tools: bool):
    """Sample `config.samples` completions per problem; returns (problem, rollout) pairs in order."""
    from thor_min.evaluate import sample_rollouts

    rollouts = sample_rollouts(engine, problems, template, config, tools=tools, desc="solve")
    return [(problems[r.request], r) for r in rollouts]


def render(text: str, colour: bool) -> str:
    """The trajectory; on a terminal, code blocks and outputs are coloured."""
    from thor_min.trajectory import split_segments

    if not colour:
        return text
    pieces = []
    for segment, is_output in split_segments(text):
        if is_output:
            pieces.append(f"{OUTPUT_COLOUR}{segment}{RESET}")
        else:
            pieces.append(segment.replace("```python", f"{CODE_COLOUR}```python").replace("\n```", f"\n```{RESET}"))
    return "".join(pieces)


def print_trajectory(problem, rollout, samples: int, colour: bool) -> None:
    from thor_min.grader import extract_boxed

    header = f"problem {rollout.request + 1}" + (f", sample {rollout.sample + 1}" if samples > 1 else "")
    print(f"=== {header} " + "=" * max(0, 60 - len(header)))
    print(f"Q: {problem.question}\n")
    print(render(rollout.text, colour))
    cells = rollout.executed_cells
    print(f"\n--- answer: {extract_boxed(rollout.text)} | cells: {len(cells)} ({sum(c.passed for c in cells)} "
          f"passed) | retries: {rollout.retries} | tokens: {rollout.sampled_tokens} | "
          f"finish: {rollout.finish_reason}\n")


def problem_mode_record(problem, rollout) -> dict:
    """A problem-mode sample: nothing to grade against, so `correct` and `gold` are null."""
    from thor_min.evaluate import record_dict, sample_record

    return {**record_dict(sample_record(problem, rollout, None)), "gold": problem.answer or None}


# ----------------------------------------------------------------------------------------------
# Benchmark mode


def summary_table(summary: dict, name: str) -> str:
    k = summary["samples"]
    low, high = summary["ci95"]
    rows = [("problems", f"{summary['problems']}"),
            (f"accuracy (avg@{k})", f"{summary['accuracy']:.3f}  [95% CI {low:.3f}, {high:.3f}]"),
            (f"pass@{k}", f"{summary['pass_at_k']:.3f}"), (f"maj@{k}", f"{summary['maj_at_k']:.3f}"),
            (f"best-of-{k} (cells all passed)", f"{summary['best_of_n']:.3f}"),
            ("cell call rate", f"{summary['cell_call_rate']:.3f}"),
            ("cell pass rate", f"{summary['cell_pass_rate']:.3f}"),
            ("cells / sample", f"{summary['cells_per_sample']:.2f}"),
            ("cell attempts / sample", f"{summary['cell_attempts']:.2f}"),
            ("tokens / sample (with retries)", f"{summary['tokens']:.1f}"),
            ("seconds", f"{summary['seconds']:.1f}")]
    width = max(len(label) for label, _ in rows)
    lines = [f"{name}", "-" * (width + 32)] + [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def json_safe(value):
    """NaN (e.g. a pass rate with no cells) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def write_jsonl(path: str, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Main


def run(args) -> int:
    import torch

    from thor_min.evaluate import evaluate, record_dict
    from thor_min.models import TEMPLATES, ModelLoadError, detect_template, load_model, silence_library_logs
    from thor_min.rollout import RolloutEngine
    from thor_min.sandbox import Sandbox

    if args.template != "auto" and args.template not in TEMPLATES:
        raise ModelLoadError(f"unknown template {args.template!r}: choose auto, {', '.join(TEMPLATES)}")
    problems = load_problem_list(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    silence_library_logs()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                  random_init=args.random_init)
    template = detect_template(args.model, tokenizer) if args.template == "auto" else args.template
    config, tools = eval_config(args), args.max_tool_calls > 0
    sandbox = Sandbox(workers=args.workers, timeout=args.timeout) if tools else None
    try:
        engine = RolloutEngine(model, tokenizer, sandbox)
        if args.problems:
            pairs = solve(engine, problems, template, config, tools)
            for problem, rollout in pairs:
                print_trajectory(problem, rollout, config.samples, colour=sys.stdout.isatty())
            if args.out:
                write_jsonl(args.out, [problem_mode_record(problem, rollout) for problem, rollout in pairs])
            return 0
        records, summary = evaluate(engine, problems, template, config, tools=tools, desc=args.bench or args.data)
    finally:
        if sandbox is not None:
            sandbox.close()
    summary.update(model=args.model, source=args.bench or args.data, template=template, **vars(config))
    print(summary_table(summary, f"{args.bench or args.data} ({args.model}, template {template})"))
    if args.out:
        write_jsonl(args.out, [record_dict(record) for record in records])
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from thor_min.data import DataError
    from thor_min.grader import GraderError
    from thor_min.models import ModelLoadError
    from thor_min.sandbox import SandboxError

    try:
        return run(args)
    except (DataError, GraderError, ModelLoadError, SandboxError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
