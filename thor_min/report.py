"""The run report: `report.md` (the ablation table and a plain reading of it), `ablation.png`, `templates.png`.

Written from `summary.json` alone, so it can be regenerated without re-running anything:
`python -m thor_min.report OUT` rewrites the three files of the run in OUT. The reading
checks THOR's claims one by one against the measured rows and says plainly when an effect does not show:
tools vs the base's plain CoT, RL vs cold start, step-level RL on the cell pass rate, self-correction on
accuracy and pass rate, and (with --ablation) SFT on plain-CoT references and RL without tools. "Clearly" means the 95% intervals do not
overlap; otherwise a difference is reported as within noise.
Limits: intervals are over problems (Avg@k per problem), not over training seeds.
"""

import argparse
import json
import os
import platform
from pathlib import Path

from thor_min.plot import save_ablation, save_templates

CLAIM_ORDER = ("base-cot", "cold-start", "traj-rl", "step-rl", "self-correct", "cot-sft", "cot-rl")
ROW_TITLES = {
    "base-cot": "base model, plain CoT",
    "cold-start": "cold-start SFT (TIRGen data)",
    "traj-rl": "+ trajectory-level RL",
    "step-rl": "+ step-level RL (THOR)",
    "self-correct": "+ self-correction",
    "cot-sft": "SFT on plain-CoT references, same problems",
    "cot-rl": "RL without tools (from base)",
}


