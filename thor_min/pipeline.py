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

A finished stage leaves its model directory (written last); with `--resume` finished stages are skipped and
an interrupted one continues from its checkpoint under OUT/checkpoints/. Limits: stages run one after the
other in one process (or, under torchrun, one per GPU: thor_min.distributed); real models need a GPU and a
reachable (or local) model and dataset.
"""

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from thor_min import distributed, tasks, tiny
from thor_min.config import Preset
from thor_min.data import Problem, load_problems
from thor_min.evaluate import EvalConfig, evaluate, record_dict
from thor_min.metrics import MetricsLog
from thor_min.models import (build_prompt, detect_template, encode_prompt, load_model, load_tokenizer, read_metadata,
                             save_model_dir, write_metadata)
from thor_min.rl import RLConfig, run_rl
from thor_min.rollout import RolloutEngine
from thor_min.sandbox import Sandbox
from thor_min.sft import (SFTConfig, TokenizedExample, format_monitor, full_text_examples, pack_examples,
                          tokenize_example, train_sft)
from thor_min.tirgen import LLMCritic, RuleCritic, TIRGenConfig, run_tirgen
from thor_min.trackers import open_trackers

STAGES = ("pretrain", "tirgen", "sft", "rl", "eval")
ALL_CORES = torch.get_num_threads()          # torch's default, before any stage changes it
ADAPTER_FILE = "adapter.safetensors"   # a 4-bit stage's LoRA adapter, beside its merged weights
RL_VARIANTS = {  # directory -> (starts from, tools, step level)
    "rl-traj": ("sft", True, False),
    "rl": ("sft", True, True),
    "rl-cot": ("base", False, False),
}


@dataclass
class Run:
    """Everything a stage needs to know about this run."""

    preset: Preset
    out: Path
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    ablation: bool = False
    report_to: tuple[str, ...] = ()   # experiment trackers besides metrics.jsonl (thor_min.trackers)
    random_init: bool = False         # base model and LLM critic: real architecture, random weights (rehearsal)
    log: MetricsLog = field(init=False)

    def __post_init__(self):
        self.out = Path(self.out)
        self.device = distributed.device(self.device)
        settings = {**asdict(self.preset), "seed": self.seed, "device": self.device, "ablation": self.ablation}
        trackers = distributed.on_rank_zero(open_trackers)(self.report_to, self.out, self.out.name, settings)
        self.log = distributed.RankZeroOnly(MetricsLog(self.out, trackers=trackers))

    @property
    def is_tiny(self) -> bool:
        return self.preset.model == "tiny"

    def model_dir(self, name: str) -> Path:
        return self.out / name

    def finished(self, name: str) -> bool:
        return (self.model_dir(name) / "config.json").is_file()

    def base_model(self) -> str:
        if not self.is_tiny:
            return self.preset.model
        if not self.finished("base"):
            raise SystemExit(f"error: no tiny base model in {self.model_dir('base')}: run --stage pretrain first")
        return str(self.model_dir("base"))

    def template(self, tokenizer=None) -> str:
        return self.preset.template if self.preset.template != "auto" else detect_template(self.base_model(), tokenizer)


@distributed.on_rank_zero
def say(message: str) -> None:
    """One clear log line per stage event (progress bars handle the rest)."""
    print(f"[thor-min {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def training_problems(run: Run, count: int, salt: int) -> list[Problem]:
    """Problems for TIRGen (salt 0) and RL (salt 1): tiny-world train split, or the preset's dataset.
    (The pretraining corpus, salt 2, follows the pretraining seed: see stage_pretrain.)"""
    if run.is_tiny:
        return tasks.train_split(count, seed=run.seed * 10 + salt + tasks.DEFAULT_SEED)
    problems = load_problems(run.preset.train_data)
    return problems[:count] if salt == 0 else problems[-count:] if count < len(problems) else problems


def load_policy(run: Run, name: str, trainable: bool):
    """Load a stage's model; for training, wrap LoRA adapters and enable checkpointing per the preset.

    The 4-bit hand-off: a stage trained on an NF4 base leaves its adapter beside the merged weights
    (`save_policy`). Training on from it re-loads the same NF4 base and that adapter, so the next stage starts
    from exactly the policy the last one ended with; re-quantising the merged weights instead would round away
    a LoRA delta far below the NF4 level spacing and start RL from the base, not from the cold start."""
    from thor_min.lora import apply_lora, load_lora

    preset = run.preset
    adapter = read_metadata(name).get("adapter") if trainable and preset.load_in_4bit else None
    location = read_metadata(name)["base"] if adapter else name
    model, tokenizer = load_model(location, device=run.device, load_in_4bit=preset.load_in_4bit and trainable,
                                  gradient_checkpointing=preset.gradient_checkpointing and trainable,
                                  random_init=run.random_init and location == preset.model)
    if adapter:
        apply_lora(model, adapter["rank"], adapter["alpha"])
        load_lora(model, Path(name) / adapter["file"])
        tokenizer = load_tokenizer(name)
    elif trainable and preset.lora_rank > 0:
        apply_lora(model, preset.lora_rank, preset.lora_alpha)
    # every rank starts from rank 0's weights (LoRA init is random); full fine-tuning on several ranks: FSDP2
    distributed.prepare_training(model, shard_parameters=trainable and not adapter and preset.lora_rank == 0)
    return model, tokenizer


def save_policy(run: Run, model, tokenizer, name: str) -> Path:
    """Write a loadable model directory atomically (LoRA adapters merged into a dense copy). Every rank calls
    it: an FSDP2 model's weights are gathered to rank 0 first, and rank 0 writes."""
    weights = distributed.full_weights(model) if distributed.is_sharded(model) else None
    return _write_policy(run, model, tokenizer, name, weights)


