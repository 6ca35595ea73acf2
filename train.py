"""Train with THOR: pretrain (tiny world) -> TIRGen -> cold-start SFT -> hierarchical RL -> evaluation.

    python train.py                          # the whole pipeline on the tiny world, ~10 minutes on 2 Zen 4 cores
    python train.py --ablation               # ... plus plain-CoT SFT and RL without tools (no-tool rows)
    python train.py --model qwen-1.5b        # Qwen2.5-Math-1.5B on one 24 GB GPU (LoRA, checkpointing)
    python train.py --stage rl --resume      # one stage; --resume continues an interrupted run
    torchrun --nproc_per_node 8 train.py --model qwen-7b   # data-parallel on 8 GPUs (README: More than one GPU)
    python train.py --seeds 0 1 2            # one run per seed in OUT/seed-N, then OUT/seeds.md and seeds.json

Every default lives in thor_min/config.py (one preset per model alias); flags below override it.
Outputs go to --out (default runs/<model>): metrics.jsonl, curves.png, report.md, summary.json, ablation.png,
templates.png; --report-to tensorboard|wandb|trackio also sends the metrics to those trackers.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (set before torch loads): on a 2-core machine a spinning torch
# thread competes with the sandbox, the grader and anything else running, which made steps 1.5-4x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STAGE_CHOICES = ("all", "pretrain", "tirgen", "sft", "rl", "eval")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    run = parser.add_argument_group("run")
    run.add_argument("--model", default="tiny", help="tiny, an alias (qwen-1.5b, qwen-7b, qwen3-1.7b, qwen3-8b), "
                     "a hub id or a local directory (default: tiny)")
    run.add_argument("--stage", default="all", choices=STAGE_CHOICES, help="which stage to run (default: all)")
    run.add_argument("--out", type=Path, help="output directory (default: runs/<model>)")
    run.add_argument("--resume", action="store_true", help="skip finished stages, continue from the last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")
    run.add_argument("--ablation", action="store_true", help="also run the no-tool rows: SFT on plain-CoT references of the "
                     "TIRGen problems (cot-sft) and RL without tools (cot-rl)")
    run.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init (default: 0)")
    run.add_argument("--seeds", type=int, nargs="+", help="run every flag given once per seed, each in OUT/seed-N, then "
                     "write the table across seeds (mean and range per row) to OUT/seeds.md and OUT/seeds.json")
    run.add_argument("--jobs", type=int, default=1, help="with --seeds: how many seeds run at once, each logging to "
                     "OUT/seed-N.log (default: 1)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    run.add_argument("--report-to", nargs="+", default=["none"], metavar="TRACKER",
                     help="also send metrics to none, or any of tensorboard, wandb, trackio (metrics.jsonl is always "
                          "written; each tracker is an extra: pip install -e \".[tensorboard]\")")
    run.add_argument("--random-init", action="store_true", help="base model and LLM critic with random weights in "
                     "their real architecture (thor_min/configs), real tokenizer, no download: a rehearsal")
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", help="TIRGen/RL problems: a .jsonl file, hf:OWNER/NAME[:SPLIT], or tiny")
    data.add_argument("--benchmarks", nargs="+", help="evaluation sets (default: the preset's)")
    data.add_argument("--eval-problems", type=int, help="problems per benchmark (default: all)")
    memory = parser.add_argument_group("memory")
    memory.add_argument("--lora-rank", type=int, help="LoRA rank, 0 = full fine-tuning")
    memory.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling alpha / rank)")
    memory.add_argument("--load-in-4bit", action="store_true", default=None, help="QLoRA: NF4 base weights")
    memory.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in backward (default: the preset's)")
    memory.add_argument("--micro-batch-tokens", type=int, help="tokens per forward/backward pass")
    memory.add_argument("--rollout-batch", type=int, help="sampled rows per forward in rollouts (KV cache size)")
    memory.add_argument("--threads", dest="cpu_threads", type=int,
                        help="torch threads on a CPU in TIRGen, RL and eval, 0 = one per core (default: the preset's; tiny: 1)")
    memory.add_argument("--side-by-side", type=int, metavar="N", help="TIRGen shares, RL variants and eval rows run "
                        "at once, each in its own process (default: the preset's; tiny: 2, one per core; 1 = one after the other)")
    memory.add_argument("--max-new-tokens", type=int, help="response length in RL and evaluation (KV cache size)")
    run.add_argument("--checkpoint-every", type=int, help="optimiser steps between checkpoints")
    run.add_argument("--dist-timeout", type=float, default=30.0, help="under torchrun: minutes a rank waits for "
                     "the others in a collective before the run fails (a dead rank ends the run; default: 30)")
    pretrain = parser.add_argument_group("pretraining (tiny world)")
    pretrain.add_argument("--pretrain-steps", type=int, help="pretraining budget in steps (cosine learning rate)")
    pretrain.add_argument("--pretrain-lr", type=float, help="peak pretraining learning rate")
    pretrain.add_argument("--pretrain-seed", type=int, help="seed of the tiny base (default: the preset's; tiny: 2)")
    pretrain.add_argument("--pretrain-batch", type=int, help="packed blocks per pretraining step")
    pretrain.add_argument("--tiny-base", choices=("shipped", "train"),
                          help="shipped (default): start from thor_min/assets/tiny-base, pretrained with the preset's "
                               "settings (other settings train a new base); train: always pretrain")
    tirgen = parser.add_argument_group("TIRGen")
    tirgen.add_argument("--critic", help="rule, or an instruct model alias / hub id / directory")
    tirgen.add_argument("--tirgen-problems", type=int, help="problems to generate data for")
    tirgen.add_argument("--tirgen-attempts", type=int, help="actor-critic attempts per problem")
    tirgen.add_argument("--tirgen-problems-per-round", type=int, metavar="N",
                        help="problems per resumable round; side by side, each process takes a share of the rounds")
    tirgen.add_argument("--code-filter", dest="tirgen_code_filter", choices=("library", "lines", "none"),
                        help="code-quality rule: > 5 lines for most cells (code, the Qwen default), library call / "
                             "control flow (paper), none (tiny)")
    sft = parser.add_argument_group("cold-start SFT")
    sft.add_argument("--sft-lr", type=float)
    sft.add_argument("--sft-epochs", type=float)
    sft.add_argument("--sft-train-on-outputs", action="store_true", default=None,
                     help="also train on observation tokens (default: masked)")
    rl = parser.add_argument_group("hierarchical RL")
    rl.add_argument("--rl-steps", type=int)
    rl.add_argument("--rl-prompts", type=int, help="prompts per RL step")
    rl.add_argument("--group-size", dest="rl_group", type=int, help="samples per prompt (G)")
    rl.add_argument("--rl-lr", type=float)
    rl.add_argument("--rl-minibatches", type=int, help="optimiser steps per rollout batch (off-policy reuse)")
    rl.add_argument("--no-step-level", action="store_true", help="trajectory-level RL only (ablation)")
    rl.add_argument("--no-tools", action="store_true", help="plain chain-of-thought RL from the base (ablation)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-samples", type=int, help="samples per problem (Avg@k)")
    evaluation.add_argument("--self-correct", type=int, help="retries per failed cell at inference")
    return parser.parse_args(argv)


def build_run(args):
    from thor_min.config import override, preset_for
    from thor_min.run_context import Run

    preset = preset_for(args.model)
    variants = preset.rl_variants
    if args.no_tools:
        variants = ("rl-cot",)
    elif args.no_step_level:
        variants = ("rl-traj",)
    preset = override(preset, train_data=args.train_data, benchmarks=tuple(args.benchmarks) if args.benchmarks else None,
                      eval_problems=args.eval_problems, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      load_in_4bit=args.load_in_4bit, gradient_checkpointing=args.gradient_checkpointing,
                      micro_batch_tokens=args.micro_batch_tokens, rollout_batch=args.rollout_batch,
                      cpu_threads=args.cpu_threads, rl_max_new_tokens=args.max_new_tokens, eval_max_new_tokens=args.max_new_tokens, critic=args.critic,
                      checkpoint_every=args.checkpoint_every, pretrain_steps=args.pretrain_steps,
                      pretrain_lr=args.pretrain_lr, pretrain_batch=args.pretrain_batch, pretrain_seed=args.pretrain_seed,
                      tiny_base=args.tiny_base,
                      tirgen_problems=args.tirgen_problems, tirgen_attempts=args.tirgen_attempts,
                      tirgen_problems_per_round=args.tirgen_problems_per_round,
                      tirgen_code_filter=args.tirgen_code_filter, sft_lr=args.sft_lr, sft_epochs=args.sft_epochs,
                      sft_train_on_outputs=args.sft_train_on_outputs, rl_steps=args.rl_steps,
                      rl_prompts=args.rl_prompts, rl_group=args.rl_group, rl_lr=args.rl_lr,
                      rl_minibatches=args.rl_minibatches, side_by_side=args.side_by_side, rl_variants=variants,
                      eval_samples=args.eval_samples,
                      self_correct=args.self_correct)
    if preset.side_by_side < 1:
        raise ValueError(f"--side-by-side must be at least 1 (1 = one job after the other), got {preset.side_by_side}")
    if preset.tirgen_problems_per_round < 1:
        raise ValueError(f"--tirgen-problems-per-round must be at least 1, got {preset.tirgen_problems_per_round}")
    out = args.out or Path("runs") / args.model.strip("/").replace("/", "--")
    return Run(preset=preset, out=out, seed=args.seed, device=args.device, resume=args.resume, ablation=args.ablation,
               report_to=tuple(args.report_to), random_init=args.random_init)


def check_out_dir(args, out: Path) -> None:
    """Never silently mix or destroy runs: a full run into a used directory needs --resume or --overwrite."""
    import shutil

    used = out.exists() and any(out.iterdir())
    if used and args.overwrite:
        shutil.rmtree(out)
    elif used and args.stage == "all" and not args.resume:
        raise SystemExit(f"error: {out} already holds a run: pass --resume to continue it, --overwrite to start "
                         f"over, or --out DIR for a new one")


SEED_FLAGS = {"--seeds": None, "--jobs": 1, "--seed": 1, "--out": 1, "--overwrite": 0}   # flag -> values (None: a list)


def seed_argv(argv: list[str], seed: int, out: Path) -> list[str]:
    """One seed's arguments: the given ones without --seeds/--jobs/--seed/--out, then its own --seed and --out."""
    kept, index = [], 0
    while index < len(argv):
        flag = argv[index].split("=", 1)[0]
        index += 1
        if flag not in SEED_FLAGS:
            kept.append(argv[index - 1])
        elif "=" not in argv[index - 1]:
            if SEED_FLAGS[flag] is None:
                while index < len(argv) and not argv[index].startswith("--"):
                    index += 1
            else:
                index += SEED_FLAGS[flag]
    return kept + ["--seed", str(seed), "--out", str(out)]


