"""The hand-written numbers of the docs agree with the result files they come from.

The README's verdict, the results tables and the demo paragraph are generated (``tests/test_readme.py``). The prose of
``docs/*.md``, ``benchmarks/README.md`` and the examples' headers quotes numbers too: each quoted number below is
recomputed from ``benchmarks/results/*.json`` (or from the code, for counts of methods) and must appear in the text as
written. When a benchmark is rerun, this test names every sentence to update.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _text(path: str) -> str:
    """The file's text with whitespace collapsed and typographic minus signs as ASCII hyphens."""
    return re.sub(r"\s+", " ", (ROOT / path).read_text()).replace("−", "-")


def _suite() -> tuple[dict, dict]:
    from benchmarks.suite import report

    doc = _load("suite.json")
    return doc, report.index(doc)


def _delta(name: str, stream_rows: dict) -> tuple[float, float]:
    from benchmarks.suite import report

    return report.delta(stream_rows[name], stream_rows[report.TV])


def _sig(name: str, sign: int) -> list[tuple[str, float]]:
    _, idx = _suite()
    out = []
    for stream, rows in idx.items():
        d, se = _delta(name, rows)
        if se > 0 and sign * d >= 2 * se:
            out.append((stream, d))
    return out


def _mean_delta(name: str) -> float:
    _, idx = _suite()
    return statistics.fmean(_delta(name, rows)[0] for rows in idx.values() if name in rows)


def suite_claims() -> list[tuple[str, str]]:
    from benchmarks.suite import report

    doc, idx = _suite()
    default, peer = report.DEFAULT, "confidence weight p[y]"
    wins, losses = _sig(default, 1), _sig(default, -1)
    best = [report.best_free_peer(rows)["variant"] for rows in idx.values()]
    beats = sum(1 for rows in idx.values()
                if (lambda d: d[1] > 0 and d[0] >= 2 * d[1])(report.delta(rows[peer], rows[default])))  # fmt: skip
    both, batch = "SAFLEX margin, val both ways", "SAFLEX margin, reference=batch"
    both_d = [_delta(both, rows) for rows in idx.values()]
    info = doc["streams"]
    uniform = [s for s in idx if info[s].get("kind") == "uniform"]
    default_auc = [idx[s][default]["auroc"] for s in uniform]
    peer_auc = [report.best_free_peer(idx[s], by="auroc")["auroc"] for s in uniform]
    classcond = [s for s in idx if info[s].get("kind") == "classcond"]
    cc = ", ".join(f"{idx[s][default]['auroc']:.2f} vs {report.best_free_peer(idx[s], by='auroc')['auroc']:.2f}"
                   for s in classcond)  # fmt: skip
    images = [idx[s][default]["auroc"] for s in idx if info[s]["family"] in ("transform", "bias")
              and s.split("/")[0] in ("fmnist", "mnist", "digits")]  # fmt: skip
    g4 = report.goals(doc)["4"]["streams"]
    n = len(idx)
    page = "docs/when_to_use.md"
    return [
        (page, f"beat the default on {beats} of the suite's {n} streams"),
        (page, f"better by ≥ 2 SE on {len(wins)} streams"),
        (page, " and ".join(f"{d:+.1f}" for _, d in wins) + " points)"),
        (page, f"worse on {len(losses)}, mean {_mean_delta(default):+.2f} points"),
        (page, f"best free peer on {best.count(peer)} of {n} streams and beat the default by ≥ 2 SE on {beats}"),
        (page, f"(AUROC {min(peer_auc):.2f}–{max(peer_auc):.2f} vs {min(default_auc):.2f}–{max(default_auc):.2f})"),
        (page, f"class-conditional ({cc})"),
        (page, f"mean {_mean_delta(both):+.2f} points, better on {sum(se > 0 and d >= 2 * se for d, se in both_d)} "
               f"streams, worse on {sum(se > 0 and d <= -2 * se for d, se in both_d)}"),
        (page, f"on {sum(x['met'] for x in g4)} of {n} streams and missed on {sum(not x['met'] for x in g4)} "
               f"(mean {_mean_delta(batch):+.2f} points)"),
        (page, f"AUROC is {min(images):.2f}–{max(images):.2f}"),
        (page, f"`gain_auto` mean {_mean_delta('SAFLEX gain_auto'):+.2f} points"),
        ("benchmarks/README.md", f"{doc['meta']['wall_s'] / 60:.0f} min on the shared 2-core machine (`nice -n 10`, "
                                 f"{doc['meta']['workers']} workers × {doc['meta']['threads_per_worker']} thread"),
    ]  # fmt: skip


