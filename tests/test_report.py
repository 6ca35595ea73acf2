"""The run report: the plain-language reading of the ablation rows, and report.md / ablation.png."""

import json

from PIL import Image

from thor_min.report import machine_name, main, reading, table, write_report


def row(name, accuracy, ci95, *, pass_rate=0.8, tokens=100.0, heldout=None):
    return {"name": name, "model": name, "accuracy": accuracy, "ci95": list(ci95), "heldout_accuracy": heldout,
            "cell_call_rate": 0.9, "cell_pass_rate": pass_rate, "tokens": tokens}


def claim_line(text: str, what: str) -> str:
    found = [line for line in text.splitlines() if line.startswith(f"- {what}")]
    assert len(found) == 1, f"expected one line starting with {what!r} in:\n{text}"
    return found[0]


TOOLS_VS_COT = "Tool-integrated reasoning"


def test_non_overlapping_intervals_read_clearly_above():
    text = reading([row("base-cot", 0.20, (0.15, 0.25)), row("cold-start", 0.50, (0.44, 0.56))])
    line = claim_line(text, TOOLS_VS_COT)
    assert "clearly above (+30.0 points, the intervals do not overlap)" in line, line


def test_overlapping_intervals_read_within_noise():
    text = reading([row("base-cot", 0.40, (0.30, 0.50)), row("cold-start", 0.45, (0.35, 0.55))])
    line = claim_line(text, TOOLS_VS_COT)
    assert "above, but within noise (+5.0 points, the intervals overlap)" in line and "clearly" not in line, line


def test_lower_accuracy_reads_not_above():
    text = reading([row("base-cot", 0.40, (0.30, 0.50)), row("cold-start", 0.35, (0.25, 0.45))])
    line = claim_line(text, TOOLS_VS_COT)
    assert "not above (-5.0 points)" in line and "clearly below" not in line, line


def test_much_lower_accuracy_reads_clearly_below():
    text = reading([row("base-cot", 0.60, (0.55, 0.65)), row("cold-start", 0.20, (0.15, 0.25))])
    line = claim_line(text, TOOLS_VS_COT)
    assert "not above (-40.0 points, clearly below)" in line, line


def test_missing_rows_give_no_claim():
    text = reading([row("cold-start", 0.5, (0.4, 0.6))])
    assert TOOLS_VS_COT not in text, f"a claim needs both rows:\n{text}"


def test_tirgen_data_is_compared_with_plain_cot_sft_on_the_same_problems():
    text = reading([row("cot-sft", 0.02, (0.0, 0.04)), row("cold-start", 0.30, (0.24, 0.36))])
    line = claim_line(text, "SFT on TIRGen data vs on plain-CoT references")
    assert "clearly above (+28.0 points" in line, line


def test_step_level_loss_raising_the_pass_rate():
    text = reading([row("traj-rl", 0.5, (0.4, 0.6), pass_rate=0.70), row("step-rl", 0.5, (0.4, 0.6), pass_rate=0.85)])
    line = claim_line(text, "The step-level loss")
    assert "raises the cell pass rate: 70.0% -> 85.0%" in line, line


def test_step_level_loss_not_raising_the_pass_rate():
    text = reading([row("traj-rl", 0.5, (0.4, 0.6), pass_rate=0.90), row("step-rl", 0.5, (0.4, 0.6), pass_rate=0.85)])
    line = claim_line(text, "The step-level loss")
    assert "does not raise the cell pass rate: 90.0% -> 85.0%" in line, line


def test_pass_rate_claim_without_cells_does_not_crash():
    """A row whose model never ran a cell has no pass rate (None in summary.json)."""
    text = reading([row("traj-rl", 0.5, (0.4, 0.6), pass_rate=None), row("step-rl", 0.5, (0.4, 0.6), pass_rate=0.8),
                    row("self-correct", 0.5, (0.4, 0.6), pass_rate=None)])
    line = claim_line(text, "The step-level loss")
    assert "cannot be judged" in line and "n/a" in line, line
    assert "not comparable" in claim_line(text, "Self-correction"), text


