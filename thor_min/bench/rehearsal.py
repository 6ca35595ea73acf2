"""Bench: rehearse a preset at its real shapes with random weights; measured time and memory per stage.

    python -m thor_min.bench rehearsal --model qwen-1.5b      # ~12 min, AMD EPYC Zen 4, 2 cores (README)
    python -m thor_min.bench rehearsal --model qwen3-1.7b --out runs/rehearsal-qwen3-1.7b.json

What runs. The alias's real architecture (`thor_min/configs`, `models.load_model(random_init=True)`) with the
real tokenizer, loaded as train.py loads it (4-bit where the preset says, gradient checkpointing, LoRA on every
linear at the preset's rank), then every stage once, through the functions the pipeline stages call, with
small counts: TIRGen (`run_tirgen`: plain-CoT difficulty filter, actor chunks, an LLM critic executing cells,
the filter), cold-start SFT (`train_sft`: chunked log-probs at the real vocabulary, one optimiser step),
hierarchical RL (`rl_step`: trajectory rollouts, step-level rollouts, old log-probs, one update), evaluation
with self-correction (`evaluate`), and a decode-speed probe against the memory-bandwidth bound.

How the paths are forced. Random weights write noise and never a code block, so the rollouts (not the actor of
TIRGen, which must write plain text) run through `ScriptedLogits`: the real forward runs at full cost, then
the logits of the last position get +1e4 on a scripted successor of the row's input token, so the text is
` We compute:` + a python cell `print(8 / X)` with X sampled from {2, 0} (it fails half the time: failures,
step-level RL and self-correction happen) + after the cell's output ` The answer is \\boxed{Y}.` with Y from
{7, 6} (gold 7: rewards vary within a group) + EOS. The critic is the same random model (policy-sized, not
Qwen3-32B; it costs no extra memory), scripted the same way. Counts: 2 prompts x G = 4, 48 new tokens.

What is measured. Per stage: seconds, tokens/s (sampled tokens for rollouts, processed tokens for training),
and peak memory: on CPU the process's peak resident set (VmHWM, reset per stage through
/proc/self/clear_refs), on CUDA `torch.cuda.max_memory_allocated` (reset per stage). Projections to the
preset's real sizes use measured per-token figures (training activation bytes per token = the SFT stage's peak
above its start / tokens of its largest micro-batch) and the config (KV bytes per token = 2 x layers x kv heads
x head dim x dtype bytes). The decode probe times greedy steps of `--decode-rows` rows and compares the
weight bytes read per step / step time with the bandwidth of a large tensor copy measured in the same run.
Limits: CPU figures are noisy on a shared machine; the CUDA branch is written but was not run here (no GPU).
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from thor_min.config import PRESETS
from thor_min.data import Problem
from thor_min.evaluate import EvalConfig, evaluate
from thor_min.lora import apply_lora, lora_parameters
from thor_min.metrics import MetricsLog
from thor_min.models import build_prompt, config_path, detect_template, encode_prompt, load_model
from thor_min.optim import build_optimizer
from thor_min.pipeline import solved_by_cot
from thor_min.report import machine_name
from thor_min.rl import ProblemStream, RLConfig, rl_step
from thor_min.rollout import RolloutEngine, RolloutRequest, SamplingConfig
from thor_min.sandbox import Sandbox
from thor_min.sft import SFTConfig, tokenize_example, train_sft
from thor_min.tirgen import LLMCritic, TIRGenConfig
from thor_min.tirgen_run import run_tirgen

GIB = 2**30
SCRIPT = [" We", " compute", ":\n", "```", "python", "\n", "print", "(", "8", " /", " ", ("2", "0"), ")\n", "``"]
ANSWER = [" The", " answer", " is", " \\", "boxed", "{", ("7", "6"), "}."]


class ScriptedLogits:
    """The real model, whose last-position logits favour a scripted successor of each row's input token."""

    def __init__(self, model, tokenizer):
        self.model = model
        encode = lambda piece: tokenizer.encode(piece, add_special_tokens=False)
        steps = [[encode(p)[0] for p in (piece if isinstance(piece, tuple) else (piece,))]
                 for piece in SCRIPT + ["`\n"] + ANSWER]
        steps.append([tokenizer.eos_token_id])
        self.first = steps[0]                                  # after any prefill
        self.successors = {}
        for here, after in zip(steps, steps[1:]):
            for token in here:
                if self.successors.setdefault(token, after) != after:
                    raise ValueError(f"the script repeats token {token} with different successors")

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits.float()                            # [B, 1, V]
        for row, token in enumerate(input_ids[:, -1].tolist()):
            chosen = self.first if input_ids.shape[1] > 1 else self.successors.get(token)
            if chosen is not None:   # near-equal odds when sampling; greedy takes the first (passing, correct)
                logits[row, -1, chosen] = 1e4
                logits[row, -1, chosen[0]] += 0.01
        out.logits = logits
        return out