def overhead_claims() -> list[tuple[str, str]]:
    o = _load("overhead.json")
    cpu, mem = o["cpu_ratio"], o["peak_rss_ratio"]
    threads = o["setting"]["threads"]
    return [
        ("benchmarks/README.md", f"({threads} thread{'s' if threads > 1 else ''} on the loaded 2-core machine"),
        ("benchmarks/README.md", f"`last_layer` {cpu['last_layer']:.2f}×, `last_layer` with `val_ema=0.9` "
                                 f"{cpu['last_layer@ema0.9']:.2f}×, the exact `jvp` {cpu['jvp']:.2f}×, "
                                 f"`jvp_frozen_stats` {cpu['jvp_frozen_stats']:.2f}× "
                                 f"({cpu['jvp_frozen_stats@every4']:.2f}× with `val_every=4`); peak memory "
                                 f"{mem['last_layer']:.2f}×, {mem['jvp']:.2f}× and {mem['jvp_frozen_stats']:.2f}×"),
        ("docs/when_to_use.md", f"`method=\"last_layer\"` (the default) about {cpu['last_layer']:.2f}× a plain step, "
                                f"the exact `\"jvp\"` about {cpu['jvp']:.1f}×, and `\"jvp_frozen_stats\"` (a "
                                f"different, cheaper `Π`) about {cpu['jvp_frozen_stats']:.1f}×"),
        ("docs/results.md", f"`last_layer` costs {cpu['last_layer']:.2f}× a plain step"),
        ("docs/results.md", f"{cpu['last_layer@ema0.9']:.2f}× with `val_ema=0.9`. The exact `jvp` misses its ≤ 1.60× "
                            f"target at {cpu['jvp']:.1f}×"),
        ("docs/results.md", f"Peak memory: `jvp` {mem['jvp']:.2f}× (target ≤ 1.3×, missed), `jvp_frozen_stats` "
                            f"{mem['jvp_frozen_stats']:.2f}×, `last_layer` {mem['last_layer']:.2f}×"),
    ]  # fmt: skip


def accuracy_claims() -> list[tuple[str, str]]:
    from benchmarks import make_readme_tables as tables

    def gains(pattern: str) -> list[dict]:
        payloads = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(pattern))]
        return tables.accuracy_tables(payloads)[1]

    now = gains("accuracy_*__margin_beta1.5_T4.json")
    mean = {m: statistics.fmean(g["vs_upstream"] for g in now if g["method"] == m) for m in ("jvp", "last_layer")}
    wins = {m: sum(g["vs_upstream"] > 0 for g in now if g["method"] == m) for m in ("jvp", "last_layer")}
    rows = {m: sum(g["method"] == m for g in now) for m in ("jvp", "last_layer")}
    tv = statistics.fmean(g["vs_upstream_train_val"] for g in now)
    fm = [g["vs_upstream_train_val"] for g in now if "fashion" in g["dataset"]]
    paper = [g for g in gains("accuracy_*.json") if g["variant"] == "library defaults"]
    paper_mean = {m: statistics.fmean(g["vs_upstream"] for g in paper if g["method"] == m)
                  for m in ("jvp", "last_layer")}
    page = "docs/when_to_use.md"
    return [
        (page, f"mean {mean['jvp']:+.2f} (`jvp`) / {mean['last_layer']:+.2f} (`last_layer`) points"),
        (page, f"{wins['jvp']}/{rows['jvp']} and {wins['last_layer']}/{rows['last_layer']} rows above the upstream"),
        (page, f"{tv:+.1f} points on average, and {max(fm):+.1f} to {min(fm):+.1f} on Fashion-MNIST"),
        (page, f"below the upstream on all {len(paper)} rows, mean {max(paper_mean.values()):+.1f} to "
               f"{min(paper_mean.values()):+.1f} points"),
        ("docs/results.md", f"(mean {mean['jvp']:+.2f} / {mean['last_layer']:+.2f} points for jvp / last_layer"),
    ]  # fmt: skip