def test_self_correction_sentence_not_hurt():
    text = reading([row("step-rl", 0.50, (0.40, 0.60), pass_rate=0.80, tokens=200),
                    row("self-correct", 0.48, (0.38, 0.58), pass_rate=0.95, tokens=260)])
    line = claim_line(text, "Self-correction")
    assert "accuracy 50.0% -> 48.0% (not hurt beyond noise)" in line, line
    assert "cell pass rate 80.0% -> 95.0% (raised)" in line, line
    assert "tokens per sample 200 -> 260" in line, line


def test_self_correction_sentence_clearly_lower():
    text = reading([row("step-rl", 0.60, (0.55, 0.65), pass_rate=0.80),
                    row("self-correct", 0.30, (0.25, 0.35), pass_rate=0.70)])
    line = claim_line(text, "Self-correction")
    assert "(clearly lower)" in line and "(not raised)" in line, line


def test_heldout_sentence_lists_rows_with_heldout_accuracy():
    text = reading([row("base-cot", 0.2, (0.1, 0.3), heldout=0.15), row("cold-start", 0.3, (0.2, 0.4))])
    line = claim_line(text, "Held-out templates")
    assert "base-cot 15.0%" in line and "cold-start" not in line, line


def test_table_has_a_header_and_one_line_per_row():
    rows = [row("base-cot", 0.2, (0.1, 0.3)), row("step-rl", 0.5, (0.4, 0.6), pass_rate=None)]
    lines = table(rows, samples=4).splitlines()
    assert lines[0].startswith("| row | model | accuracy (Avg@4)") and len(lines) == 4, lines
    assert "| step-rl |" in lines[3] and "| n/a |" in lines[3], lines[3]


def test_write_report_writes_markdown_and_png(tmp_path):
    rows = [row("step-rl", 0.55, (0.45, 0.65)), row("base-cot", 0.20, (0.12, 0.28)),
            row("cold-start", 0.40, (0.30, 0.50), heldout=0.3)]
    summary = {"rows": rows, "seconds": 600.0, "cores": 2, "model": "tiny", "samples": 4, "temperature": 0.6}
    write_report(tmp_path, summary)
    text = (tmp_path / "report.md").read_text()
    assert "| row | model | accuracy (Avg@4) |" in text, "table header missing"
    positions = [text.index(f"| {name} |") for name in ("base-cot", "cold-start", "step-rl")]
    assert positions == sorted(positions), "rows should be in claim order (base-cot, cold-start, step-rl)"
    assert "## Reading" in text and "10.0 minutes on 2 CPU cores" in text, text[:400]
    with Image.open(tmp_path / "ablation.png") as image:
        assert image.format == "PNG", "ablation.png is not a PNG"
    assert "](ablation.png)" in text, "report.md must show ablation.png"
    assert not (tmp_path / "templates.png").exists() and "templates.png" not in text, \
        "rows without per-kind accuracy get no template chart"


def test_report_links_the_template_chart_when_kinds_were_measured(tmp_path):
    kinds = {"tiny": {"kinds": {"product": 0.5, "gcd": 1.0}}, "tiny-heldout": {"kinds": {"orchard": 0.0}}}
    rows = [{**row("cold-start", 0.4, (0.3, 0.5)), "benchmarks": kinds}]
    summary = {"rows": rows, "seconds": 60.0, "cores": 2, "model": "tiny", "samples": 2, "temperature": 0.6}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    main([str(tmp_path)])   # python -m thor_min.report OUT: regenerates everything from summary.json
    with Image.open(tmp_path / "templates.png") as image:
        assert image.format == "PNG", "templates.png is not a PNG"
    assert "![accuracy per template](templates.png)" in (tmp_path / "report.md").read_text(), "chart not linked"


def test_machine_name_ends_with_the_core_count():
    import os

    assert machine_name().endswith(f", {os.cpu_count()} cores"), machine_name()
