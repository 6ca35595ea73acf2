"""The THOR pipeline as stages: pretrain (tiny world only) -> TIRGen -> cold-start SFT -> RL -> evaluation.

`train.py` parses flags into a `Run` and calls `run_stages`. Each stage reads the previous stage's output
directory and writes its own, so any stage can be (re)run alone with `--stage`:

    OUT/base/       the tiny base model (pretrained on plain chain-of-thought)   [tiny only]
    OUT/tirgen.jsonl, tirgen_stats.json, tirgen_raw.jsonl                       [TIRGen]
    OUT/sft/        cold-start model                                            [SFT]
    OUT/sft-cot/    SFT on the plain-CoT references of the same problems (--ablation)
    OUT/rl-traj/    trajectory-level RL only (ablation)                         [RL]
    OUT/rl/         full hierarchical RL (trajectory + step level)              [RL]
    OUT/rl-cot/     plain chain-of-thought RL from the base, no tools (--ablation)
    OUT/metrics.jsonl, curves.png (all stages); report.md, summary.json, ablation.png, templates.png, eval/  [eval]

This module holds the stages up to the cold start; RL and evaluation (THOR's ablation) are in thor_min.ablation,
and the `Run` every stage takes, with the helpers they share, in thor_min.run_context.

A finished stage leaves its model directory (written last); with `--resume` finished stages are skipped and
an interrupted one continues from its checkpoint under OUT/checkpoints/. Limits: stages run one after the
other (TIRGen shares, RL variants and eval rows side by side with `Preset.side_by_side`; under torchrun, one
rank per GPU: thor_min.distributed); real models need a GPU and a reachable (or local) model and dataset.
"""

import json
import shutil
import time
from contextlib import contextmanager

import torch

from thor_min import distributed, side_by_side, tasks, tiny
from thor_min.ablation import stage_eval, stage_rl
from thor_min.data import Problem
from thor_min.evaluate import EvalConfig, evaluate
from thor_min.models import build_prompt, load_model
from thor_min.rollout import RolloutEngine
from thor_min.run_context import (Run, jobs_at_once, load_policy, make_sandbox, record_stage, run_settings, save_policy,
                                  say, side_by_side_or_exit, training_problems)
from thor_min.sft import (SFTConfig, TokenizedExample, format_monitor, full_text_examples, pack_examples,
                          tokenize_example, train_sft)
from thor_min.tirgen import LLMCritic, RuleCritic, TIRGenConfig
from thor_min.tirgen_run import (RAW_FILE, finish_tirgen, fold_parts, generate_rounds, part_path, pending_problems,
                                 split_rounds)

STAGES = ("pretrain", "tirgen", "sft", "rl", "eval")
ALL_CORES = torch.get_num_threads()          # torch's default, before any stage changes it


# ----------------------------------------------------------------------------------------------
# Stages


