"""Rewrite the generated tables of docs/benchmarks.md from benchmarks/results/*.json.

    python -m benchmarks.report            # rewrite docs/benchmarks.md in place
    python -m benchmarks.report --check    # exit 1, naming the stale tables, if the file is out of date
    python -m benchmarks.report --plots    # also redraw docs/images/*.png (matplotlib)

Each table sits between `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->`; everything outside
the markers is hand-written and left alone. Numbers are only ever read from the results files, so the page
cannot drift from them (tests/test_report.py regenerates and compares).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
# the current recipe (no class weights, 96 px, stressed_margin threshold): every whole flow on record
CURRENT_DEFAULT_QUALITY = ["quality-default-unweighted-seeds20-22.json", "quality-default-adaptation-seeds40-44.json"]
CURRENT_DEFAULT_SPEED = ["speed-full.json", "speed-full-flows-seeds35-37.json", "speed-full-flows-seeds38-40.json",
                         "speed-full-flows-seeds45-47.json"]
CURRENT_FULL_QUALITY = ["quality-full-unweighted-seeds23-25.json", "quality-full-unweighted-seeds26-28.json"]
STRESSES = ("gamma0.6", "gamma1.6", "blur", "wider_view", "noise", "narrower", "broader")
MARKER = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                    re.DOTALL)


def load(name: str):
    return json.loads((RESULTS / name).read_text())


def f3(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f3(xs[0])


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)


def seeds_text(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def current_default_flows() -> list[dict]:
    """Every whole `default` flow of the current recipe on record: (file, seed, minutes, test metrics)."""
    flows = []
    for name in CURRENT_DEFAULT_QUALITY:
        for r in load(name)["runs"]:
            flows.append(dict(file=name, seed=r["seed"], minutes=r["minutes"], peak=r["peak_memory_gib"],
                              threshold=r["threshold"], **{k: r[k] for k in ("accuracy", "roc_auc", "sensitivity",
                                                                             "specificity")}))
    for name in CURRENT_DEFAULT_SPEED:
        for r in load(name)["default_flow"]["seeds"]:
            flows.append(dict(file=name, seed=r["seed"], minutes=r["minutes"], peak=r["peak_memory_gib"],
                              threshold=r["threshold"], **{k: r["test"][k] for k in ("accuracy", "roc_auc",
                                                                                     "sensitivity", "specificity")}))
    return sorted(flows, key=lambda f: f["seed"])


def current() -> str:
    """The current recipe's whole flows, pooled over every file that holds one, per profile."""
    metrics = ("accuracy", "roc_auc", "sensitivity", "specificity")
    default = current_default_flows()
    full = [dict(file=n, **r) for n in CURRENT_FULL_QUALITY for r in load(n)["runs"]]
    rows = []
    for profile, flows in (("default", default), ("full", full)):
        files = sorted({f["file"] for f in flows})
        rows.append([f"`{profile}`", str(len(flows)), *(mean_sd([f[m] for f in flows]) for m in metrics),
                     f"{statistics.mean(f['minutes'] for f in flows):.1f}",
                     f"{max(f.get('peak', f.get('peak_memory_gib')) for f in flows):.2f}",
                     ", ".join(f"`{n}`" for n in files)])
    return table(["profile", "flows", "test accuracy", "ROC AUC", "sensitivity", "specificity", "minutes (mean)",
                  "peak GiB (max)", "from"], rows, "lrrrrrrrl")


def current_flows() -> str:
    rows = [[str(f["seed"]), f3(f["threshold"]), f3(f["accuracy"]), f3(f["roc_auc"]), f3(f["sensitivity"]),
             f3(f["specificity"]), f"{f['minutes']:.1f}", f"`{f['file']}`"] for f in current_default_flows()]
    return table(["seed", "threshold", "test accuracy", "ROC AUC", "sensitivity", "specificity", "minutes", "file"],
                 rows, "rrrrrrrl")


def quality() -> str:
    rows = []
    for path in sorted(RESULTS.glob("quality-*.json"), key=lambda p: (load(p.name)["profile"],
                                                                       min(r["seed"] for r in load(p.name)["runs"]))):
        d = load(path.name)
        runs = d["runs"]
        peaks = [r["peak_memory_gib"] for r in runs if "peak_memory_gib" in r]
        rows.append([f"`{path.name}`", d["profile"], seeds_text([r["seed"] for r in runs]),
                     *(mean_sd([r[m] for r in runs]) for m in ("accuracy", "roc_auc")),
                     *(f3(statistics.mean(r[m] for r in runs)) for m in ("sensitivity", "specificity")),
                     f"{statistics.mean(r['minutes'] for r in runs):.1f}", f"{max(peaks):.2f}" if peaks else "–"])
    return table(["file", "profile", "seeds", "test accuracy", "ROC AUC", "sensitivity", "specificity",
                  "minutes (mean)", "peak GiB"], rows, "llrrrrrrr")