class StageMeter:
    """Seconds and peak memory of one stage (CPU: peak RSS reset via clear_refs; CUDA: max allocated)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
        self.start_bytes, self.started = self.now_bytes(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            hwm = _status_kib("VmHWM") * 1024
            self.peak_bytes = hwm if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------------------------
# Stages


def problems(count: int) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"What is {i + 3} + 4?", answer="7") for i in range(count)]


def stage_tirgen(policy, tokenizer, sandbox, template, args, work: Path) -> dict:
    """Actor = the raw random model (plain text), critic = the same model scripted (cells executed)."""
    actor = RolloutEngine(policy, tokenizer, sandbox)
    critic = LLMCritic(RolloutEngine(ScriptedLogits(policy, tokenizer), tokenizer, sandbox),
                       max_new_tokens=args.new_tokens, batch_size=args.rows)
    batch = problems(args.prompts)
    config = TIRGenConfig(attempts=args.group, step_tokens=args.new_tokens // 2, max_chunks=2,
                          max_response_tokens=args.new_tokens * 4, batch_size=args.rows)
    cot_solved = solved_by_cot(actor, batch, template, args.new_tokens, args.rows)
    stats = run_tirgen(work / "tirgen", actor, critic, batch, config, template, cot_solved)
    rewrites = [json.loads(line) for line in (work / "tirgen" / "tirgen_raw.jsonl").read_text().splitlines()]
    return {"kept_per_stage": stats["kept_per_stage"], "dropped": stats["dropped_attempts"],
            "attempts": len(rewrites)}


def scripted_response(cell_ok: bool) -> str:
    divisor, result = ("2", "4.0") if cell_ok else ("0", "ZeroDivisionError: division by zero")
    return (f" We compute:\n```python\nprint(8 / {divisor})\n```\n```output\n{result}\n```\n"
            f" The answer is \\boxed{{{7 if cell_ok else 6}}}.")


def stage_sft(policy, tokenizer, template, preset, args, work: Path) -> dict:
    prompt = build_prompt(template, problems(1)[0].question, tokenizer=tokenizer)
    examples = [tokenize_example(tokenizer, prompt, scripted_response(i % 2 == 0) * args.sft_repeat)
                for i in range(args.prompts * 2)]
    config = SFTConfig(lr=preset.sft_lr, max_steps=1, batch_size=len(examples) - 1, eval_every=1,
                       micro_batch_tokens=preset.micro_batch_tokens, max_tokens=100_000)
    summary = train_sft(policy, tokenizer, examples[1:], examples[:1], config, log=MetricsLog(work / "sft"),
                        stage="sft")
    tokens = sum(len(e.ids) for e in examples[1:])
    return {"tokens": tokens, "micro_batch_tokens_used": min(tokens, preset.micro_batch_tokens),
            "eval_loss": summary["final_eval_loss"]}


def stage_rl(policy, engine, tokenizer, template, preset, args) -> dict:
    config = RLConfig(prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                      step_suffix_tokens=4, step_max_new_tokens=args.new_tokens // 2, min_response_tokens=8,
                      minibatches=1, micro_batch_tokens=preset.micro_batch_tokens, lr=preset.rl_lr,
                      batch_size=args.rows, max_sampling_rounds=3)
    optimizer = build_optimizer(policy.parameters(), config.lr, weight_decay=0.0, betas=(0.9, 0.999))
    stream = ProblemStream(problems(64), seed=0)
    prompt_ids = lambda problem: encode_prompt(tokenizer, template, problem.question)
    metrics = rl_step(policy, engine, optimizer, stream, prompt_ids, config, step=0, pad_id=tokenizer.pad_token_id)
    keys = ("sampled_tokens", "trajectory_samples", "step_samples", "groups_kept", "cell_pass_rate",
            "step_pass_rate", "reward", "seconds_rollout", "seconds_step_rollout", "seconds_train")
    return {k: metrics.get(k) for k in keys}


def stage_eval(engine, template, preset, args) -> dict:
    config = EvalConfig(samples=args.group, temperature=preset.eval_temperature, max_new_tokens=args.new_tokens,
                        self_correct=preset.self_correct, backtrack_tokens=2, batch_size=args.rows)
    records, summary = evaluate(engine, problems(args.prompts), template, config, tools=True, desc="rehearsal eval")
    return {"sampled_tokens": sum(r.tokens for r in records), "retries": sum(r.retries for r in records),
            "accuracy": summary["accuracy"], "cell_pass_rate": summary["cell_pass_rate"]}


def stage_decode(policy, tokenizer, args) -> dict:
    """Greedy decode of `decode_rows` rows (no tools): per-step time vs the copy-bandwidth bound."""
    engine = RolloutEngine(policy, tokenizer)
    prompt = tokenizer.encode("Decode probe: 1, 2, 3,", add_special_tokens=False)
    sampling = SamplingConfig(max_new_tokens=args.decode_steps, temperature=0.0, max_tool_calls=0, ignore_eos=True,
                              batch_size=args.decode_rows)
    engine.generate([RolloutRequest(prompt, args.decode_rows)], SamplingConfig(max_new_tokens=2, max_tool_calls=0))
    started = time.perf_counter()
    engine.generate([RolloutRequest(prompt, args.decode_rows)], sampling)
    _synchronize(policy.device)
    step_s = (time.perf_counter() - started) / args.decode_steps
    weight_bytes = sum(t.untyped_storage().nbytes() for t in list(policy.parameters()) + list(policy.buffers()))
    return {"rows": args.decode_rows, "step_seconds": step_s, "tokens_per_s": args.decode_rows / step_s,
            "weight_bytes": weight_bytes, "achieved_bytes_per_s": weight_bytes / step_s}


def add_bandwidth_bound(decode: dict, device: torch.device) -> None:
    """The copy bandwidth (measured after the stages, outside their memory peaks) and the decode bound."""
    bandwidth = copy_bandwidth(device)
    decode.update(copy_bandwidth_bytes_per_s=bandwidth, bound_steps_per_s=bandwidth / decode["weight_bytes"],
                  fraction_of_bound=decode["achieved_bytes_per_s"] / bandwidth)


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Bytes moved per second by a large tensor copy (read + write), best of 3."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        _synchronize(device)
        started = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Projection, report, main


def projection(config, preset, stages: dict, dtype_bytes: int, lora_numel: int) -> dict:
    """The preset's real sizes from measured per-token figures and the config (bytes)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes
    sft = stages["sft"]
    training_state = lora_numel * 4 * 4      # fp32 LoRA weights + grads + Adam m and v
    # the SFT peak above its start, less what its first step allocates for LoRA (grads, Adam m and v: 12 B each);
    # fixed temporaries (a logits chunk) are included, so a short micro-batch overstates the per-token figure
    above = sft["peak_bytes"] - sft["start_bytes"] - lora_numel * 12
    activation_per_token = max(above, 0) / sft["facts"]["micro_batch_tokens_used"]
    rollout_tokens = preset.rollout_batch * (512 + preset.rl_max_new_tokens)      # 512: a generous prompt
    static = stages["load"]["peak_bytes"]
    return {"kv_bytes_per_token": kv_per_token, "rollout_kv_bytes": kv_per_token * rollout_tokens,
            "rollout_rows": preset.rollout_batch, "rollout_tokens_per_row": 512 + preset.rl_max_new_tokens,
            "activation_bytes_per_token_measured": activation_per_token,
            "micro_batch_tokens": preset.micro_batch_tokens,
            "training_activation_bytes": activation_per_token * preset.micro_batch_tokens,
            "static_bytes_measured": static, "lora_training_state_bytes": training_state,
            "projected_peak_rollout": static + kv_per_token * rollout_tokens,
            "projected_peak_training": static + lora_numel * 12 + activation_per_token * preset.micro_batch_tokens}


