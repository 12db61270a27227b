"""Render the README performance table (markdown) from benchmarks/results/*.json.

    python benchmarks/make_table.py                      # every results file, to stdout
    python benchmarks/make_table.py FILE... --stat min   # chosen files, speedups from min instead of median
    python benchmarks/make_table.py --readme README.md   # replace the block between the markers

Reads both formats: ``gpu_report.py`` JSON (``"kind": "gpu_report"``) and
pytest-benchmark JSON (``pytest benchmarks/ --benchmark-only
--benchmark-json FILE``, whose cases carry op/pass_/impl/dtype in extra_info).
CPU tables show min and median per case (IQR in the JSON); a case whose forward-only
time exceeds its forward+backward time is flagged under its table: one of the two was
disturbed (another process, a bimodal distribution), so compare mins or re-record.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

BEGIN, END = "<!-- performance-table:begin -->", "<!-- performance-table:end -->"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
Key = tuple[str, str, str]  # op, pass, dtype


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _flags(times: dict[Key, dict[str, float | None]], what: str) -> list[str]:
    """A line per (op, dtype, impl) whose forward-only time exceeds its forward+backward time."""
    lines = []
    for (op, pass_, dtype), impls in sorted(times.items()):
        if pass_ != "fwd":
            continue
        for impl, fwd in impls.items():
            both = times.get((op, "fwd+bwd", dtype), {}).get(impl)
            if fwd is not None and both is not None and fwd > both:
                lines.append(f"- **flagged:** {op} {dtype} {impl}: fwd {what} {fwd:.3f} ms > fwd+bwd {what} "
                             f"{both:.3f} ms; a forward alone cannot cost more than forward and backward, so one "
                             "of them was disturbed: compare mins or re-record on a quiet machine")
    return [""] + lines if lines else []


def _gpu_section(data: dict, name: str) -> list[str]:
    copy = data["copy_gbps"]
    lines = [f"**{data['gpu']}** ({os.path.basename(name)}; torch {data['torch']}, triton {data['triton']}, "
             f"commit {data['git_commit'][:12]}, {data['date'][:10]}; median of `triton.testing.do_bench`; "
             f"device copy {copy:.0f} GB/s)", "",
             "| op | pass | dtype | shape | eager ms | torch.compile ms | fast ms | vs eager | vs compile "
             "| fast GB/s | % of copy |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    times: dict[Key, dict[str, float | None]] = {}
    for section in data["sections"]:
        for t in section["timings"]:
            eager, comp, fast = (t["ms"].get(k) for k in ("eager", "compile", "fast"))
            times[(t["op"], t["pass_"], t["dtype"])] = dict(t["ms"])
            gbps = t["bytes_moved"] / (fast * 1e-3) / 1e9 if fast else None
            lines.append(f"| {t['op']} | {t['pass_']} | {t['dtype']} | {'x'.join(map(str, t['shape']))} "
                         f"| {_ms(eager)} | {_ms(comp)} | {_ms(fast)} | {_ratio(eager, fast)} | {_ratio(comp, fast)} "
                         f"| {'-' if gbps is None else f'{gbps:.0f}'} "
                         f"| {'-' if gbps is None else f'{100 * gbps / copy:.0f}%'} |")
    return lines + _flags(times, "median")


def _cpu_section(data: dict, name: str, stat: str) -> list[str]:
    cases: dict[Key, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if not {"op", "pass_", "impl"} <= set(info):
            continue
        key = (info["op"], info["pass_"], info.get("dtype", "").replace("torch.", ""))
        cases.setdefault(key, {})[info["impl"]] = {
            **{k: b["stats"][k] * 1e3 for k in ("min", "median", "mean") if k in b["stats"]},
            "peak": info.get("peak_bytes"), "shape": info.get("shape", []), "threads": info.get("threads")}
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    threads = {c.get("threads") for impls in cases.values() for c in impls.values()} - {None}
    lines = [f"**{cpu.get('brand_raw', machine.get('processor', 'CPU'))}**, {cpu.get('count', '?')} cores, "
             f"torch threads {', '.join(map(str, sorted(threads))) or '?'} ({os.path.basename(name)}; "
             f"commit {data.get('commit_info', {}).get('id', '?')[:12]}, {data.get('datetime', '')[:10]}; "
             f"min / median of pytest-benchmark rounds, speedups from the {stat})", "",
             "| op | pass | dtype | shape | reference ms min / median | torch.compile ms min / median "
             "| fast ms min / median | vs reference | vs compile | peak MiB reference | peak MiB fast |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def mib(c: dict | None) -> str:
        return "-" if not c or c["peak"] is None else f"{c['peak'] / 2**20:.1f}"

    def min_median(c: dict | None) -> str:
        return "-" if not c else f"{c['min']:.3f} / {c['median']:.3f}"

    for (op, pass_, dtype), impls in sorted(cases.items()):
        ref, comp, fast = (impls.get(k) for k in ("reference", "compile", "fast"))
        ms = {k: (c[stat] if c else None) for k, c in (("r", ref), ("c", comp), ("f", fast))}
        shape = next((c["shape"] for c in impls.values() if c["shape"]), [])
        lines.append(f"| {op} | {pass_} | {dtype} | {'x'.join(map(str, shape))} | {min_median(ref)} "
                     f"| {min_median(comp)} | {min_median(fast)} | {_ratio(ms['r'], ms['f'])} "
                     f"| {_ratio(ms['c'], ms['f'])} | {mib(ref)} | {mib(fast)} |")
    return lines + _flags({k: {i: c["median"] for i, c in v.items()} for k, v in cases.items()}, "median")


def render(paths: list[str], stat: str = "median") -> str:
    """Markdown for every results file, GPU reports first."""
    blocks: list[tuple[int, list[str]]] = []
    for path in sorted(paths):
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") == "gpu_report":
            blocks.append((0, _gpu_section(data, path)))
        elif "benchmarks" in data:
            blocks.append((1, _cpu_section(data, path, stat)))
        else:
            print(f"skipping {path}: neither gpu_report nor pytest-benchmark JSON", file=sys.stderr)
    return "\n\n".join("\n".join(lines) for _, lines in sorted(blocks, key=lambda b: b[0]))


def replace_block(text: str, table: str) -> str:
    """``text`` with everything between the BEGIN and END markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                        help="pytest-benchmark statistic the speedups use (the table shows min and median; "
                             "GPU reports always hold medians)")
    parser.add_argument("--readme", help="markdown file whose marked block is replaced with the table")
    args = parser.parse_args(argv)
    paths = args.files or glob.glob(os.path.join(RESULTS, "*.json"))
    if not paths:
        print(f"no results JSON in {RESULTS}", file=sys.stderr)
        return 1
    table = render(paths, args.stat)
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_block(text, table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