def speed() -> str:
    rows = []
    for path in sorted(RESULTS.glob("speed-*.json")):
        d = load(path.name)
        ref, proj, flow = d["reference"], d["project"], d.get("default_flow")
        rows.append([
            f"`{path.name}`",
            f"{d['matmul_peak_gflops']:.0f}",
            f"{ref['minutes_12_epochs']:.1f}" if "minutes_12_epochs" in ref else "–",
            f"{proj['images_per_second'] / ref['images_per_second']:.1f}x",
            f"{proj['efficiency_vs_matmul_peak']:.0%}",
            f"{d['input_pipeline_ratio']:.2f}",
            f3(proj["mean"]["accuracy"]) if "mean" in proj else "–",
            seeds_text([s["seed"] for s in flow["seeds"]]) if flow else "–",
            f3(flow["test"]["accuracy"]) if flow else "–",
            f"{flow['model_minutes']:.1f}" if flow else "–",
            (f"{d['flow_time_to_accuracy_speedup']:.1f}x" if d.get("flow_time_to_accuracy_speedup") else
             "not reached") if flow else "–",
            f"{d['whole_flow_time_ratio']:.1f}x" if flow else "–",
            f"{flow['peak_memory_gib']:.2f}" if flow else "–",
        ])
    return table(["file", "matmul peak GFLOP/s", "reference, 12 epochs (min)", "throughput, project / reference",
                  "project share of peak", "input-pipeline ratio (CPU)", "fixed network: test accuracy",
                  "flows' seeds", "flows' test accuracy", "flows' search + training (min)",
                  "time-to-accuracy speed-up", "whole-flow time ratio", "flow peak GiB"], rows, "lrrrrrrrrrrrr")


def reference_runs() -> str:
    runs = load("reference-runs.json")
    metrics = ("accuracy", "roc_auc", "sensitivity", "specificity")
    rows = [[str(r["seed"]), f"{r['minutes']:.1f}", *(f3(r[m]) for m in metrics)] for r in runs]
    rows.append(["mean", "", *(f"**{statistics.mean(r[m] for r in runs):.3f}**" for m in metrics)])
    return table(["seed", "minutes", "test accuracy", "ROC AUC", "sensitivity", "specificity"], rows)


def pipeline() -> str:
    d = load("pipeline.json")
    rows = [[k.strip(), f"{v:.2f}"] for k, v in d["cpu_ms"].items()]
    rows.append(["augmentation / training step", f"{d['share']:.3f}"])
    return table([f"CPU ms per batch of {d['batch']} at {d['size']} px", "value"], rows)


def width() -> str:
    d = load("width.json")
    rows = [[str(r["filters"]), f"{r['images_per_second']:.1f}", f"{r['gflop_per_image_step']:.3f}",
             f"{r['gflops']:.1f}", f"{r['efficiency']:.0%}", f"{r['time_ratio']:.2f}x", f"{r['flop_ratio']:.2f}x"]
            for r in d["rows"]]
    return table(["first-block filters", "images/s (median)", "GFLOP per image-step", "GFLOP/s",
                  f"share of matmul peak ({d['matmul_peak_gflops']:.1f})", "time / image vs 32", "FLOPs vs 32"], rows)


def threshold() -> str:
    rows = []
    for path in sorted(RESULTS.glob("threshold-*.json")):
        models = load(path.name)
        for rule in models[0]["rules"]:
            per = [m["rules"][rule] for m in models]
            rows.append([f"`{path.name}`", str(len(models)), f"`{rule}`",
                         *(f3(statistics.mean(p[k] for p in per)) for k in
                           ("stressed_balanced_accuracy", "worst_stress_balanced_accuracy",
                            "clean_balanced_accuracy", "stressed_specificity"))])
    return table(["file", "models", "rule", "held-out-stress BA", "worst stress BA", "clean held-out BA",
                  "held-out-stress specificity"], rows, "lrlrrrr")