def stage_pretrain(run: Run) -> None:
    """Tiny world only: build tokenizer + model, pretrain on the plain chain-of-thought corpus.

    Samples are packed into `pretrain_block_tokens` blocks, as in real pretraining. Trained on single ~60-token
    samples instead, the base never sees later positions, and copying a number into the boxed answer fails once
    a tool-integrated answer (code and output blocks, about twice as long) pushes it there: measured, the
    unpacked base copied 67/67 long numbers at their usual positions but 5/67 after one plain sample of prefix;
    packed, 56/67 (and TIRGen keeps products and sums, not just short gcd/modpow answers).

    A fixed budget of `pretrain_steps` steps (cosine learning rate) and a fixed `pretrain_seed`: the base plays
    the part of THOR's pretrained checkpoint, which is the same for every training seed, so `--seed` varies
    TIRGen, SFT, RL and evaluation, not the base. An earlier stop at a format criterion landed at 750 or 2,250
    steps depending on the seed and on float rounding, and the whole run's outcome with it. Copying numbers
    emerges abruptly, after a plateau whose length varies with the seed (measured with 4-block batches: restate
    rate 0.31 at step 800 and 1.0 at 1,000 for seed 2; 0.14 and 0.0 at 1,000 for seeds 0 and 1), so the budget
    leaves a margin past the emergence of the preset's seed. The share of held-out questions the base restates
    (copies their numbers into its first line) is logged every `pretrain_check_every` steps as `restate_rate`
    (a check, not a stop) and reported in stages.json.
    """
    if not run.is_tiny:
        return say("pretrain: skipped (real models start from their pretrained weights)")
    if run.resume and run.finished("base"):
        return say("pretrain: done already (OUT/base), skipping")
    preset, started = run.preset, time.time()
    seed = run.seed if preset.pretrain_seed is None else preset.pretrain_seed
    if tiny.uses_shipped_base(preset, seed):
        return copy_shipped_base(run, started)
    say(f"pretrain: tiny Qwen2 model on plain chain-of-thought, {preset.pretrain_steps} steps (seed {seed})")
    torch.manual_seed(seed)
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=seed)
    corpus = tasks.train_split(40_000, seed=seed * 10 + 2 + tasks.DEFAULT_SEED)
    held_out = tasks.test_split(64, seed=tasks.DEFAULT_SEED + seed)
    config = SFTConfig(lr=preset.pretrain_lr, max_steps=preset.pretrain_steps, batch_size=preset.pretrain_batch,
                       schedule="cosine", warmup_steps=50, weight_decay=0.1, eval_every=preset.pretrain_check_every,
                       checkpoint_every=preset.checkpoint_every, micro_batch_tokens=preset.micro_batch_tokens,
                       seed=seed)
    packed = pack_examples(full_text_examples(tokenizer, corpus), preset.pretrain_block_tokens)
    monitor = format_monitor(model, tokenizer, held_out)
    summary = train_sft(model, tokenizer, packed, full_text_examples(tokenizer, held_out),
                        config, log=run.log, stage="pretrain", checkpoint_dir=run.out / "checkpoints" / "pretrain",
                        resume=run.resume, monitor=monitor)
    save_policy(run, model, tokenizer, "base")
    restated = monitor()["restate_rate"]   # the final base's (greedy: the value of the last check), on every rank
    say(f"pretrain: {summary['steps']} steps, held-out loss {summary['final_eval_loss']:.3f}, "
        f"restates {restated:.0%} of held-out questions")
    facts = {"steps": summary["steps"], "eval_loss": summary["final_eval_loss"], "restate_rate": restated}
    write_pretraining_record(run, tiny.pretraining_settings(preset, seed), facts, time.time() - started)
    record_stage(run, "pretrain", time.time() - started, **facts)