def machine_name() -> str:
    """The CPU model (with family/model numbers, which tell e.g. Zen 2 from Zen 4) and core count."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return f"{name}, {os.cpu_count()} cores"


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def table(rows: list[dict], samples: int) -> str:
    lines = [f"| row | model | accuracy (Avg@{samples}) | 95% interval | held-out templates | cell-call rate "
             f"| cell pass rate | tokens / sample |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["ci95"]
        lines.append(f"| {row['name']} | {ROW_TITLES.get(row['name'], row['model'])} | {_pct(row['accuracy'])} "
                     f"| {_pct(low)}-{_pct(high)} | {_pct(row['heldout_accuracy'])} | {_pct(row['cell_call_rate'])} "
                     f"| {_pct(row['cell_pass_rate'])} | {row['tokens']:.0f} |")
    return "\n".join(lines)


def _known(*values) -> bool:
    """A rate is unknown (None/NaN) when no cell ran: such rows cannot be compared."""
    return all(v is not None and v == v for v in values)


def _raised(new, old) -> str:
    return ("raised" if new > old else "not raised") if _known(new, old) else "not comparable: no cells ran"


def _compare(better: dict, worse: dict) -> str:
    """'clearly' when the intervals do not overlap, else 'within noise'."""
    return "clearly" if better["ci95"][0] > worse["ci95"][1] else "within noise"


def _claim(rows: dict, new: str, old: str, what: str) -> str | None:
    if new not in rows or old not in rows:
        return None
    a, b = rows[new], rows[old]
    diff = 100 * (a["accuracy"] - b["accuracy"])
    if diff > 0 and _compare(a, b) == "clearly":
        verdict = f"clearly above ({diff:+.1f} points, the intervals do not overlap)"
    elif diff > 0:
        verdict = f"above, but within noise ({diff:+.1f} points, the intervals overlap)"
    else:
        verdict = f"not above ({diff:+.1f} points{'' if _compare(b, a) == 'within noise' else ', clearly below'})"
    return f"- {what}: {new} {_pct(a['accuracy'])}% vs {old} {_pct(b['accuracy'])}%: {verdict}."


def reading(rows_list: list[dict]) -> str:
    """A paragraph per THOR claim, each saying what the numbers show."""
    rows = {row["name"]: row for row in rows_list}
    claims = [
        _claim(rows, "cold-start", "base-cot", "Tool-integrated reasoning vs the base's plain chain of thought"),
        _claim(rows, "traj-rl", "cold-start", "Trajectory-level RL vs cold-start SFT"),
        _claim(rows, "step-rl", "cold-start", "Hierarchical RL vs cold-start SFT"),
        _claim(rows, "step-rl", "traj-rl", "Adding the step-level loss (accuracy)"),
        _claim(rows, "cold-start", "cot-sft", "SFT on TIRGen data vs on plain-CoT references of the same problems"),
        _claim(rows, "cot-rl", "base-cot", "RL without tools vs the base"),
        _claim(rows, "step-rl", "cot-rl", "RL with tools vs RL without tools"),
    ]
    if "step-rl" in rows and "traj-rl" in rows:
        a, b = rows["step-rl"]["cell_pass_rate"], rows["traj-rl"]["cell_pass_rate"]
        verdict = ("raises" if a > b else "does not raise") if _known(a, b) else "cannot be judged on (no cells ran)"
        claims.append(f"- The step-level loss {verdict} the cell pass rate: {_pct(b)}% -> {_pct(a)}%.")
    if "self-correct" in rows and "step-rl" in rows:
        a, b = rows["self-correct"], rows["step-rl"]
        hurt = b["ci95"][0] > a["ci95"][1]
        claims.append(f"- Self-correction: accuracy {_pct(b['accuracy'])}% -> {_pct(a['accuracy'])}% "
                      f"({'clearly lower' if hurt else 'not hurt beyond noise'}); cell pass rate "
                      f"{_pct(b['cell_pass_rate'])}% -> {_pct(a['cell_pass_rate'])}% "
                      f"({_raised(a['cell_pass_rate'], b['cell_pass_rate'])}); "
                      f"tokens per sample {b['tokens']:.0f} -> {a['tokens']:.0f} (retries included).")
    heldout = [r for r in rows_list if r["heldout_accuracy"] is not None]
    if heldout:
        claims.append("- Held-out templates (never trained on): " +
                      ", ".join(f"{r['name']} {_pct(r['heldout_accuracy'])}%" for r in heldout) + ".")
    return "\n".join(c for c in claims if c)


def write_report(out_dir: str | Path, summary: dict) -> None:
    """report.md, ablation.png and templates.png in `out_dir` from a summary dict (see ablation.stage_eval)."""
    out_dir = Path(out_dir)
    rows = sorted(summary["rows"], key=lambda r: CLAIM_ORDER.index(r["name"]) if r["name"] in CLAIM_ORDER else 99)
    minutes = summary["seconds"] / 60
    save_ablation(out_dir / "ablation.png", rows, summary["samples"])
    has_templates = save_templates(out_dir / "templates.png", rows)
    text = [f"# thor-min run: {summary['model']}", "",
            f"Whole run: {minutes:.1f} minutes on {summary['cores']} CPU cores (stage times in summary.json). "
            f"Accuracy is Avg@{summary['samples']} at temperature {summary['temperature']} with a 95% interval over "
            "problems; cell rates count executed cells of the final trajectories; tokens include self-correction "
            "retries.", "", table(rows, summary["samples"]), "", "![accuracy per ablation row](ablation.png)", "",
            "## Reading", "", reading(rows), ""]
    if has_templates:
        text += ["## Accuracy per problem template", "", "Which kinds of problems each row solves (tiny world: "
                 "one column per template, held-out templates in italics; real benchmarks: one column each).", "",
                 "![accuracy per template](templates.png)", ""]
    text += ["Curves: `curves.png` (from `metrics.jsonl`); per-sample outputs: `eval/*.jsonl`; "
             "TIRGen filter counts: `tirgen_stats.json`.", ""]
    (out_dir / "report.md").write_text("\n".join(text))


# ----------------------------------------------------------------------------------------------
# Across seeds: `train.py --seeds 0 1 2` writes OUT/seeds.md and OUT/seeds.json from each seed's summary.json

SEED_METRICS = (("accuracy", "accuracy"), ("heldout_accuracy", "held-out templates"),
                ("cell_pass_rate", "cell pass rate"), ("tokens", "tokens / sample"))


def _spread(values: list) -> dict | None:
    known = [v for v in values if v is not None and v == v]
    return {"mean": sum(known) / len(known), "min": min(known), "max": max(known)} if known else None


def seeds_summary(summaries: dict[int, dict]) -> dict:
    """Per ablation row and metric: mean, min and max across seeds, plus every seed's value (and interval)."""
    names = [name for name in CLAIM_ORDER if any(r["name"] == name for s in summaries.values() for r in s["rows"])]
    rows = []
    for name in names:
        per_seed = {seed: next((r for r in s["rows"] if r["name"] == name), None) for seed, s in summaries.items()}
        found = {seed: r for seed, r in per_seed.items() if r is not None}
        rows.append({"name": name, "seeds": sorted(found),
                     **{key: _spread([r[key] for r in found.values()]) for key, _ in SEED_METRICS},
                     "kinds": {kind: _spread([r.get("kinds", {}).get(kind) for r in found.values()])
                               for kind in sorted({k for r in found.values() for k in r.get("kinds", {})})},
                     "accuracy_per_seed": {str(seed): r["accuracy"] for seed, r in found.items()},
                     "ci95_per_seed": {str(seed): r["ci95"] for seed, r in found.items()}})
    first = next(iter(summaries.values()))
    return {"seeds": sorted(summaries), "rows": rows, "machine": first.get("machine", f"{first['cores']} CPU cores"),
            "minutes_per_seed": {str(seed): round(s["seconds"] / 60, 1) for seed, s in summaries.items()},
            "samples": first["samples"]}