def tta() -> str:
    rows = []
    for path in sorted(RESULTS.glob("tta-*.json")):
        entries = load(path.name)
        for views in dict.fromkeys(e["views"] for e in entries):
            es = [e for e in entries if e["views"] == views]
            bas = [[e["stressed"][s]["balanced_accuracy"] for s in STRESSES] for e in es]
            rows.append([f"`{path.name}`", str(len(es)), f"{views} ({es[0].get('n_views', '?')})",
                         f"{statistics.mean(e['val_auc'] for e in es):.4f}",
                         f3(statistics.mean(e["cross_fit"] for e in es)),
                         f3(statistics.mean(statistics.mean(b) for b in bas)),
                         f3(statistics.mean(min(b) for b in bas))])
    return table(["file", "models", "views", "val AUC", "held-out BA", "stressed BA mean", "worst stress BA"],
                 rows, "lrlrrrr")


def snapshots() -> str:
    entries = load("snapshots.json")
    rows = []
    for cand in dict.fromkeys(e["candidate"] for e in entries):
        es = [e for e in entries if e["candidate"] == cand]
        rows.append([cand, seeds_text([e["seed"] for e in es]),
                     *(f"{statistics.mean(e[k] for e in es):.4f}" for k in
                       ("val_auc", "stressed_balanced_accuracy", "worst_stress_balanced_accuracy",
                        "clean_balanced_accuracy"))])
    return table(["candidate", "seeds", "val AUC", "held-out-stress BA", "worst stress BA", "clean held-out BA"],
                 rows, "lrrrrr")


def gradcam() -> str:
    rows = [[f"`{r['run_id'][:8]}`", str(r["image_size"]),
             " / ".join(f"{r['NORMAL'][k]:.2f}" for k in ("box", "top", "bottom")),
             " / ".join(f"{r['PNEUMONIA'][k]:.2f}" for k in ("box", "top", "bottom"))]
            for r in load("gradcam_regions.json")]
    return table(["run", "px", "NORMAL map: box / top / bottom", "PNEUMONIA map: box / top / bottom"], rows, "lrll")


def recipe() -> str:
    entries = load("recipe.json")
    rows = []
    for name in dict.fromkeys(e["recipe"] for e in entries):
        es = [e for e in entries if e["recipe"] == name]
        bas = [[e["stressed"]["margin"][s]["balanced_accuracy"] for s in STRESSES] for e in es]
        rows.append([f"`{name}`", seeds_text([e["seed"] for e in es]),
                     f"{statistics.mean(e['val_auc'] for e in es):.4f}",
                     f3(statistics.mean(e["cross_fit"]["margin"]["balanced_accuracy"] for e in es)),
                     f3(statistics.mean(statistics.mean(b) for b in bas)),
                     f3(statistics.mean(min(b) for b in bas)),
                     f"{statistics.mean(e['minutes'] for e in es):.1f}"])
    return table(["recipe", "seeds", "val AUC", "held-out BA (margin)", "stressed BA mean", "worst stress BA",
                  "minutes"], rows, "llrrrrr")


def serving() -> str:
    if not (RESULTS / "serving.json").exists():
        return "No `serving.json` yet: run `benchmarks/serving.py` on a quiet machine, then `make docs`.\n"
    d = load("serving.json")
    rows = [[case, *(f"{t[p]['p50']:.1f} / {t[p]['p95']:.1f}" if p in t else "–"
                     for p in ("in-process", "http", "requests")), f"{t['http']['p50'] / t['in-process']['p50']:.2f}x"]
            for case, t in d["latency_ms"].items()]
    ips = d["batch_images_per_second"]
    rows.append([f"{d['batch_size']} images a request (images/s)", f"{ips['in-process']:.0f}", f"{ips['http']:.0f}",
                 "–", f"{ips['http'] / ips['in-process']:.2f}x"])
    return (f"{d['model']}, {d['image_size']} px, {d['cpus']} CPU cores, {d['requests']} calls a path:\n\n"
            + table(["request", "in-process p50 / p95 (ms)", "HTTP p50 / p95 (ms)", "HTTP via `requests` p50 / p95",
                     "HTTP / in-process"], rows))


