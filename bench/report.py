"""Turn pytest-benchmark JSON files into the markdown of bench/RESULTS.md.

    pytest bench/ --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json [more.json ...] -o bench/RESULTS.md

One section per JSON file (machine, device, torch/Triton versions, date), one table per benchmark
function, one row per measured benchmark: every number comes from the files, none is typed here
except the paper's reference ratio, which is labelled as the paper's.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

E2E_TEST = "test_e2e_step"
# The decision table's columns after SGD+M's own step: (optimizer row, header). A column that no row
# measured is left out (the reference-ops row runs on CUDA only, the compiled rows not at smoke sizes).
DECISION_COLUMNS = [("adamw", "AdamW"), ("foof_T100_S10", "FOOF T=100 S=10"), ("kfac_T100_S10", "KFAC T=100 S=10"),
                    ("foof_T100_S100", "FOOF S=T=100"), ("foof_T100_S10_reference", "FOOF T=100 S=10, reference ops"),
                    ("foof_T100_S10_compiled", "FOOF T=100 S=10, compiled"), ("foof_T500_S10", "FOOF T=500 S=10"),
                    ("foof_T500_S10_reference", "FOOF T=500 S=10, reference ops")]
# Benzing (2022), "Gradient descent on neurons and its link to approximate second-order optimization":
# FOOF with T=100, S=10 costs about 10% more per step than SGD on a ResNet. The paper's number, not ours.
PAPER_STEP_RATIO = 1.10
# The cost floor table's rows (DESIGN §1.2, §1.3): (optimizer row, its options)
COST_FLOOR_ROWS = [("foof_T100_S10", "full FOOF"), ("foof_T100_S10_stats_quarter", "stats_batch = B/4"),
                   ("foof_T100_S10_rank256", "rank 256"), ("foof_T100_S10_rank512", "rank 512"),
                   ("foof_T100_S10_rank256_stats_quarter", "rank 256, stats_batch = B/4")]
FINAL_LOSS_TEST = "test_final_loss"
CPU_MEMORY_NOTE = ("Peak memory on CPU: the allocator's peak during one observed step (the row's step after its timed "
                   "rounds) above its level when that step began, from the profiler's memory events.")
# extra_info keys that the e2e table shows in its own columns, or that say nothing per row
E2E_SHOWN = {"model", "optimizer", "amp", "backend", "batch_size", "peak_memory_bytes", "ratio_median", "ratio_mean",
             "rounds", "sgd_interleaved_median_s", "sgd_compiled_interleaved_median_s", "interleaved_with",
             "input_shape", "smoke", "compiled"}


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return f"{value / 2**20:.1f} MiB"
    if key.endswith("_s") and isinstance(value, (int, float)):
        return format_seconds(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "×".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else \
            ", ".join(format_value(key, v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={format_value(k, v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def test_function(bench: dict) -> str:
    """'bench/test_bench_e2e.py::test_e2e_step' from the row's full name."""
    return bench["fullname"].split("[")[0]


def run_key(data: dict) -> tuple:
    """Files measured on the same device with the same software and sizes share one section."""
    info = data.get("machine_info", {})
    ours = info.get("fastfoof", {})
    return (ours.get("cuda_device") or info.get("cpu", {}).get("brand_raw", "?"), info.get("node"), ours.get("torch"),
            ours.get("triton"), ours.get("bench_smoke"))


def machine_lines(runs: list[tuple[Path, dict]]) -> list[str]:
    data = runs[0][1]
    info = data.get("machine_info", {})
    ours = info.get("fastfoof", {})
    cpu = info.get("cpu", {})
    dates = sorted(datetime.fromisoformat(d["datetime"]) for _, d in runs)
    date = dates[0].strftime("%Y-%m-%d %H:%M")
    if dates[-1] != dates[0]:
        date += " to " + dates[-1].strftime("%Y-%m-%d %H:%M")
    device = ours.get("cuda_device") or f"CPU only ({cpu.get('brand_raw', info.get('processor') or '?')})"
    if ours.get("driver"):
        device += f", driver {ours['driver']}"
    if ours.get("cuda_device") and ours.get("cuda_runtime"):
        device += f", CUDA {ours['cuda_runtime']}"
    run = "smoke sizes (FASTFOOF_BENCH_SMOKE=1): checks that the suite runs, not speed" if ours.get("bench_smoke") \
        else "full sizes"
    return [
        f"- date: {date} UTC",
        f"- device: {device}",
        f"- machine: {info.get('node', '?')}, {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} CPU cores, "
        f"{info.get('system', '?')} {info.get('release', '')}".rstrip(),
        f"- torch {ours.get('torch', '?')} ({ours.get('torch_threads', '?')} threads), "
        f"Triton {ours.get('triton') or 'not installed'}, Python {info.get('python_version', '?')}, "
        f"pytest-benchmark {data.get('version', '?')}",
        f"- run: {run}",
        "- source: " + ", ".join(f"`{path.name}`" for path, _ in runs),
    ]