def seeds_table(study: dict) -> str:
    def cell(spread: dict | None, scale: float = 100.0, digits: int = 1) -> str:
        if spread is None:
            return "n/a"
        f = lambda v: f"{scale * v:.{digits}f}"
        return f"{f(spread['mean'])} ({f(spread['min'])}-{f(spread['max'])})"

    seeds = ", ".join(map(str, study["seeds"]))
    lines = ["| row | model | " + " | ".join(f"{title}: mean (range)" for _, title in SEED_METRICS)
             + f" | accuracy per seed ({seeds}) |", "|---" * (len(SEED_METRICS) + 3) + "|"]
    for row in study["rows"]:
        values = [cell(row[key], *((1.0, 0) if key == "tokens" else ())) for key, _ in SEED_METRICS]
        per_seed = " / ".join(_pct(row["accuracy_per_seed"].get(str(s))) for s in study["seeds"])
        lines.append(f"| {row['name']} | {ROW_TITLES.get(row['name'], row['name'])} | {' | '.join(values)} | {per_seed} |")
    return "\n".join(lines)


def seeds_kind_table(study: dict, names: tuple[str, ...] = ("cold-start", "step-rl", "self-correct")) -> str:
    """Accuracy per problem template (mean and range across seeds) for the tool rows."""
    rows = [r for r in study["rows"] if r["name"] in names and r["kinds"]]
    if not rows:
        return ""
    kinds = sorted({k for r in rows for k in r["kinds"]})
    lines = ["| template | " + " | ".join(r["name"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for kind in kinds:
        values = [r["kinds"].get(kind) for r in rows]
        lines.append(f"| {kind} | " + " | ".join("n/a" if v is None else
                                                 f"{100 * v['mean']:.1f} ({100 * v['min']:.1f}-{100 * v['max']:.1f})"
                                                 for v in values) + " |")
    return "\n".join(lines)


def write_seeds_table(out_dir: str | Path, summary_paths: dict[int, Path]) -> dict:
    """OUT/seeds.json and OUT/seeds.md from each seed's summary.json."""
    import json

    out_dir = Path(out_dir)
    study = seeds_summary({seed: json.loads(Path(p).read_text()) for seed, p in summary_paths.items()})
    (out_dir / "seeds.json").write_text(json.dumps(study, indent=2) + "\n")
    minutes = ", ".join(f"seed {s}: {m}" for s, m in study["minutes_per_seed"].items())
    text = [f"# thor-min across seeds {', '.join(map(str, study['seeds']))}", "",
            f"Avg@{study['samples']} accuracy in %, mean and (min-max) across seeds; machine: {study['machine']}; "
            f"minutes per run: {minutes}. Each seed's own table and reading: seed-N/report.md.", "",
            seeds_table(study), "", "Accuracy per template (%, mean and range across seeds):", "",
            seeds_kind_table(study), ""]
    (out_dir / "seeds.md").write_text("\n".join(text))
    return study


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Rewrite report.md, ablation.png and templates.png of a run "
                                     "from its summary.json.")
    parser.add_argument("out", type=Path, help="the run directory (train.py --out)")
    out = parser.parse_args(argv).out
    if not (out / "summary.json").is_file():
        raise SystemExit(f"error: no {out / 'summary.json'}: run the eval stage first (python train.py --stage eval)")
    write_report(out, json.loads((out / "summary.json").read_text()))
    print(f"wrote {out / 'report.md'}, {out / 'ablation.png'} and (if the rows carry per-kind accuracy) "
          f"{out / 'templates.png'}")


if __name__ == "__main__":
    main()
