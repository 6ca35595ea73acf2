"""One preset per model alias: every default hyperparameter of the pipeline, in one place.

`tiny` is the embedded default that runs THOR end to end on a 2-core CPU in 5-6 minutes (Zen 4; step budgets,
not time budgets, and a shipped base, so a run does the same work on any machine). The Qwen presets follow THOR.md (group size 16,
T = 1, clip-higher 0.2/0.28, lr 1e-6 full fine-tuning, 3,200-token responses, 5 cells in training and 10 at
inference, L_suf 100 in training and 500 at inference) sized for one GPU: LoRA r = 64 on a bf16 (1.5B, 1.7B)
or NF4 (7B, 8B) base with gradient checkpointing, so the learning rates are the LoRA ones (about 10x full
fine-tuning). All fit 24 GB by the README's derived memory table except qwen3-8b at 16,384-token responses
(about 27 GiB: a 40 GB card, or `--max-new-tokens 8192` on 24 GB).
Any field can be overridden from the command line (`train.py --help`).
Limits: the Qwen presets were derived, not tuned on a GPU here (no GPU on the development machine).
"""

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Preset:
    model: str                        # alias, hub id or local directory ("tiny" = build it)
    template: str = "auto"            # prompt family: auto (from the model), tiny, qwen-math, qwen3, none
    train_data: str = "hf:DigitalLearningGmbH/MATH-lighteval:train"   # TIRGen/RL problems (load_problems spec)
    benchmarks: tuple[str, ...] = ("math500", "aime24", "amc23", "minerva", "olympiadbench")
    critic: str = "qwen3-32b"         # "rule" (tiny world) or an LLM critic alias / hub id / directory
    # pretraining (tiny world only)
    pretrain_steps: int = 0           # fixed budget (cosine learning rate over it)
    pretrain_seed: int | None = None  # seed of the base (init + corpus); None = the run's --seed
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 8           # packed blocks per step
    pretrain_block_tokens: int = 256  # samples are packed into blocks of this many tokens
    pretrain_check_every: int = 250   # steps between held-out loss / restate-rate checks (logged, not a stop)
    tiny_base: str = "shipped"        # shipped: thor_min/assets/tiny-base when it matches these settings; train
    # TIRGen
    tirgen_problems: int = 4000
    tirgen_attempts: int = 8
    tirgen_step_tokens: int = 512
    tirgen_delimiter: str = "\n\n"
    tirgen_temperature: float = 1.0
    tirgen_code_filter: str = "lines"  # THOR code: most cells > 5 lines (THOR.md: code over paper)
    tirgen_actor_sees_cells: bool = True   # False: the actor reads its text with cell/output blocks elided
    tirgen_problems_per_round: int = 64   # problems per resumable round (the unit side-by-side shares split)
    # cold-start SFT
    sft_lr: float = 2e-5
    sft_epochs: float = 3.0
    sft_batch: int = 128
    sft_train_on_outputs: bool = False
    # hierarchical RL
    rl_variants: tuple[str, ...] = ("rl",)   # rl = full THOR; rl-traj = no step level; rl-cot = no tools
    rl_steps: int = 200
    rl_prompts: int = 32
    rl_group: int = 16
    rl_lr: float = 1e-5
    rl_minibatches: int = 4
    rl_max_new_tokens: int = 3200
    rl_min_response_tokens: int = 150
    rl_step_suffix_tokens: int = 100
    rl_step_max_new_tokens: int = 512
    rl_eval_every: int = 20
    side_by_side: int = 1             # TIRGen shares / RL variants / eval rows at once, a process each (side_by_side)
    # evaluation
    eval_samples: int = 4
    eval_temperature: float = 0.6
    eval_max_new_tokens: int = 3200
    eval_problems: int | None = None  # per benchmark (None = all)
    self_correct: int = 4
    backtrack_tokens: int = 500
    # memory / speed
    lora_rank: int = 64               # 0 = full fine-tuning
    lora_alpha: float = 128.0
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    micro_batch_tokens: int = 16384
    checkpoint_every: int = 25        # optimiser steps between pretraining / SFT checkpoints
    rl_checkpoint_every: int = 1      # RL steps between checkpoints (a kill loses at most the step in flight)
    rollout_batch: int = 256
    cell_timeout: float = 10.0
    sandbox_workers: int = 8
    cpu_threads: int = 0              # torch threads on a CPU in TIRGen, RL and eval (0 = one per core); pretrain
                                      # and SFT always use every core