def adaptation() -> str:
    """`cxr adapt` on the test split, cross-fitted by patient halves, and the stand-in sites' choice."""
    d, sites = load("adaptation.json"), load("adaptation-sites.json")
    metrics = ("accuracy", "roc_auc", "sensitivity", "specificity", "ece")
    rows = [[k, *(f"{v[m]['mean']:.3f} ± {v[m]['sd']:.3f}" for m in metrics)] for k, v in d["summary"].items()
            if k != "default"]
    rows += [[f"{d['curve_settings']}, {n} films", *(f"{v[m]['mean']:.3f} ± {v[m]['sd']:.3f}" for m in metrics)]
             for n, v in d["curve"].items() if n != "all"]
    test = table(["test, cross-fitted (seeds " + seeds_text([m["seed"] for m in d["models"]]) + ")", "accuracy",
                  "ROC AUC", "sensitivity", "specificity", "ECE"], rows)
    site_rows = [[k, f"{v['mean_accuracy']:.4f}", f"{v['worst_site_drop']:.4f}", f"{v['mean_ece']:.3f}",
                  f"{v['mean_prior_error']:.3f}", str(v["refusals"]), "yes" if v["admissible"] else "no"]
                 for k, v in sorted(sites["components"]["table"].items(), key=lambda kv: -kv[1]["mean_accuracy"])]
    chosen = (f"Chosen on the stand-in sites: **{sites['chosen_name']}**; film counts "
              + ", ".join(f"{n}: prior error {v['mean_prior_error']:.3f}" for n, v in sites["film_counts"].items())
              + f" (minimum by the rule: {sites['min_films'] or 'none reached 0.05'}).\n\n")
    return (table(["stand-in sites on validation (5 models x 24 sites)", "accuracy", "worst site drop", "ECE",
                   "prior error", "refused", "admissible"], site_rows) + "\n" + chosen + test)


TABLES: dict[str, Callable[[], str]] = {
    "current": current, "current-flows": current_flows, "quality": quality, "speed": speed,
    "reference-runs": reference_runs, "pipeline": pipeline, "width": width, "threshold": threshold, "tta": tta,
    "snapshots": snapshots, "gradcam": gradcam, "recipe": recipe, "serving": serving,
    "adaptation": adaptation,
}


# the default profile's recipes in the order they were adopted: (label, results files of its whole flows)
DEFAULT_RECIPES = [
    ("128 px,\n+ resolution", ["quality-default-resolution.json"]),
    ("128 px,\nstressed_margin", ["quality-default.json", "quality-default-128px-seed9.json",
                                 "quality-default-128px-seed10.json"]),
    ("96 px", ["quality-default-96px-seed12.json", "quality-default-96px-seeds15-16.json"]),
    ("96 px,\nnoise bank", ["quality-default-noise-bank-seeds17-19.json"]),
    ("no class weights\n(current)", CURRENT_DEFAULT_QUALITY + CURRENT_DEFAULT_SPEED),
]


def plot_default_flows(out: Path) -> None:
    """Test accuracy of every whole `default` flow on record, by recipe, against the reference's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for i, (_, files) in enumerate(DEFAULT_RECIPES):
        accs = []
        for name in files:
            d = load(name)
            accs += ([r["accuracy"] for r in d["runs"]] if "runs" in d else
                     [r["test"]["accuracy"] for r in d["default_flow"]["seeds"]])
        xs = [i + 0.25 * ((k * 0.618) % 1 - 0.5) for k in range(len(accs))]  # deterministic jitter
        ax.scatter(xs, accs, s=22, color="tab:blue", alpha=0.8)
        ax.plot([i - 0.3, i + 0.3], [statistics.mean(accs)] * 2, color="tab:blue", lw=2)
    ref = load("reference-runs.json")
    ax.axhline(0.917, color="tab:red", ls="--", lw=1, label="reference notebook, its one run (0.917)")
    ref_mean = statistics.mean(r["accuracy"] for r in ref)
    ax.axhline(ref_mean, color="tab:orange", ls=":", lw=1.5,
               label=f"reference retrained here, mean of {len(ref)} ({ref_mean:.3f})")
    ax.set_xticks(range(len(DEFAULT_RECIPES)), [label for label, _ in DEFAULT_RECIPES], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title("Whole default flows, one point each (line: mean)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def render(page: str) -> str:
    """`page` with every generated table rebuilt from the results files; unknown marker names are an error."""
    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise SystemExit(f"docs/benchmarks.md: unknown generated table {name!r} (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name]() + m.group(4)
    return MARKER.sub(fill, page)


def stale(page: str) -> list[str]:
    """Names of the generated tables whose text differs from what the results files give."""
    fresh = {m["name"]: m["body"] for m in MARKER.finditer(render(page))}
    return [m["name"] for m in MARKER.finditer(page) if m["body"] != fresh[m["name"]]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the page is up to date")
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--plots", action="store_true", help="also redraw docs/images/default-flows.png")
    args = parser.parse_args(argv)
    page = args.page.read_text()
    if args.check:
        names = stale(page)
        if names:
            print(f"{args.page} is out of date ({', '.join(names)}): run python -m benchmarks.report", file=sys.stderr)
            return 1
        print(f"{args.page} is up to date")
        return 0
    args.page.write_text(render(page))
    if args.plots:
        plot_default_flows(ROOT / "docs" / "images" / "default-flows.png")
    print(f"rewrote {len(MARKER.findall(page))} tables in {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