def decision_quality_claims() -> list[tuple[str, str]]:
    entries = {e["variant"]: e for e in _load("decision_quality.json")["entries"] if e["dataset"] == "fmnist-noisy"}
    default = entries["margin β=1.5, last_layer, fresh val 128, val T=4 (library default)"]
    t1 = entries["margin β=1.5, last_layer, fresh val 128, val T=1 (previous default)"]
    oracle, third = entries["oracle drop"], entries["oracle drop, a random third of the bad samples"]
    fix = entries["margin_fix β=1.5, last_layer, fresh val 128, val T=4"]
    small = entries["margin β=1.5, last_layer, fresh val 32, val T=4 (cost target)"]
    jvp = entries["margin β=1.5, jvp, fresh val 128, val T=4"]
    clean = entries["clean upstream"]
    page = "docs/when_to_use.md"
    return [
        (page, f"with AUROC {default['weight_auroc']:.2f}"),
        (page, f"the same rule gets {t1['weight_auroc']:.2f}"),
        (page, f"{default['gain_vs_noisy_paired']:+.2f} ± {default['gain_vs_noisy_paired_se']:.2f} points over the "
               f"noisy upstream, about a fifth of the {clean['gain_vs_noisy_paired']:.2f} points the noise costs"),
        (page, f"recovers only {oracle['recovered_fraction']:.2f} of the damage"),
        (page, f"recovers {third['recovered_fraction']:.2f}"),
        (page, f"gets {100 * fix['relabel_accuracy']:.0f}% of the new labels right but gained no accuracy "
               f"({fix['gain_vs_noisy_paired']:+.2f})"),
        (page, f"a fresh batch of 32 (AUROC {small['weight_auroc']:.2f})"),
        (page, f"(0.90 vs {jvp['weight_auroc']:.2f})"),
    ]  # fmt: skip


def earlier_claims() -> list[tuple[str, str]]:
    """docs/results.md's earlier measurements and when_to_use.md's drop precision, from decision_quality.json."""
    dq = _load("decision_quality.json")["entries"]
    noisy = {e["variant"]: e for e in dq if e["dataset"] == "fmnist-noisy"}
    default = {e["dataset"]: e for e in dq if e["is_default"]}
    t4 = noisy["margin β=1.5, last_layer, fresh val 128, val T=4 (library default)"]
    t1 = noisy["margin β=1.5, last_layer, fresh val 128, val T=1 (previous default)"]
    b05 = noisy["margin β=0.5, last_layer, fresh val 128, val T=4"]["decision_stats"]
    hybrid = noisy["hybrid β=1.5, last_layer, fresh val 128, val T=4"]
    fix = noisy["margin_fix β=1.5, last_layer, fresh val 128, val T=4"]
    relabel = noisy["margin_relabel β=1, last_layer, fresh val 128, val T=4"]
    hpc, destroyed = default["hpc-noisy"], default["fmnist-destructive"]
    ds = t4["decision_stats"]
    page = "docs/results.md"
    return [
        (page, f"from {t1['weight_auroc']:.2f} to {t4['weight_auroc']:.2f}"),
        (page, f"drop precision from {t1['decision_stats']['drop_precision']:.2f} to {ds['drop_precision']:.2f}"),
        (page, f"met on Fashion-MNIST ({t4['weight_auroc']:.2f}), **not** on the table ({hpc['weight_auroc']:.2f}; "
               f"{hpc['decision_stats']['weight_auroc_within_class']:.2f} within each upstream class"),
        (page, f"nor for occlusion ({destroyed['weight_auroc']:.2f}"),
        (page, f"{100 * fix['relabel_accuracy']:.0f}% of its new labels are right"),
        (page, f"which relabels all of them: {100 * relabel['relabel_accuracy']:.0f}%"),
        (page, f"the default recovers {t4['recovered_fraction']:.2f} of it ({t4['gain_vs_noisy_paired']:+.2f} ± "
               f"{t4['gain_vs_noisy_paired_se']:.2f} points"),
        (page, f"(β = 0.5: recall {b05['drop_recall']:.2f} at precision {b05['drop_precision']:.2f})"),
        (page, f"(AUROC {hybrid['weight_auroc']:.2f}; recall {hybrid['decision_stats']['drop_recall']:.2f} at "
               f"precision {hybrid['decision_stats']['drop_precision']:.2f}) gained no more "
               f"({hybrid['gain_vs_noisy_paired']:+.2f})"),
        (page, f"met on Fashion-MNIST ({t4['gain_vs_train_on_val']:+.2f}) and a tie on the table "
               f"({hpc['gain_vs_train_on_val']:+.2f})"),
        ("docs/when_to_use.md", f"{100 * ds['drop_precision']:.0f}% of the samples it drops are wrong ones (it finds "
                                f"{100 * ds['drop_recall']:.0f}% of them)"),
        ("docs/when_to_use.md", f"gets {t1['weight_auroc']:.2f} and "
                                f"{100 * t1['decision_stats']['drop_precision']:.0f}%"),
    ]  # fmt: skip


