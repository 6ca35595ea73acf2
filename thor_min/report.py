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
    """report.md, ablation.png and templates.png in `out_dir` from a summary dict (see pipeline.stage_eval)."""
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
