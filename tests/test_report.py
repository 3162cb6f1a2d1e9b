"""bench/report.py: the decision table at the top of RESULTS.md carries the JSON's ratios."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402

E2E_JSON = BENCH / "measured" / "cpu_bench_e2e.json"


def decision_rows(markdown: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index("## Per-step cost against SGD+M and AdamW") + 4  # title, blank, header, rule
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_decision_table_is_the_first_table_and_carries_the_json_ratios():
    markdown = report.render([E2E_JSON])
    assert markdown.index("## Per-step cost against SGD+M and AdamW") < markdown.index("| model | precision")
    benches = [b for b in json.loads(E2E_JSON.read_text())["benchmarks"] if b["name"].startswith("test_e2e_step")]
    by_row = {(b["extra_info"]["model"], b["extra_info"]["optimizer"]): b for b in benches}
    rows = decision_rows(markdown)
    # a model with an SGD+M row of its own (resnet18_cifar_b128's rows are the cost floor table's)
    assert sorted(row[1] for row in rows) == sorted({model for model, optimizer in by_row if optimizer == "sgd"})
    for device, model, precision, batch, sgd_step, adamw, foof, kfac, *_ in rows:
        assert device.startswith("CPU") and precision == "fp32"
        assert int(batch) == by_row[model, "sgd"]["extra_info"]["batch_size"]
        assert sgd_step == report.format_seconds(by_row[model, "sgd"]["stats"]["median"])
        adamw_ratio = by_row[model, "adamw"]["extra_info"]["ratio_mean"]
        assert adamw == f"{adamw_ratio:.2f}× SGD"
        for cell, optimizer in ((foof, "foof_T100_S10"), (kfac, "kfac_T100_S10")):
            ratio = by_row[model, optimizer]["extra_info"]["ratio_mean"]
            against_sgd, against_adamw = (float(part.split("×")[0]) for part in cell.split(", "))
            assert against_sgd == pytest.approx(ratio, abs=0.005)
            assert against_adamw == pytest.approx(ratio / adamw_ratio, abs=0.005)


def test_cost_floor_table_carries_the_json_ratios_and_losses():
    markdown = report.render([E2E_JSON])
    benches = json.loads(E2E_JSON.read_text())["benchmarks"]
    rows = {(b["extra_info"]["model"], b["extra_info"]["optimizer"]): b["extra_info"] for b in benches
            if b["name"].startswith("test_e2e_step")}
    lines = markdown.splitlines()
    start = lines.index("## FOOF at its cost floor: `stats_batch` and `rank`") + 4
    labels = dict(report.COST_FLOOR_ROWS)
    seen = 0
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        _, model, _, label, median, mean, extra, _ = [cell.strip() for cell in line.strip("|").split("|")]
        info = rows[model, next(name for name, text in labels.items() if text == label)]
        assert float(median) == pytest.approx(info["ratio_median"], rel=5e-3)
        assert float(mean) == pytest.approx(info["ratio_mean"], rel=5e-3)
        assert float(extra) == pytest.approx(info["observed_extra_baseline_steps"], rel=5e-3, abs=5e-3)
        seen += 1
    floor = [model for model, optimizer in rows if optimizer in labels]
    assert seen == sum(floor.count(model) for model in set(floor) if floor.count(model) > 1)
    finals = {}
    for b in benches:
        if b["name"].startswith("test_final_loss"):
            info = b["extra_info"]
            finals.setdefault((info["net"], info["variant"]), []).append(info["final_train_loss"])
    assert finals
    for losses in finals.values():
        assert f"{statistics.median(losses):.2e}" in markdown
    assert report.CPU_MEMORY_NOTE in markdown.splitlines()