@distributed.rank_zero_writes
def write_pretraining_record(run: Run, settings: dict, facts: dict, seconds: float) -> None:
    from thor_min.report import machine_name

    record = {"settings": settings, **facts, "seconds": round(seconds, 1), "machine": machine_name(),
              "torch": torch.__version__}
    (run.model_dir("base") / tiny.PRETRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def copy_shipped_base(run: Run, started: float) -> None:
    """Start from the base that ships with thor-min, as a Qwen run starts from the hub's weights: the same bytes
    on every machine (pretrained again elsewhere, float rounding would give another base, and another run)."""
    distributed.rank_zero_writes(shutil.copytree)(tiny.SHIPPED_BASE, run.model_dir("base"), dirs_exist_ok=True)
    record = json.loads((tiny.SHIPPED_BASE / tiny.PRETRAINING_RECORD).read_text())
    say(f"pretrain: the shipped base (thor_min/assets/tiny-base: {record['settings']['steps']} steps, "
        f"{record['seconds'] / 60:.1f} min on {record['machine']}); --tiny-base train pretrains it again")
    record_stage(run, "pretrain", time.time() - started, shipped=True,
                 **{key: record[key] for key in ("steps", "eval_loss", "restate_rate")})


def solved_by_cot(engine, problems: list[Problem], template: str, max_new_tokens: int, batch_size: int) -> set[str]:
    """Ids of problems the model solves with greedy plain chain-of-thought (TIRGen's difficulty filter)."""
    config = EvalConfig(samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    records, _ = evaluate(engine, problems, template, config, tools=False, desc="tirgen: plain-CoT baseline")
    return {record.id for record in records if record.correct}


def tirgen_config(run: Run) -> TIRGenConfig:
    preset = run.preset
    return TIRGenConfig(attempts=preset.tirgen_attempts, step_tokens=preset.tirgen_step_tokens,
                        step_delimiter=preset.tirgen_delimiter, temperature=preset.tirgen_temperature,
                        code_filter=preset.tirgen_code_filter, actor_sees_cells=preset.tirgen_actor_sees_cells,
                        max_response_tokens=preset.rl_max_new_tokens, batch_size=preset.rollout_batch, seed=run.seed)


@contextmanager
def tirgen_actor_and_critic(run: Run):
    """(actor engine, critic, template): the base policy in a sandbox, and the preset's critic."""
    preset = run.preset
    model, tokenizer = load_policy(run, run.base_model(), trainable=False)
    with make_sandbox(run) as sandbox:
        engine = distributed.ShardedEngine(RolloutEngine(model, tokenizer, sandbox))
        critic = RuleCritic(sandbox) if preset.critic == "rule" else LLMCritic(
            distributed.ShardedEngine(RolloutEngine(*load_model(preset.critic, device=run.device,
                                                                random_init=run.random_init), sandbox)),
            max_new_tokens=2 * preset.tirgen_step_tokens)
        yield engine, critic, run.template(tokenizer)


def stage_tirgen(run: Run) -> None:
    """Actor = the base policy (plain prompt), critic = rules (tiny) or an LLM; writes OUT/tirgen.jsonl.

    The rounds of problems still to do run in one process, or (`Preset.side_by_side` > 1) in contiguous shares
    side by side, one process each, the plain-CoT baseline's batches dealt out among them; either way every
    batch is the same, so the data is too (thor_min.tirgen_run)."""
    if run.resume and (run.out / "tirgen_stats.json").exists():
        return say("tirgen: done already (OUT/tirgen.jsonl), skipping")
    preset, started, config = run.preset, time.time(), tirgen_config(run)
    run.base_model()                                 # no base: one clear line here, not one per side-by-side job
    say(f"tirgen: {preset.tirgen_problems} problems x {preset.tirgen_attempts} attempts, critic = {preset.critic}")
    run.out.mkdir(parents=True, exist_ok=True)
    problems = training_problems(run, preset.tirgen_problems, salt=0)
    raw, remaining = pending_problems(run.out, problems, config)
    rounds = split_rounds(remaining, preset.tirgen_problems_per_round)
    at_once = jobs_at_once(run, len(rounds))
    if at_once > 1:
        say(f"tirgen: {len(rounds)} rounds in {at_once} processes side by side")
        chunks = split_rounds(problems, preset.rollout_batch)        # the plain-CoT baseline's batches
        shares = [rounds[j * len(rounds) // at_once:(j + 1) * len(rounds) // at_once] for j in range(at_once)]
        jobs = [side_by_side.Job(f"tirgen {j}", "thor_min.pipeline:tirgen_job",
                                 (run_settings(run), j, share, chunks[j::at_once]), steps=len(share))
                for j, share in enumerate(shares)]
        results = list(side_by_side_or_exit(jobs, run, at_once).values())
        cot_solved, source = set().union(*(result["cot_solved"] for result in results)), results[0]["source"]
        raw += fold_parts(run.out, config)
    else:
        with tirgen_actor_and_critic(run) as (engine, critic, template):
            cot_solved = solved_by_cot(engine, problems, template, preset.rl_max_new_tokens, preset.rollout_batch)
            raw += generate_rounds(run.out / RAW_FILE, engine, critic, rounds, config, template)
            source = critic.name
    stats = finish_tirgen(run.out, raw, problems, config, cot_solved, source=source)
    kept = stats["kept_per_stage"]["balanced"]
    say(f"tirgen: kept {kept} samples ({stats['cells_histogram']} cells per sample); see OUT/tirgen_stats.json")
    record_stage(run, "tirgen", time.time() - started, kept=kept, cot_solved=len(cot_solved), jobs=at_once)


def tirgen_job(settings: dict, part: int, rounds: list[list[Problem]], cot_chunks: list[list[Problem]], *,
               log) -> dict:
    """One side-by-side share of TIRGen (thor_min.side_by_side): its rounds, appended to their own part file,
    and its batches of the plain-CoT baseline; returns the ids those solve and the critic's name."""
    run = Run(**settings)
    run.log = log
    preset = run.preset
    with tirgen_actor_and_critic(run) as (engine, critic, template):
        cot_solved = set().union(*(solved_by_cot(engine, chunk, template, preset.rl_max_new_tokens,
                                                 preset.rollout_batch) for chunk in cot_chunks))
        generate_rounds(part_path(run.out, part), engine, critic, rounds, tirgen_config(run), template,
                        progress=log.progress)
    return {"cot_solved": sorted(cot_solved), "source": critic.name}


def sft_examples(run: Run, tokenizer, records: list[dict], tools: bool) -> list[TokenizedExample] | None:
    """The TIRGen samples, or (tools off) the plain-CoT references of the same problems; None if there are none."""
    template = run.template(tokenizer)
    if tools:
        pairs = [(r["problem"], r["response"]) for r in records]
    else:
        references = {p.id: p.reference for p in training_problems(run, run.preset.tirgen_problems, salt=0)}
        pairs = [(r["problem"], references.get(r["id"], "")) for r in records]
        if not all(reference for _, reference in pairs):
            return None
    return [tokenize_example(tokenizer, build_prompt(template, question, tools=tools, tokenizer=tokenizer), response,
                             train_on_outputs=run.preset.sft_train_on_outputs) for question, response in pairs]


def stage_sft(run: Run) -> None:
    """Cold-start SFT of the base on the TIRGen data (observation tokens masked); with --ablation also SFT on
    the plain-CoT references of the same problems (OUT/sft-cot), to measure what the tool data itself adds."""
    path = run.out / "tirgen.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not records:
        raise SystemExit(f"error: no TIRGen data in {path}: run --stage tirgen first (or it kept no samples)")
    for name in ("sft", "sft-cot") if run.ablation else ("sft",):
        if run.resume and run.finished(name):
            say(f"{name}: done already (OUT/{name}), skipping")
            continue
        preset, started = run.preset, time.time()
        model, tokenizer = load_policy(run, run.base_model(), trainable=True)
        examples = sft_examples(run, tokenizer, records, tools=name == "sft")
        if examples is None:
            say(f"{name}: the training problems have no plain references, skipped")
            continue
        held = max(1, min(200, len(examples) // 10))
        say(f"{name}: {len(examples) - held} samples (+{held} held out for the loss), {preset.sft_epochs} epochs")
        config = SFTConfig(lr=preset.sft_lr, epochs=preset.sft_epochs, batch_size=preset.sft_batch,
                           micro_batch_tokens=preset.micro_batch_tokens, eval_every=20,
                           checkpoint_every=preset.checkpoint_every,
                           seed=run.seed, max_tokens=preset.rl_max_new_tokens + 1024)
        summary = train_sft(model, tokenizer, examples[held:], examples[:held], config, log=run.log, stage=name,
                            checkpoint_dir=run.out / "checkpoints" / name, resume=run.resume)
        save_policy(run, model, tokenizer, name)
        say(f"{name}: held-out loss {summary['first_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f}")
        record_stage(run, name, time.time() - started,
                     **{k: summary[k] for k in ("first_eval_loss", "final_eval_loss", "steps")})




def run_stages(run: Run, stage: str) -> None:
    """Run one stage or, for "all", every stage in order."""
    order = {"pretrain": stage_pretrain, "tirgen": stage_tirgen, "sft": stage_sft, "rl": stage_rl, "eval": stage_eval}
    for name in (STAGES if stage == "all" else (stage,)):
        if run.preset.cpu_threads > 0:      # CPU only: batched training gets every core, sampling stages fewer
            torch.set_num_threads(ALL_CORES if name in ("pretrain", "sft") else run.preset.cpu_threads)
        order[name](run)