def share_base(args, argv: list[str], out: Path, todo: list[int]) -> list[str] | None:
    """A fixed pretraining seed gives every seed the same base: pretrain it once, in the first seed's run, and copy
    it (model, stage record, curve rows) into the other seeds' directories. Returns the extra flags every seed then
    runs with (--resume: skip the finished pretraining), or None when the base cannot be shared this way."""
    import shutil

    from thor_min import tiny

    fresh = all(not (out / f"seed-{s}").exists() or not any((out / f"seed-{s}").iterdir()) for s in todo)
    preset = build_run(args).preset
    if preset.pretrain_seed is None or args.stage != "all" or len(todo) < 2 or not (fresh or args.resume):
        return None
    if tiny.uses_shipped_base(preset, preset.pretrain_seed):
        return None   # every seed copies the shipped base itself
    first = out / f"seed-{todo[0]}"
    if not (first / "base" / "config.json").is_file():
        print(f"seed {todo[0]}: pretraining the base that every seed shares", flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), *seed_argv(argv, todo[0], first), "--stage", "pretrain"]
        if subprocess.run(command).returncode != 0:
            raise SystemExit("error: pretraining the shared base failed (see its output above)")
    for seed in todo[1:]:
        target = out / f"seed-{seed}"
        if not (target / "base" / "config.json").is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copytree(first / "base", target / "base", dirs_exist_ok=True)
            for name in ("stages.json", "metrics.jsonl"):
                shutil.copy(first / name, target / name)
    return ["--resume"]


