"""THOR's ablation: the RL variants (trajectory level only, hierarchical, and with --ablation plain-CoT RL) and
the evaluation table (base CoT, cold start, each RL variant, self-correction), written to summary.json and
report.md.

Design: the variants start from the same cold-start model and the rows read only finished models, so they are
independent jobs. With `Preset.side_by_side` > 1 they run at once, one process each (thor_min.side_by_side): the
same work as one after the other, as each draws from its own seeded streams. Limits: never side by side under
torchrun (the ranks already share each job); a CPU runs no more at once than its cores hold.
"""

import json
import os
import time
from pathlib import Path

from thor_min import distributed, side_by_side
from thor_min.evaluate import EvalConfig, evaluate, record_dict
from thor_min.rl import RLConfig, run_rl
from thor_min.rollout import RolloutEngine
from thor_min.run_context import (Run, eval_problems, jobs_at_once, load_policy, make_sandbox, prompt_encoder,
                                  record_stage, run_settings, save_policy, say, side_by_side_or_exit,
                                  training_problems, write_lines)

RL_VARIANTS = {  # directory -> (starts from, tools, step level)
    "rl-traj": ("sft", True, False),
    "rl": ("sft", True, True),
    "rl-cot": ("base", False, False),
}


def rl_config(run: Run, tools: bool, step_level: bool) -> RLConfig:
    preset = run.preset
    return RLConfig(prompts_per_step=preset.rl_prompts, group_size=preset.rl_group,
                    max_new_tokens=preset.rl_max_new_tokens, tools=tools, step_level=step_level,
                    step_suffix_tokens=preset.rl_step_suffix_tokens, step_max_new_tokens=preset.rl_step_max_new_tokens,
                    min_response_tokens=preset.rl_min_response_tokens, minibatches=preset.rl_minibatches,
                    micro_batch_tokens=preset.micro_batch_tokens, lr=preset.rl_lr, batch_size=preset.rollout_batch,
                    seed=run.seed)


def stage_rl(run: Run) -> None:
    """Each RL variant of the run (trajectory-only, full hierarchical, and with --ablation plain-CoT RL): one
    after the other, or side by side in their own processes (`Preset.side_by_side`; thor_min.side_by_side)."""
    variants = list(run.preset.rl_variants) + (["rl-cot"] if run.ablation and "rl-cot" not in run.preset.rl_variants else [])
    todo = []
    for variant in variants:
        if run.resume and run.finished(variant):
            say(f"{variant}: done already, skipping")
        elif RL_VARIANTS[variant][0] == "sft" and not run.finished("sft"):
            raise SystemExit(f"error: {variant} starts from OUT/sft, which does not exist: run --stage sft first")
        else:
            todo.append(variant)
    at_once = jobs_at_once(run, len(todo))
    if at_once <= 1:
        for variant in todo:
            record_stage(run, variant, **train_rl_variant(run, variant))
        return
    say(f"RL: {', '.join(todo)} side by side ({at_once} processes, {max(run.preset.cpu_threads, 1)} thread each)")
    started = time.time()
    jobs = [side_by_side.Job(variant, "thor_min.ablation:rl_variant_job", (run_settings(run), variant),
                             steps=run.preset.rl_steps) for variant in todo]
    for variant, facts in side_by_side_or_exit(jobs, run, at_once).items():
        record_stage(run, variant, side_by_side=True, **facts)
    record_stage(run, "rl-side-by-side", time.time() - started, variants=todo)


def rl_variant_job(settings: dict, variant: str, *, log) -> dict:
    """`train_rl_variant` in a process of its own (thor_min.side_by_side): a Run rebuilt from its settings,
    logging through the parent."""
    run = Run(**settings)
    run.log = log
    return train_rl_variant(run, variant)