def e2e_section(benches: list[dict]) -> list[str]:
    header = ["model", "precision", "optimizer", "backend", "batch", "median step", "mean step", "÷ baseline (median)",
              "÷ baseline (mean)", "peak memory", "rounds", "notes"]
    rows = []
    for bench in benches:
        info, stats = bench["extra_info"], bench["stats"]
        notes = {k: v for k, v in info.items() if k not in E2E_SHOWN and k not in ("memory_note", "device")}
        rows.append([
            info.get("model", bench["param"]), info.get("amp", "fp32"), info.get("optimizer", ""),
            format_value("backend", info.get("backend")), format_value("batch", info.get("batch_size")),
            format_seconds(stats["median"]), format_seconds(stats["mean"]),
            format_value("ratio", info.get("ratio_median")), format_value("ratio", info.get("ratio_mean")),
            format_value("peak_memory_bytes", info.get("peak_memory_bytes")), str(stats["rounds"]),
            format_value("notes", notes),
        ])
    lines = table(header, rows)
    lines += ["", "A row times one whole training step (forward, backward, optimizer step) over one FOOF period "
              "of rounds: the mean is FOOF's amortised cost (its S observed steps and one inversion "
              "included), the median a typical step. ÷ baseline divides by the median of the baseline "
              "steps interleaved with that row's steps in the same process: SGD+M, or SGD+M on the "
              "compiled model for the compiled rows."]
    memory_notes = {b["extra_info"].get("memory_note") for b in benches} - {None}
    lines += [f"Peak memory: {note}." for note in sorted(memory_notes)]
    if any(b["extra_info"].get("device") == "cpu" and b["extra_info"].get("peak_memory_bytes") is not None
           for b in benches):
        lines += ["", CPU_MEMORY_NOTE]
    return lines


def device_label(data: dict) -> str:
    info = data.get("machine_info", {})
    ours = info.get("fastfoof", {})
    threads = ours.get("torch_threads", "?")
    return ours.get("cuda_device") or (f"CPU ({info.get('cpu', {}).get('brand_raw', '?')}, "
                                       f"{threads} thread{'' if threads == 1 else 's'})")


def ratio_cell(bench: dict | None, adamw: dict | None) -> str:
    """"1.16× SGD, 1.13× AdamW": the row's amortised (mean) step over the SGD+M steps interleaved with it,
    and that over AdamW's own amortised ratio to SGD+M."""
    ratio = None if bench is None else bench["extra_info"].get("ratio_mean")
    if ratio is None:
        return "—"
    baseline = "compiled SGD" if bench["extra_info"].get("interleaved_with") == "sgd_compiled" else "SGD"
    adamw_ratio = None if adamw is None else adamw["extra_info"].get("ratio_mean")
    against_adamw = "" if adamw_ratio is None or bench is adamw else f", {ratio / adamw_ratio:.2f}× AdamW"
    return f"{ratio:.2f}× {baseline}{against_adamw}"


def decision_section(files: list[tuple[Path, dict]]) -> list[str]:
    """One row per (device, model, precision, batch): each optimizer's amortised step against SGD+M and AdamW."""
    groups = defaultdict(dict)
    smoke = False
    for _, data in files:
        for bench in data["benchmarks"]:
            if test_function(bench).endswith(E2E_TEST):
                info = bench["extra_info"]
                smoke |= bool(info.get("smoke"))
                key = (device_label(data), info["model"], info.get("amp", "fp32"), info["batch_size"])
                groups[key][info["optimizer"]] = bench
    groups = {key: benches for key, benches in groups.items() if "sgd" in benches}  # the cost floor's own rows: below
    if not groups:
        return []
    columns = [(name, title) for name, title in DECISION_COLUMNS if any(name in row for row in groups.values())]
    header = ["device", "model", "precision", "batch", "SGD+M step"] + [title for _, title in columns]
    rows = []
    for (device, model, precision, batch), benches in groups.items():
        sgd = benches.get("sgd")
        cells = [device, model, precision, str(batch), format_seconds(sgd["stats"]["median"]) if sgd else "—"]
        # Compiled FOOF is measured against compiled SGD+M; AdamW ran on the eager model only.
        cells += [ratio_cell(benches.get(name), None if name.endswith("_compiled") else benches.get("adamw"))
                  for name, _ in columns]
        rows.append(cells)
    lines = ["## Per-step cost against SGD+M and AdamW", ""]
    if smoke:
        lines += ["Smoke sizes (FASTFOOF_BENCH_SMOKE=1): these rows check that the suite runs, not speed.", ""]
    lines += table(header, rows)
    lines += ["", "Amortised: a row's mean step over one whole FOOF period (T=100 steps, so its S observed steps and "
              "one inversion round included) divided by the median SGD+M step interleaved with it in the same "
              "process (the compiled row: compiled SGD+M). \"× AdamW\" divides that by AdamW's own amortised ratio "
              "to SGD+M. SGD+M step: the median of its own row. On CPU the plain-PyTorch reference ops run; "
              "the sections below have every row's median, mean, memory and sizes.",
              "", f"The paper's reference number (Benzing 2022, not measured here): FOOF with T=100, S=10 costs about "
              f"{PAPER_STEP_RATIO:.2f}× SGD per step on a ResNet."]
    return lines