@distributed.rank_zero_writes
def _write_policy(run: Run, model, tokenizer, name: str, weights: dict | None) -> Path:
    from thor_min.lora import export_merged, lora_layers, save_lora

    target, temp = run.model_dir(name), run.model_dir(name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    if lora_layers(model):
        export_merged(model, temp)
        tokenizer.save_pretrained(temp)
        facts = {}
        if run.preset.load_in_4bit:   # keep NF4 base + adapter for the next stage (see load_policy)
            save_lora(model, temp / ADAPTER_FILE)
            layer = next(iter(lora_layers(model).values()))
            facts = {"base": model.name_or_path,   # the NF4 base this model was loaded from
                     "adapter": {"file": ADAPTER_FILE, "rank": layer.rank, "alpha": layer.alpha}}
        write_metadata(temp, run.template(tokenizer), **facts)
    else:
        save_model_dir(model, tokenizer, temp, run.template(tokenizer), state_dict=weights)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temp, target)
    return target


def make_sandbox(run: Run) -> Sandbox:
    return Sandbox(workers=run.preset.sandbox_workers, timeout=run.preset.cell_timeout)


def prompt_encoder(run: Run, tokenizer, tools: bool):
    template = run.template(tokenizer)
    return lambda problem: encode_prompt(tokenizer, template, problem.question, tools=tools)


@distributed.rank_zero_writes
def record_stage(run: Run, stage: str, seconds: float, **facts) -> None:
    """Append a stage's wall time, facts and process group to OUT/stages.json (the report sums the seconds)."""
    path = run.out / "stages.json"
    stages = json.loads(path.read_text()) if path.exists() else {}
    stages[stage] = {"seconds": round(seconds, 1), **facts, **distributed.describe()}
    path.write_text(json.dumps(stages, indent=2) + "\n")


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


def stage_tirgen(run: Run) -> None:
    """Actor = the base policy (plain prompt), critic = rules (tiny) or an LLM; writes OUT/tirgen.jsonl."""
    if run.resume and (run.out / "tirgen_stats.json").exists():
        return say("tirgen: done already (OUT/tirgen.jsonl), skipping")
    preset, started = run.preset, time.time()
    say(f"tirgen: {preset.tirgen_problems} problems x {preset.tirgen_attempts} attempts, critic = {preset.critic}")
    model, tokenizer = load_policy(run, run.base_model(), trainable=False)
    template = run.template(tokenizer)
    problems = training_problems(run, preset.tirgen_problems, salt=0)
    config = TIRGenConfig(attempts=preset.tirgen_attempts, step_tokens=preset.tirgen_step_tokens,
                          step_delimiter=preset.tirgen_delimiter, temperature=preset.tirgen_temperature,
                          code_filter=preset.tirgen_code_filter, actor_sees_cells=preset.tirgen_actor_sees_cells,
                          max_response_tokens=preset.rl_max_new_tokens,
                          batch_size=preset.rollout_batch, seed=run.seed)
    with make_sandbox(run) as sandbox:
        engine = distributed.ShardedEngine(RolloutEngine(model, tokenizer, sandbox))
        critic = RuleCritic(sandbox) if preset.critic == "rule" else LLMCritic(
            distributed.ShardedEngine(RolloutEngine(*load_model(preset.critic, device=run.device,
                                                                random_init=run.random_init), sandbox)),
            max_new_tokens=2 * preset.tirgen_step_tokens)
        cot_solved = solved_by_cot(engine, problems, template, preset.rl_max_new_tokens, preset.rollout_batch)
        stats = run_tirgen(run.out, engine, critic, problems, config, template, cot_solved)
    kept = stats["kept_per_stage"]["balanced"]
    say(f"tirgen: kept {kept} samples ({stats['cells_histogram']} cells per sample); see OUT/tirgen_stats.json")
    record_stage(run, "tirgen", time.time() - started, kept=kept, cot_solved=len(cot_solved))


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