def run_seeds(args, argv: list[str], out: Path) -> int:
    """Each seed is a `train.py` process of its own, up to --jobs at once, each with the default threads (so a
    seed's numbers equal those of a plain `python train.py --seed N`), sharing one base when the preset fixes the
    pretraining seed; with --resume a seed whose summary.json exists is not run again. Then the table across seeds."""
    import shutil

    from thor_min.report import write_seeds_table

    if args.jobs < 1 or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("error: --jobs must be at least 1 and --seeds must not repeat a seed")
    todo = [s for s in args.seeds if not (args.resume and (out / f"seed-{s}" / "summary.json").exists())]
    for seed in todo if args.overwrite else ():
        shutil.rmtree(out / f"seed-{seed}", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    extra = share_base(args, argv, out, todo) or []
    running, failed = [], []
    for position, seed in enumerate(todo):
        command = seed_argv(argv, seed, out / f"seed-{seed}") + [flag for flag in extra if flag not in argv]
        log = (out / f"seed-{seed}.log").open("w") if args.jobs > 1 else None
        print(f"seed {seed}: python train.py {' '.join(command)}" + (f" > {log.name}" if log else ""), flush=True)
        running.append((seed, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *command],
                                               stdout=log, stderr=subprocess.STDOUT if log else None)))
        while len(running) >= args.jobs or (position == len(todo) - 1 and running):
            seed_done, process = running.pop(0)
            if process.wait() != 0:
                failed.append(seed_done)
    if failed:
        print(f"error: seeds {', '.join(map(str, failed))} failed (see their output); no table written", file=sys.stderr)
        return 1
    missing = [s for s in args.seeds if not (out / f"seed-{s}" / "summary.json").exists()]
    if missing:
        print(f"seeds {', '.join(map(str, missing))} have no summary.json (not evaluated): no table written")
        return 0
    write_seeds_table(out, {s: out / f"seed-{s}" / "summary.json" for s in args.seeds})
    print(f"table across seeds {', '.join(map(str, args.seeds))}: {out / 'seeds.md'}, {out / 'seeds.json'}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = args.out or Path("runs") / args.model.strip("/").replace("/", "--")
    from thor_min.trackers import TrackerError, check_report_to

    try:
        check_report_to(args.report_to)
    except TrackerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.seeds:
        return run_seeds(args, argv, out)
    import torch

    from thor_min import distributed
    distributed.setup(args.dist_timeout)
    distributed.rank_zero_writes(check_out_dir)(args, out)
    from thor_min.data import DataError
    from thor_min.grader import GraderError
    from thor_min.models import ModelLoadError, silence_library_logs
    from thor_min.pipeline import run_stages

    silence_library_logs()
    run = None
    try:
        run = build_run(args)
        run_stages(run, args.stage)
    except (ModelLoadError, DataError, GraderError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of GPU memory: lower --rollout-batch, --max-new-tokens or --micro-batch-tokens, or use "
              "--lora-rank 16 / --load-in-4bit / --gradient-checkpointing", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with python train.py --resume --out {out} ...", file=sys.stderr)
        return 130
    finally:
        if run is not None:
            run.log.close()
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