def cost_floor_section(files: list[tuple[Path, dict]]) -> list[str]:
    """FOOF with its cost floor options beside full FOOF: step costs per (device, model, batch), then
    the final training loss of each option against full FOOF's."""
    steps, losses = defaultdict(dict), defaultdict(dict)
    for _, data in files:
        for bench in data["benchmarks"]:
            info = bench["extra_info"]
            if test_function(bench).endswith(E2E_TEST) and info.get("optimizer") in dict(COST_FLOOR_ROWS):
                steps[device_label(data), info["model"], info["batch_size"]][info["optimizer"]] = bench
            elif test_function(bench).endswith(FINAL_LOSS_TEST):
                key = info["dataset"], info["net"], info["lr"], info["damping"]
                losses[key].setdefault(info["variant"], []).append(info["final_train_loss"])
    steps = {key: rows for key, rows in steps.items() if len(rows) > 1}  # FOOF alone compares nothing
    if not (steps or losses):
        return []
    lines = ["## FOOF at its cost floor: `stats_batch` and `rank`", ""]
    if steps:
        header = ["device", "model", "batch", "options", "median step ÷ SGD+M", "amortised ÷ SGD+M",
                  "observed − median step (SGD+M steps)", "inverting step"]
        rows = []
        for (device, model, batch), benches in steps.items():
            for name, label in COST_FLOOR_ROWS:
                if name in benches:
                    info = benches[name]["extra_info"]
                    rows.append([device, model, str(batch), label, format_value("ratio", info.get("ratio_median")),
                                 format_value("ratio", info.get("ratio_mean")),
                                 format_value("steps", info.get("observed_extra_baseline_steps")),
                                 format_seconds(info.get("inverting_mean_s"))])
        lines += table(header, rows)
        lines += ["", "Each row is its own end-to-end row (below), interleaved step by step with SGD+M. Observed − median: "
                  "the mean of the row's S observed steps less its median plain step, in units of the SGD+M median "
                  "step; inverting step: the step that also runs the inversion round.", ""]
    if losses:
        variants = []
        for rows in losses.values():
            variants += [v for v in rows if v not in variants]
        header = ["data", "net", "lr", "λ", "seeds"] + [f"{v} (÷ foof)" if v != "foof" else "foof" for v in variants]
        rows = []
        for (dataset, net, lr, damping), runs in losses.items():
            full = statistics.median(runs["foof"]) if "foof" in runs else None
            cells = [dataset, net, format_value("lr", lr), format_value("damping", damping),
                     str(max(len(r) for r in runs.values()))]
            for v in variants:
                loss = statistics.median(runs[v]) if v in runs else None
                cells.append("—" if loss is None else f"{loss:.2e}" if v == "foof" or not full
                             else f"{loss:.2e} ({loss / full:.2f}×)")
            rows.append(cells)
        lines += table(header, rows)
        lines += ["", "Final training loss (the last epoch's mean), the median over seeds, of FOOF with each option; each "
                  "seed's init and batches are the same for every option, as are lr and damping "
                  "(bench/test_bench_e2e.py::test_final_loss). ÷ foof: that median over full FOOF's."]
    return lines


def generic_section(benches: list[dict]) -> list[str]:
    """Columns: the timing statistics, then every extra_info key; keys equal in all rows go above."""
    keys = []
    for bench in benches:
        keys += [k for k in bench["extra_info"] if k not in keys]
    constant = {k: benches[0]["extra_info"].get(k) for k in keys
                if all(k in b["extra_info"] and b["extra_info"][k] == benches[0]["extra_info"][k] for b in benches)}
    varying = [k for k in keys if k not in constant] if len(benches) > 1 else keys
    lines = []
    if len(benches) > 1 and constant:
        lines += ["All rows: " + ", ".join(f"{k} = {format_value(k, v)}" for k, v in constant.items()), ""]
    header = ["case", "median", "mean", "min", "rounds"] + varying
    rows = [[bench["param"] or bench["name"], format_seconds(bench["stats"]["median"]),
             format_seconds(bench["stats"]["mean"]), format_seconds(bench["stats"]["min"]),
             str(bench["stats"]["rounds"])] + [format_value(k, bench["extra_info"].get(k)) for k in varying]
            for bench in benches]
    return lines + table(header, rows)