def rl_config(run: Run, tools: bool, step_level: bool) -> RLConfig:
    preset = run.preset
    return RLConfig(prompts_per_step=preset.rl_prompts, group_size=preset.rl_group,
                    max_new_tokens=preset.rl_max_new_tokens, tools=tools, step_level=step_level,
                    step_suffix_tokens=preset.rl_step_suffix_tokens, step_max_new_tokens=preset.rl_step_max_new_tokens,
                    min_response_tokens=preset.rl_min_response_tokens, minibatches=preset.rl_minibatches,
                    micro_batch_tokens=preset.micro_batch_tokens, lr=preset.rl_lr, batch_size=preset.rollout_batch,
                    seed=run.seed)


def eval_problems(run: Run) -> dict[str, list[Problem]]:
    """The evaluation sets: the tiny world's test split and held-out templates, or the preset's benchmarks."""
    limit = run.preset.eval_problems
    return {name: load_problems(name, limit=limit) for name in run.preset.benchmarks}


def stage_rl(run: Run) -> None:
    """Each RL variant of the run (trajectory-only, full hierarchical, and with --ablation plain-CoT RL)."""
    variants = list(run.preset.rl_variants) + (["rl-cot"] if run.ablation and "rl-cot" not in run.preset.rl_variants else [])
    for variant in variants:
        if run.resume and run.finished(variant):
            say(f"{variant}: done already, skipping")
            continue
        source, tools, step_level = RL_VARIANTS[variant]
        start = str(run.model_dir(source)) if source == "sft" else run.base_model()
        if source == "sft" and not run.finished("sft"):
            raise SystemExit(f"error: {variant} starts from OUT/sft, which does not exist: run --stage sft first")
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
        record_stage(run, variant, time.time() - started, final_reward=last.get("reward"))


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
    """Evaluate every ablation row that has a model; write eval/*.jsonl, summary.json, report.md and its charts."""
    from thor_min.report import machine_name

    preset, started = run.preset, time.time()
    sets = eval_problems(run)
    say(f"eval: {', '.join(f'{k} ({len(v)})' for k, v in sets.items())}, avg@{preset.eval_samples}")
    (run.out / "eval").mkdir(parents=True, exist_ok=True)
    rows, loaded = [], (None, None, None)
    for name, model_dir, tools, self_correct in EVAL_ROWS:
        if model_dir != "base" or run.is_tiny:
            if not run.finished(model_dir):
                say(f"eval: {name}: no OUT/{model_dir}, row skipped")
                continue
        location = run.base_model() if model_dir == "base" else str(run.model_dir(model_dir))
        if loaded[0] != location:
            loaded = (location, *load_policy(run, location, trainable=False))
        _, model, tokenizer = loaded
        config = EvalConfig(samples=preset.eval_samples, temperature=preset.eval_temperature,
                            max_new_tokens=preset.eval_max_new_tokens,
                            self_correct=preset.self_correct if self_correct else 0,
                            backtrack_tokens=preset.backtrack_tokens, batch_size=preset.rollout_batch, seed=run.seed)
        per_benchmark = {}
        with make_sandbox(run) as sandbox:
            engine = distributed.ShardedEngine(RolloutEngine(model, tokenizer, sandbox))
            for bench, problems in sets.items():
                records, summary = evaluate(engine, problems, run.template(tokenizer), config, tools=tools,
                                            desc=f"eval {name} / {bench}")
                write_lines(run.out / "eval" / f"{name}-{bench}.jsonl", [record_dict(r) for r in records])
                per_benchmark[bench] = summary
        rows.append(summarise_row(name, model_dir, tools, self_correct, per_benchmark))
        say(f"eval: {name}: accuracy {rows[-1]['accuracy']:.3f}")
    record_stage(run, "eval", time.time() - started)
    stages = json.loads((run.out / "stages.json").read_text())
    summary = {"rows": rows, "seconds": round(sum(s["seconds"] for s in stages.values()), 1),
               "cores": os.cpu_count(), "machine": machine_name(), "stages": stages, "model": preset.model,
               "samples": preset.eval_samples, "temperature": preset.eval_temperature, **distributed.describe()}
    write_summary(run.out, summary)
    return summary


@distributed.rank_zero_writes
def write_summary(out: Path, summary: dict) -> None:
    from thor_min.report import write_report

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary)


@distributed.rank_zero_writes
def write_lines(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def run_stages(run: Run, stage: str) -> None:
    """Run one stage or, for "all", every stage in order."""
    order = {"pretrain": stage_pretrain, "tirgen": stage_tirgen, "sft": stage_sft, "rl": stage_rl, "eval": stage_eval}
    for name in (STAGES if stage == "all" else (stage,)):
        if run.preset.cpu_threads > 0:      # CPU only: batched training gets every core, sampling stages fewer
            torch.set_num_threads(ALL_CORES if name in ("pretrain", "sft") else run.preset.cpu_threads)
        order[name](run)