def method_count_claims() -> list[tuple[str, str]]:
    from saflex_data._methods import METHODS

    words = {2: "two", 3: "three", 4: "four", 5: "five"}
    return [("docs/method.md", f"all {words[len(METHODS)]} are tested against the float64 per-sample autograd "
                               "reference")]  # fmt: skip


def benchmarks_readme_suite_claims() -> list[tuple[str, str]]:
    from benchmarks.suite import report

    doc, idx = _suite()
    sel = report.selection(doc)
    both, default, peer = "SAFLEX margin, val both ways", report.DEFAULT, "confidence weight p[y]"
    best = [report.best_free_peer(rows)["variant"] for rows in idx.values()]
    beats = sum(1 for rows in idx.values()
                if (lambda d: d[1] > 0 and d[0] >= 2 * d[1])(report.delta(rows[peer], rows[default])))  # fmt: skip
    style = next(s for s in idx if doc["streams"][s]["kind"] == "style")
    batch = "SAFLEX margin, reference=batch"
    g4 = report.goals(doc)["4"]["streams"]

    def mean_auc(name: str) -> float:
        return statistics.fmean(r[name]["auroc"] for r in idx.values() if name in r and r[name]["auroc"] is not None)

    page = "benchmarks/README.md"
    return [
        (page, f"(mean Δ {sel['A'][both]['mean_delta']:+.2f} points vs the upstream on train ∪ val) and again on "
               "half B "
               f"({sel['B'][both]['mean_delta']:+.2f}), and the best row of the suite on average "
               f"({_mean_delta(both):+.2f})"),
        (page, f"averages {_mean_delta(default):+.2f}"),
        (page, f"best free peer on {best.count(peer)} of {len(idx)} streams and beat the default by ≥ 2 SE on {beats}"),
        (page, f"the default {_delta(default, idx[style])[0]:+.1f}, validation used both ways "
               f"{_delta(both, idx[style])[0]:+.1f}"),
        (page, f"on {sum(x['met'] for x in g4)} of {len(idx)} streams; it ranks worse than a held-out reference "
               f"(mean AUROC {mean_auc(batch):.2f} vs {mean_auc(default):.2f})"),
        (page, f"lost on average ({_mean_delta('SAFLEX gain_auto'):+.2f})"),
    ]  # fmt: skip


def readme_claims() -> list[tuple[str, str]]:
    demo = _load("demo_results.json")
    return [("README.md", f"3 runs × {len(demo['seeds'])} seeds ({demo['cpu_s'] / 60:.1f} min of CPU)")]


def benchmarks_readme_accuracy_claims() -> list[tuple[str, str]]:
    """benchmarks/README.md's "What we found" paragraphs, from the accuracy_*.json files of each setting."""
    from benchmarks import make_readme_tables as tables

    def gains(pattern: str, variant: str | None = None) -> list[dict]:
        payloads = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(pattern))]
        return [g for g in tables.accuracy_tables(payloads)[1] if variant is None or g["variant"] == variant]

    def mean(gs: list[dict], method: str | None = None, key: str = "vs_upstream") -> float:
        return statistics.fmean(g[key] for g in gs if method is None or g["method"] == method)

    paper = gains("accuracy_*.json", "library defaults")
    by = {d: [g["vs_upstream"] for g in paper if g["dataset"] == d] for d in {g["dataset"] for g in paper}}
    margin, t4 = gains("accuracy_*__margin_beta1.5.json"), gains("accuracy_*__margin_beta1.5_T4.json")
    beta4 = gains("accuracy_*__paper_beta4.json")
    fm = [g["vs_upstream_train_val"] for g in margin if "fashion" in g["dataset"]]
    page = "benchmarks/README.md"
    return [
        (page, f"({sum(g['vs_upstream'] < 0 for g in paper)}/{len(paper)}; mean {mean(paper, 'jvp'):.1f} points for "
               f"`jvp`, {mean(paper, 'last_layer'):.1f} for `last_layer`; Fashion-MNIST {max(by['fashion_mnist']):.1f} "
               f"to {min(by['fashion_mnist']):.1f}, mlc_churn {statistics.fmean(by['mlc_churn']):.0f}, hpc_data "
               f"{max(by['hpc_data']):.0f} to {min(by['hpc_data']):.0f}, credit_data "
               f"{statistics.fmean(by['credit_data']):.1f}, wa_churn ≈ 0)"),
        (page, f"{sum(g['vs_upstream'] > 0 for g in margin)} of {len(margin)} rows above the upstream, mean "
               f"{mean(margin, 'jvp'):+.2f} (`jvp`) / {mean(margin, 'last_layer'):+.2f} (`last_layer`) points"),
        (page, f"β = 4 on the four tables: mean {mean(beta4):.1f}"),
        (page, f"Fashion-MNIST {max(fm):.1f} to {min(fm):.1f}"),
        (page, f"(mean Δ vs upstream {mean(t4, 'jvp'):+.2f} / {mean(t4, 'last_layer'):+.2f} for jvp / last_layer, vs "
               f"{mean(margin, 'jvp'):+.2f} / {mean(margin, 'last_layer'):+.2f} at `T = 1`)"),
    ]  # fmt: skip