def train_rl_variant(run: Run, variant: str) -> dict:
    """Train one RL variant from its start model and save it to OUT/<variant>; returns its stage facts."""
    source, tools, step_level = RL_VARIANTS[variant]
    start = str(run.model_dir(source)) if source == "sft" else run.base_model()
    say(f"{variant}: {run.preset.rl_steps} steps from {source} (tools={'on' if tools else 'off'}, "
        f"step level={'on' if step_level else 'off'})")
    started = time.time()
    model, tokenizer = load_policy(run, start, trainable=True)
    problems = training_problems(run, 4096, salt=1)
    quick_eval = list(eval_problems(run).values())[0][:64]
    with make_sandbox(run) as sandbox:
        engine = distributed.ShardedEngine(RolloutEngine(model, tokenizer, sandbox))
        config = EvalConfig(samples=1, temperature=0.0, max_new_tokens=run.preset.eval_max_new_tokens,
                            batch_size=run.preset.rollout_batch)
        evaluate_greedy = lambda: {"accuracy": evaluate(engine, quick_eval, run.template(tokenizer), config,
                                                         tools=tools, desc=f"{variant}: greedy eval")[1]["accuracy"]}
        last = run_rl(model, tokenizer, engine, problems, prompt_encoder(run, tokenizer, tools),
                      rl_config(run, tools, step_level), run.preset.rl_steps, log=run.log, stage=variant,
                      checkpoint_dir=run.out / "checkpoints" / variant, resume=run.resume,
                      eval_every=run.preset.rl_eval_every, evaluate=evaluate_greedy,
                      checkpoint_every=run.preset.rl_checkpoint_every)
    save_policy(run, model, tokenizer, variant)
    return {"seconds": time.time() - started, "final_reward": last.get("reward")}


EVAL_ROWS = (  # (row name, model directory, tools, self-correction) -- THOR's ablation table
    ("base-cot", "base", False, False),
    ("cold-start", "sft", True, False),
    ("cot-sft", "sft-cot", False, False),
    ("traj-rl", "rl-traj", True, False),
    ("step-rl", "rl", True, False),
    ("self-correct", "rl", True, True),
    ("cot-rl", "rl-cot", False, False),
)


def summarise_row(name: str, model_dir: str, tools: bool, self_correct: bool, per_benchmark: dict) -> dict:
    """One table row: primary benchmarks averaged (tiny: the test split), "-heldout" sets separately."""
    primary = {k: v for k, v in per_benchmark.items() if not k.endswith("-heldout")}
    heldout = {k: v for k, v in per_benchmark.items() if k.endswith("-heldout")}

    def mean(key, sets):
        values = [s[key] for s in sets.values() if s[key] == s[key]]   # skip NaN
        return sum(values) / len(values) if values else None

    return {"name": name, "model": model_dir, "tools": tools, "self_correct": self_correct,
            "accuracy": mean("accuracy", primary),
            "ci95": [mean_bound(primary, 0), mean_bound(primary, 1)],
            "cell_call_rate": mean("cell_call_rate", primary), "cell_pass_rate": mean("cell_pass_rate", primary),
            "tokens": mean("tokens", primary), "pass_at_k": mean("pass_at_k", primary),
            "maj_at_k": mean("maj_at_k", primary), "best_of_n": mean("best_of_n", primary),
            "heldout_accuracy": mean("accuracy", heldout) if heldout else None,
            "kinds": {kind: value for s in per_benchmark.values() for kind, value in s.get("kinds", {}).items()},
            "benchmarks": per_benchmark}


def mean_bound(sets: dict, index: int) -> float:
    """The average of the benchmarks' interval bounds (exact for one benchmark, an approximation for several)."""
    return sum(s["ci95"][index] for s in sets.values()) / len(sets)


