"""Render the README performance and training-throughput tables (markdown) from benchmarks/results/*.json.

    python benchmarks/make_table.py                      # every results file, to stdout
    python benchmarks/make_table.py FILE... --stat min   # chosen files, speedups from min instead of median
    python benchmarks/make_table.py --readme README.md   # replace the blocks between the markers

Reads three formats. ``gpu_report.py`` JSON (``"kind": "gpu_report"``) and
pytest-benchmark JSON (``pytest benchmarks/ --benchmark-only
--benchmark-json FILE``, whose cases carry op/pass_/impl/dtype in extra_info)
make the performance table. CPU tables show min and median per case (IQR in the JSON);
a case whose forward-only time exceeds its forward+backward time is flagged under its
table: one of the two was disturbed (another process, a bimodal distribution), so
compare mins or re-record.
``gpu_train.py`` JSON (``"kind": "gpu_train"``, ``<gpu>-train-<date>.json``) makes the
"Training throughput" table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

BEGIN, END = "<!-- performance-table:begin -->", "<!-- performance-table:end -->"
TRAIN_BEGIN, TRAIN_END = "<!-- training-table:begin -->", "<!-- training-table:end -->"
# The comparison point quoted with every training table (a published figure, not measured here).
PUBLISHED_TRAINING = ("popular PyTorch R2U-Net on a V100, batch 16, mixed precision (published)", 35.0)
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


def _label(row: dict) -> str:
    return " ".join(row["variant"].split("-")).replace(" tied", ", tied layout")


def _train_section(data: dict, name: str) -> list[str]:
    sizes = data["sizes"]
    ok = {r["variant"]: r for r in data["rows"] if r["status"] == "ok"}
    later = "epoch 2" if sizes["epochs"] == 2 else f"epochs 2-{sizes['epochs']}"
    lines = [f"**{data['gpu']}** ({os.path.basename(name)}; torch {data['torch']}, triton {data['triton']}, "
             f"CUDA {data['cuda']}, commit {data['git_commit'][:12]}, {data['date'][:10]}): `python -m "
             f"r2unet_fast.train`, R2AttU-Net base {sizes['base_channels']}, depth {sizes['depth']}, t={sizes['t']}, "
             f"batch {sizes['batch_size']}, {sizes['image_size']} px, synthetic lesions read through the decode "
             f"cache; images/s and peak MiB (CUDA: peak allocated) are the median and max over {later} "
             f"({sizes['steps']} steps each; epoch 1 warms up)", "",
             "| variant | images/s | peak MiB | data-wait share | x reference eager |",
             "|---|---:|---:|---:|---:|"]
    for row in data["rows"]:
        measured = row.get("images_per_s") is not None
        if row["status"] != "ok" and not measured:
            why = row.get("reason") or ("the call ended during this run" if row["status"] == "running"
                                        else f"exit {row.get('returncode')}: {row.get('last_stderr') or ''}")
            lines.append(f"| {_label(row)} | {row['status']} ({why.replace('|', '/')[:80]}) | - | - | - |")
            continue
        base = ok.get(row["variant"].replace("fast-", "reference-").replace("-compile-", "-eager-"))
        wait = row.get("data_wait_share")
        ratio = _ratio(row["images_per_s"], base and base["images_per_s"])
        # a run stopped at its time cap after its timed epochs still measured them: shown, and marked
        mark = "" if row["status"] == "ok" else f" ({row['status']} after {len(row['images_per_s_epochs'])} epochs)"
        lines.append(f"| {_label(row)} | {row['images_per_s']:.1f}{mark} | {row['peak_memory_mb']:.0f} "
                     f"| {'-' if wait is None else f'{wait:.1%}'} | {ratio} |")
    label, rate = PUBLISHED_TRAINING
    lines.append(f"| *{label}* | *{rate:.0f}* | - | - | - |")
    ddp, profile = data.get("ddp") or {}, data.get("profile") or {}
    if ddp:
        verdict = f"passed (`{ddp['expected']}`)" if ddp.get("passed") else ddp.get("status")
        lines += ["", f"DDP through `torchrun --nproc_per_node 1`: {verdict}"]
    if profile.get("status") == "ok":
        clock = "device_ms" if all(v["device_ms"] is not None for v in profile["phases"].values()) else "host_ms"
        phases = ", ".join(f"{k} {v[clock]:.1f}" for k, v in profile["phases"].items())
        lines += ["", f"Step phases of the fast model at bf16 (ms per step, {clock.split('_')[0]} time): {phases}; "
                      f"{profile['step_ms']:.1f} ms per step in all"]
    return lines


def render_training(paths: list[str]) -> str:
    """Markdown for every ``gpu_train.py`` results file (empty when there is none)."""
    blocks = []
    for path in sorted(paths):
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") == "gpu_train":
            blocks.append("\n".join(_train_section(data, path)))
    return "\n\n".join(blocks)


def render(paths: list[str], stat: str = "median") -> str:
    """Markdown for every op-level results file, GPU reports first (training results: render_training)."""
    blocks: list[tuple[int, list[str]]] = []
    for path in sorted(paths):
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") in ("gpu_train", "interleaved_step"):  # the README's own tables quote these
            continue
        if data.get("kind") == "gpu_report":
            blocks.append((0, _gpu_section(data, path)))
        elif "benchmarks" in data:
            blocks.append((1, _cpu_section(data, path, stat)))
        else:
            print(f"skipping {path}: neither gpu_report nor pytest-benchmark JSON", file=sys.stderr)
    return "\n\n".join("\n".join(lines) for _, lines in sorted(blocks, key=lambda b: b[0]))


def replace_block(text: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with everything between the ``begin`` and ``end`` markers replaced by ``table``."""
    if begin not in text or end not in text:
        raise SystemExit(f"no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


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
    table, training = render(paths, args.stat), render_training(paths)
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        text = replace_block(text, table)
        if training and TRAIN_BEGIN in text:
            text = replace_block(text, training, TRAIN_BEGIN, TRAIN_END)
        elif training:
            print(f"training results not written: {args.readme} has no {TRAIN_BEGIN} ... {TRAIN_END} block",
                  file=sys.stderr)
        with open(args.readme, "w") as f:
            f.write(text)
    else:
        print(table + (f"\n\n### Training throughput\n\n{training}" if training else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