def device_section(runs: list[tuple[Path, dict]]) -> list[str]:
    title = runs[0][1].get("machine_info", {}).get("fastfoof", {}).get("cuda_device") or "CPU"
    lines = [f"## {title}", ""] + machine_lines(runs)
    groups = defaultdict(list)
    for _, data in runs:
        for bench in data["benchmarks"]:
            groups[test_function(bench)].append(bench)
    if not groups:
        lines += ["", "No benchmark rows (a run with --benchmark-disable records none)."]
    for name in sorted(groups, key=lambda n: (not n.endswith(E2E_TEST), n)):  # end-to-end first
        benches = groups[name]
        lines += ["", f"### `{name}`", ""]
        lines += e2e_section(benches) if name.endswith(E2E_TEST) else generic_section(benches)
    return lines


def format_loads(counts: dict | None) -> str:
    """"128-bit ×6, 32-bit ×2, tma ×1": the widths that occur."""
    if counts is None:
        return "—"
    return ", ".join(f"{width}{'' if width == 'tma' else '-bit'} ×{n}" for width, n in counts.items() if n) or "none"


def compile_check_section(path: Path) -> list[str]:
    """The kernel builds of `python -m fastfoof.kernels.compile_check --json` (sm_80/sm_90 cubins)."""
    rows = json.loads(path.read_text())
    failed = sum(not row.get("ok") for row in rows)
    lines = ["## Kernel builds", "",
             f"`python -m fastfoof.kernels.compile_check --json` (`{path.name}`): {len(rows)} builds, "
             f"{failed} failed, each built with the specialisation Triton's launcher gives representative "
             "arguments. Registers per thread, spilled bytes, shared memory per block, the tensor-core "
             "instructions in the SASS (wgmma: Hopper HGMMA, mma: HMMA), and the global load instructions "
             "by width in bits (LDG, LDGSTS; tma: UTMALDG).", ""]
    header = ["kernel", "config", "arch", "ok", "registers", "spilled bytes", "shared bytes", "mma", "global loads"]
    errors = any(row.get("error") for row in rows)
    body = [[format_value("kernel", row.get("kernel")), format_value("config", row.get("config")),
             format_value("arch", row.get("arch")), format_value("ok", row.get("ok")),
             format_value("regs", row.get("regs")), format_value("spills", row.get("spills")),
             format_value("shared", row.get("shared_bytes")), format_value("mma_kind", row.get("mma_kind")),
             format_loads(row.get("global_loads"))]
            + ([format_value("error", str(row.get("error") or "")[:120])] if errors else [])
            for row in rows]
    return lines + table(header + (["error"] if errors else []), body)


def render(paths: list[Path], compile_check: Path | None = None, notes: list[str] = ()) -> str:
    sections = defaultdict(list)
    for path in paths:
        data = json.loads(path.read_text())
        sections[run_key(data)].append((path, data))
    lines = ["# fastfoof benchmark results", "",
             "Generated by `python bench/report.py " + " ".join(str(p) for p in paths)
             + (f" --compile-check {compile_check}" if compile_check else "")
             + "".join(f" --note {note!r}" for note in notes) + "` from the "
             "pytest-benchmark JSON that `pytest bench/` wrote; do not edit by hand. Times are per call "
             "(median, mean, min over `rounds` timed calls). On CPU the reference ops run "
             "(no Triton), and rows marked `reduced` ran smaller sizes so that the suite finishes in minutes."]
    lines += [f"\nNote: {note}" for note in notes]
    every_run = [run for runs in sections.values() for run in runs]
    for section in (decision_section(every_run), cost_floor_section(every_run)):
        if section:
            lines += [""] + section
    for runs in sections.values():
        lines += [""] + device_section(runs)
    if compile_check is not None:
        lines += [""] + compile_check_section(compile_check)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON -> markdown tables")
    parser.add_argument("json", nargs="+", type=Path, help="files written by pytest --benchmark-json")
    parser.add_argument("-o", "--output", type=Path, help="markdown file to write (default: stdout)")
    parser.add_argument("--compile-check", type=Path,
                        help="also tabulate this output of `python -m fastfoof.kernels.compile_check --json`")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence about the run to print under the title (repeatable)")
    args = parser.parse_args(argv)
    text = render(args.json, args.compile_check, args.note)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