PRESETS: dict[str, Preset] = {
    # The tiny world departs from THOR's numbers where the world is smaller, all measured on 2 CPU cores:
    # - pretraining packs samples into 256-token blocks, a fixed 2,400 steps of 4 blocks from a fixed seed (the base
    #   is the same for every --seed, like a pretrained checkpoint; pipeline.stage_pretrain), so copying numbers has
    #   emerged at every position a tool-integrated answer reaches (it restates 100% of held-out questions; the
    #   1,200-step base of an earlier preset 80%, and TIRGen kept 1-4 linear-equation samples from it instead of
    #   67); that base ships in thor_min/assets/tiny-base, so a run starts from it as a Qwen run starts from the
    #   hub's weights, on any machine the same bytes (`--tiny-base train` pretrains it again: 7.6 min on 2 Zen 4
    #   cores);
    # - TIRGen's critic is rule-based; the actor chunk is one line (each line is one computation), and the
    #   code filter is "none": every tiny-world cell is a single expression like print(4821 * 37), which the
    #   paper's "library call or control flow" rule would drop, taking products and sums out of the data; the
    #   actor reads its text with cell/output blocks elided (a base that never saw a code block otherwise jumps
    #   to the answer after the first cell: measured, 0 correct two-cell attempts of 12,000; elided, 60 of the
    #   first 1,024);
    # - SFT uses lr 1e-3 and 25 epochs because the data is a few hundred samples for a 1 M-parameter model
    #   (measured on seed 0's ~390 samples: 40 epochs overfit, the cold start garbled the long sum-of-squares and
    #   sum-of-range code, 0% on both, and RL never recovered squares; 25 epochs: 10% and 90% at the cold start);
    # - RL: G = 8 x 8 prompts, lr 1e-4, L_suf 8 tokens (responses are ~50 tokens), 40 steps per variant (from this
    #   base's ~75% cold start, steps past 40 added little: greedy eval on seed 0, Zen 4, 0.891 at step 40 and 50
    #   for rl-traj, 0.906 and 0.922 for rl; 40 keeps a 2x slower 2-core machine well inside 15 minutes);
    # - the two RL variants train side by side, and the eval rows run in two halves side by side, one process per
    #   core (thor_min.side_by_side: the same work as one after the other; RL 1.5x faster, measured);
    # - one torch thread in the sampling stages (TIRGen, RL, eval): a 64-row decode step of a 1 M-parameter model
    #   is too small to split, and the other core runs the sandbox and the grader; train.py also makes idle
    #   OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE): spinning threads made every stage 1.5-4x slower on a
    #   loaded 2-core machine (measured).
    "tiny": Preset(
        model="tiny", template="tiny", train_data="tiny", benchmarks=("tiny", "tiny-heldout"), critic="rule",
        pretrain_steps=2400, pretrain_seed=2, pretrain_lr=2e-3, pretrain_batch=4, pretrain_check_every=200, pretrain_block_tokens=256,
        tirgen_problems=600, tirgen_attempts=8, tirgen_step_tokens=48, tirgen_delimiter="\n",
        tirgen_temperature=0.7, tirgen_code_filter="none", tirgen_actor_sees_cells=False,
        sft_lr=1e-3, sft_epochs=25.0, sft_batch=32,
        rl_variants=("rl-traj", "rl"), rl_steps=40, rl_prompts=8, rl_group=8, rl_lr=1e-4, rl_minibatches=2,
        rl_max_new_tokens=160,
        rl_min_response_tokens=8, rl_step_suffix_tokens=8, rl_step_max_new_tokens=64, rl_eval_every=20,
        side_by_side=2,
        eval_samples=4, eval_temperature=0.6, eval_max_new_tokens=160, eval_problems=None,
        self_correct=4, backtrack_tokens=8,
        lora_rank=0, gradient_checkpointing=False, micro_batch_tokens=8192, rollout_batch=256,
        cell_timeout=5.0, sandbox_workers=2, cpu_threads=1,
    ),
    # Qwen presets sized for one 24 GB GPU by the derived budget in the README (KV cache = rollout_batch rows x
    # (prompt + max_new_tokens) x 28 KiB/token for Qwen2.5-1.5B; a GRPO group is never split across batches).
    "qwen-1.5b": Preset(model="qwen-1.5b", rollout_batch=64),
    "qwen-7b": Preset(model="qwen-7b", load_in_4bit=True, rl_group=8, rl_prompts=16, rollout_batch=32,
                      micro_batch_tokens=8192),
    "qwen3-1.7b": Preset(model="qwen3-1.7b", template="qwen3", tirgen_step_tokens=4096,
                         rl_max_new_tokens=16384, eval_max_new_tokens=16384, rl_prompts=8, rl_group=8,
                         rollout_batch=8),
    "qwen3-8b": Preset(model="qwen3-8b", template="qwen3", tirgen_step_tokens=4096, load_in_4bit=True,
                       rl_max_new_tokens=16384, eval_max_new_tokens=16384, rl_prompts=4, rl_group=8,
                       rollout_batch=8, micro_batch_tokens=8192),
}


def preset_for(model: str) -> Preset:
    """The preset of an alias; any other model (hub id or directory) gets the qwen-1.5b defaults."""
    if model in PRESETS:
        return PRESETS[model]
    return replace(PRESETS["qwen-1.5b"], model=model)


def override(preset: Preset, **changes) -> Preset:
    """A copy of `preset` with the non-None `changes` applied (unknown names raise)."""
    names = {f.name for f in fields(Preset)}
    unknown = set(changes) - names
    if unknown:
        raise ValueError(f"unknown preset fields: {', '.join(sorted(unknown))}")
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