def print_report(report: dict) -> None:
    memory = "peak RSS" if report["device"] == "cpu" else "CUDA max allocated"
    print(f"rehearsal {report['model']} ({report['architecture']}, {report['parameters'] / 1e9:.2f} B parameters, "
          f"{report['dtype']}, 4-bit={report['load_in_4bit']}, LoRA r={report['lora_rank']}) on {report['machine']}")
    print(f"{'stage':<8} {'seconds':>8} {'tokens/s':>9} {memory + ' GiB':>22} {'start GiB':>10}")
    for name, stage in report["stages"].items():
        print(f"{name:<8} {stage['seconds']:8.1f} {stage['tokens_per_s']:9.1f} {stage['peak_bytes'] / GIB:22.2f} "
              f"{stage['start_bytes'] / GIB:10.2f}   {json.dumps(stage['facts'], default=str)[:160]}")
    p = report["projection"]
    print("projection to the preset (measured per-token figures + config):")
    print(f"  KV cache {p['kv_bytes_per_token'] / 1024:.1f} KiB/token x {p['rollout_rows']} rows x "
          f"{p['rollout_tokens_per_row']} tokens = {p['rollout_kv_bytes'] / GIB:.2f} GiB; rollout peak ~"
          f"{p['projected_peak_rollout'] / GIB:.2f} GiB")
    print(f"  training activations {p['activation_bytes_per_token_measured'] / 1024:.1f} KiB/token (measured) x "
          f"{p['micro_batch_tokens']} tokens = {p['training_activation_bytes'] / GIB:.2f} GiB; + LoRA state "
          f"{p['lora_training_state_bytes'] / GIB:.2f} GiB; training peak ~{p['projected_peak_training'] / GIB:.2f} GiB")
    d = report["stages"]["decode"]["facts"]
    print(f"decode: {d['rows']} rows, {d['step_seconds'] * 1000:.1f} ms/step, {d['tokens_per_s']:.1f} tokens/s; "
          f"weights {d['weight_bytes'] / GIB:.2f} GiB/step -> {d['achieved_bytes_per_s'] / 1e9:.1f} GB/s of "
          f"{d['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s copy bandwidth ({d['fraction_of_bound']:.1%} of the bound)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m thor_min.bench rehearsal", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen-1.5b", choices=sorted(PRESETS.keys() - {"tiny"}),
                        help="preset alias (its config, 4-bit and LoRA settings)")
    parser.add_argument("--config", help="another config.json of the same family (tests: a shrunken copy)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="compute dtype (default bf16, the presets' GPU dtype; fp32 1.5B + training is ~8 GiB)")
    counts = parser.add_argument_group("counts (small: a rehearsal, not a run)")
    counts.add_argument("--prompts", type=int, default=2)
    counts.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    counts.add_argument("--new-tokens", type=int, default=48)
    counts.add_argument("--rows", type=int, default=16, help="rollout rows per forward")
    counts.add_argument("--sft-repeat", type=int, default=4, help="scripted responses per SFT sample (its length)")
    counts.add_argument("--decode-rows", type=int, default=8)
    counts.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's; on a loaded machine 1 "
                        "can be 10x faster than 2: OpenMP threads spin against other processes)")
    parser.add_argument("--max-gib", type=float, default=10.0, help="refuse models whose dense build exceeds this")
    parser.add_argument("--out", type=Path, help="JSON of the figures (default runs/rehearsal-MODEL.json)")
    return parser.parse_args(argv)


def run_stages(args, preset, meter_device) -> tuple[dict, object, object]:
    stages = {}

    def measured(name, fn):
        with StageMeter(meter_device) as meter:
            facts = fn()
        tokens = facts.get("sampled_tokens") or facts.get("tokens") or 0
        stages[name] = {"seconds": meter.seconds, "peak_bytes": meter.peak_bytes, "start_bytes": meter.start_bytes,
                        "tokens_per_s": tokens / meter.seconds, "facts": facts}
        print(f"[rehearsal] {name}: {meter.seconds:.1f} s, peak {meter.peak_bytes / GIB:.2f} GiB", flush=True)
        return facts

    loaded = {}

    def load():
        model, tokenizer = load_model(args.config or args.model, device=args.device, dtype=args.dtype,
                                      load_in_4bit=preset.load_in_4bit, random_init=True,
                                      gradient_checkpointing=preset.gradient_checkpointing)
        apply_lora(model, preset.lora_rank, preset.lora_alpha)
        loaded.update(model=model, tokenizer=tokenizer)
        return {"lora_parameters": sum(p.numel() for p in lora_parameters(model))}

    torch.manual_seed(0)
    measured("load", load)
    policy, tokenizer = loaded["model"], loaded["tokenizer"]
    template = detect_template(args.model, tokenizer)
    with tempfile.TemporaryDirectory() as work, Sandbox(workers=2, timeout=preset.cell_timeout) as sandbox:
        engine = RolloutEngine(ScriptedLogits(policy, tokenizer), tokenizer, sandbox)
        measured("tirgen", lambda: stage_tirgen(policy, tokenizer, sandbox, template, args, Path(work)))
        measured("sft", lambda: stage_sft(policy, tokenizer, template, preset, args, Path(work)))
        measured("rl", lambda: stage_rl(policy, engine, tokenizer, template, preset, args))
        measured("eval", lambda: stage_eval(engine, template, preset, args))
    measured("decode", lambda: stage_decode(policy, tokenizer, args))
    return stages, policy, tokenizer


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.model]
    if args.threads:
        torch.set_num_threads(args.threads)
    refusal = too_big(args)
    if refusal:
        print(f"rehearsal {args.model}: not run: {refusal}")
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    stages, policy, _ = run_stages(args, preset, device)
    add_bandwidth_bound(stages["decode"]["facts"], device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name()) + \
        f", {torch.get_num_threads()} torch threads"
    report = {"model": args.model, "config": str(args.config or config_path(args.model)),
              "architecture": type(policy).__name__, "parameters": sum(p.numel() for p in policy.parameters()),
              "dtype": args.dtype, "load_in_4bit": preset.load_in_4bit, "lora_rank": preset.lora_rank,
              "device": device.type, "machine": machine, "stages": stages,
              "critic": "the policy-sized random model itself (scripted), not Qwen3-32B",
              "projection": projection(policy.config, preset, stages, 2 if args.dtype == "bfloat16" else 4,
                                       stages["load"]["facts"]["lora_parameters"])}
    print_report(report)
    out = args.out or Path("runs") / f"rehearsal-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def too_big(args) -> str:
    """Why the model cannot be built within --max-gib ("" if it can): load_model builds the dense model in the
    compute dtype first and only then quantises it to NF4, so the dense size is what must fit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path(args.config or args.model)))
    with torch.device("meta"):
        numel = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    dense = numel * (2 if args.dtype == "bfloat16" else 4)
    if dense <= args.max_gib * GIB:
        return ""
    return (f"building it takes {dense / GIB:.1f} GiB ({numel / 1e9:.2f} B parameters in {args.dtype}, dense before "
            f"NF4 quantisation) > --max-gib {args.max_gib}; run it on a machine with more memory or a GPU")