def stage_eval(run: Run) -> dict:
    """Evaluate every ablation row that has a model (side by side in their own processes with
    `Preset.side_by_side` > 1); write eval/*.jsonl, summary.json, report.md and its charts."""
    from thor_min.report import machine_name

    preset, started = run.preset, time.time()
    sets = eval_problems(run)
    say(f"eval: {', '.join(f'{k} ({len(v)})' for k, v in sets.items())}, avg@{preset.eval_samples}")
    (run.out / "eval").mkdir(parents=True, exist_ok=True)
    todo = []
    for row in EVAL_ROWS:
        if row[1] != "base" or run.is_tiny:
            if not run.finished(row[1]):
                say(f"eval: {row[0]}: no OUT/{row[1]}, row skipped")
                continue
        todo.append(row)
    chunks = split_rows(todo, jobs_at_once(run, len(todo)))
    if len(chunks) <= 1:
        rows = evaluate_rows(run, todo, sets)
    else:
        say(f"eval: {len(todo)} rows in {len(chunks)} processes side by side")
        jobs = [side_by_side.Job(f"eval {', '.join(row[0] for row in chunk)}", "thor_min.ablation:eval_rows_job",
                                 (run_settings(run), chunk), steps=len(chunk)) for chunk in chunks]
        rows = [row for result in side_by_side_or_exit(jobs, run, len(jobs)).values() for row in result]
    record_stage(run, "eval", time.time() - started)
    stages = json.loads((run.out / "stages.json").read_text())
    summary = {"rows": rows, "seconds": run_seconds(stages),
               "cores": os.cpu_count(), "machine": machine_name(), "stages": stages, "model": preset.model,
               "samples": preset.eval_samples, "temperature": preset.eval_temperature, **distributed.describe()}
    write_summary(run.out, summary)
    return summary


def split_rows(rows: list, parts: int) -> list[list]:
    """`rows` in `parts` consecutive chunks of near-equal length (rows of one model are neighbours in EVAL_ROWS,
    so most chunks load each model once)."""
    parts = max(1, min(parts, len(rows)))
    sizes = [len(rows) // parts + (index < len(rows) % parts) for index in range(parts)]
    return [rows[sum(sizes[:index]):sum(sizes[:index + 1])] for index in range(parts)]


def eval_rows_job(settings: dict, rows: list, *, log) -> list[dict]:
    """`evaluate_rows` in a process of its own (thor_min.side_by_side), on the benchmarks it loads itself."""
    run = Run(**settings)
    return evaluate_rows(run, rows, eval_problems(run), progress=log.progress)


def evaluate_rows(run: Run, rows: list, sets: dict, progress=None) -> list[dict]:
    """Each (name, model dir, tools, self-correction) row on every benchmark of `sets`: eval/<row>-<benchmark>.jsonl,
    and the row's summary."""
    preset, summaries, loaded = run.preset, [], (None, None, None)
    with make_sandbox(run) as sandbox:   # one sandbox for every row (its zygotes take a second or two to start)
        for name, model_dir, tools, self_correct in rows:
            location = run.base_model() if model_dir == "base" else str(run.model_dir(model_dir))
            if loaded[0] != location:
                loaded = (location, *load_policy(run, location, trainable=False))
            _, model, tokenizer = loaded
            config = EvalConfig(samples=preset.eval_samples, temperature=preset.eval_temperature,
                                max_new_tokens=preset.eval_max_new_tokens,
                                self_correct=preset.self_correct if self_correct else 0,
                                backtrack_tokens=preset.backtrack_tokens, batch_size=preset.rollout_batch,
                                seed=run.seed)
            engine = distributed.ShardedEngine(RolloutEngine(model, tokenizer, sandbox))
            per_benchmark = {}
            for bench, problems in sets.items():
                records, summary = evaluate(engine, problems, run.template(tokenizer), config, tools=tools,
                                            desc=f"eval {name} / {bench}")
                write_lines(run.out / "eval" / f"{name}-{bench}.jsonl", [record_dict(r) for r in records])
                per_benchmark[bench] = summary
            summaries.append(summarise_row(name, model_dir, tools, self_correct, per_benchmark))
            say(f"eval: {name}: accuracy {summaries[-1]['accuracy']:.3f}")
            if progress is not None:
                progress(len(summaries))
    return summaries


def run_seconds(stages: dict) -> float:
    """The run's wall time from stages.json: every stage once, side-by-side variants by their shared wall time."""
    return round(sum(facts["seconds"] for facts in stages.values() if not facts.get("side_by_side")), 1)


@distributed.rank_zero_writes
def write_summary(out: Path, summary: dict) -> None:
    from thor_min.report import write_report

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary)