def example_header_claims() -> list[tuple[str, str]]:
    import math

    cpu = _load("demo_results.json")["cpu_s"] / 60
    seconds = [sum(r["seconds"] for r in json.loads(f.read_text())["results"].values())
               for f in sorted(RESULTS.glob("contrastive_flyp*_seed*.json"))]  # fmt: skip
    return [
        ("examples/demo.py", f"about {math.floor(cpu)}-{math.ceil(cpu)} minutes of CPU time (3 seeds × 3 runs)"),
        ("examples/contrastive_flyp.py",
         f"took {min(seconds) / 60:.1f}–{max(seconds) / 60:.1f} minutes on a shared CPU"),
    ]


def changelog_claims() -> list[tuple[str, str]]:
    def mean(pattern: str, arm: str) -> float:
        runs = [json.loads(f.read_text())["results"][arm]["test_accuracy"] for f in sorted(RESULTS.glob(pattern))]
        return statistics.fmean(runs)

    margin, paper = mean("contrastive_flyp_seed*.json", "FLYP + aug + SAFLEX"), mean(
        "contrastive_flyp_paper_seed*.json", "FLYP + aug + SAFLEX")
    aug = mean("contrastive_flyp_seed*.json", "FLYP + aug")
    return [("CHANGELOG.md", f"(mean zero-shot accuracy {margin:.3f} and {paper:.3f}, plain augmentation {aug:.3f})")]


CLAIMS: list[Callable[[], list[tuple[str, str]]]] = [
    suite_claims, benchmarks_readme_suite_claims, readme_claims, earlier_claims, overhead_claims, accuracy_claims,
    decision_quality_claims, method_count_claims, benchmarks_readme_accuracy_claims, example_header_claims,
    changelog_claims,
]


@pytest.mark.parametrize("claims", CLAIMS, ids=[c.__name__ for c in CLAIMS])
def test_quoted_numbers_match_the_result_files(claims: Callable[[], list[tuple[str, str]]]) -> None:
    pytest.importorskip("numpy")  # benchmarks.suite.report uses numpy
    missing = []
    for path, expected in claims():
        if re.sub(r"\s+", " ", expected).replace("−", "-") not in _text(path):
            missing.append(f"{path}: expected to read {expected!r}")
    assert not missing, "\n".join(missing)


def test_no_stale_method_facts() -> None:
    # jvp runs forward-mode AD on dual parameters (saflex_data._autodiff.jvp_logits), not torch.func.jvp
    for path in ("docs/method.md", "README.md", "saflex_data/contrastive.py", "saflex_data/loss.py"):
        assert "`torch.func.jvp` of the logits" not in (ROOT / path).read_text(), path
        assert "torch.func.jvp`` pass" not in (ROOT / path).read_text(), path
    assert "forward_ad" in (ROOT / "saflex_data" / "_autodiff.py").read_text()


def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    # `make docs`: pdoc over the modules the Makefile names, with no warning and no stray "~" of a Sphinx role
    pytest.importorskip("pdoc")
    import subprocess

    makefile = (ROOT / "Makefile").read_text()
    modules = re.search(r"^DOC_MODULES := (.+)$", makefile, flags=re.M).group(1)
    prefix, adapters = re.search(r"\$\(addprefix ([\w.]+),([\w ]+)\)", modules).groups()
    names = modules.split("$(")[0].split() + [prefix + a for a in adapters.split()]
    result = subprocess.run([sys.executable, "-m", "pdoc", "--docformat", "google", "--no-show-source", "-o",
                             str(tmp_path), *names], cwd=ROOT, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert result.returncode == 0 and "Warn" not in result.stderr + result.stdout, result.stderr[-2000:]
    for path in ROOT.glob("saflex_data/**/*.py"):
        assert not re.search(r":\w+:`~", path.read_text()), f"{path.name}: pdoc prints the ~ of :class:`~...`"
