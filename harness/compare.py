"""`python -m harness.compare BASE RUN...`: what one change did, with its uncertainty.

The tables group runs by their axes (model, bits, method, variant, ...); a one-off override such as
`method.split_weights=true` is not an axis, so its run would be averaged with the default's seeds.
This command compares runs by id instead: each RUN against BASE on every metric both have, the
difference with its 95 % interval and p-value from the paired bootstrap over the shared eval samples
(the statistics each run saved with its features; both runs must use the same eval seed and sample
count), else from the records' intervals (unpaired, conservative), and names what differs in the two
configs. Run ids may be unique prefixes; `--store` may repeat (e.g. the main store and a diagnosis one).

    python -m harness.compare 80f1629f 3c1e --store results/store --store results/diagnosis/x/store
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.aggregate.cli import feature_files
from harness.aggregate.frame import records_frame
from harness.aggregate.metric_info import metric_info
from harness.aggregate.significance import ALPHA, Evidence, compare, paired_difference
from harness.store import ResultsStore, RunRecord

METRICS = ("fid", "fid_inf", "kid", "sfid", "is", "psnr_vs_fp", "confident_fraction", "temporal_feature_error_mean",
           "calib_seconds", "adaround_soft_fraction")
# Not part of what a run computes: where it wrote, how it logged, whether it was forced.
PRESENTATION = ("paths", "logger", "force", "fp_reference")
SEED_KEYS = ("seed", "method.seed")  # what a seed sweep changes (calibration rows, minibatches)


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys of a nested config, as an override would name them."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def config_changes(base: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """`key: base -> run` for every setting both configs have and that differs, then a count of the
    settings only one of them has (another method's options); presentation keys left out."""
    a = {k: v for k, v in flatten(base) if k.split(".")[0] not in PRESENTATION}
    b = {k: v for k, v in flatten(run) if k.split(".")[0] not in PRESENTATION}
    changed = [f"{k}: {a[k]} -> {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    only_base, only_run = len(a.keys() - b.keys()), len(b.keys() - a.keys())
    extra = [f"{n} settings only the {side} has" for n, side in ((only_base, "base"), (only_run, "run")) if n]
    return changed + extra


def seed_runs(base: RunRecord, records: Sequence[RunRecord]) -> list[RunRecord]:
    """The finished runs of the base's config at any seed (the base included): how far the calibration
    seed alone moves a metric, which the paired test over eval samples does not see."""
    def key(r: RunRecord) -> dict[str, Any]:
        return {k: v for k, v in flatten(r.config) if k.split(".")[0] not in PRESENTATION and k not in SEED_KEYS}

    ref = key(base)
    same = {r.run_id: r for r in records if r.finished and r.kind == base.kind and key(r) == ref}
    return list(same.values())


def seed_std(runs: Sequence[RunRecord], metric: str) -> tuple[float, int] | None:
    """(sample std over seeds, number of seeds) of `metric`; None with fewer than two seeds."""
    values = {r.seed: float(r.metrics[metric]) for r in runs if isinstance(r.metrics.get(metric), int | float)}
    if len(values) < 2:
        return None
    return float(np.std(list(values.values()), ddof=1)), len(values)


def find(run_id: str, records: Sequence[RunRecord]) -> RunRecord:
    """The record whose id is or starts with `run_id`; a clear error when none or several match."""
    hits = [r for r in records if r.run_id.startswith(run_id)]
    if len(hits) != 1:
        found = "no record" if not hits else f"{len(hits)} records ({', '.join(r.run_id for r in hits)})"
        raise ValueError(f"run id {run_id!r} matches {found} in the given stores; give a longer prefix or --store")
    return hits[0]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def comparison_rows(base: RunRecord, run: RunRecord, evidence: Evidence, metrics: Sequence[str] = METRICS,
                    alpha: float = ALPHA, seeds: Sequence[RunRecord] = ()) -> list[dict[str, str]]:
    """One row per metric both runs recorded: the two values, run - base with its interval, p, the
    base config's std over `seeds`, and a verdict ('better' / 'worse' only where the test rejects at
    `alpha`, qualified 'within 2 seed std' where another seed could move the base as far; 'not tested'
    without a test)."""
    frame = records_frame([base, run], dedupe=False).set_index("run_id", drop=False)
    a, b = frame.loc[[run.run_id]], frame.loc[[base.run_id]]
    rows = []
    for metric in metrics:
        if metric not in frame or frame[metric].isna().any():
            continue
        info = metric_info(metric)
        diff = float(a[metric].iloc[0] - b[metric].iloc[0])
        paired = paired_difference(a, b, metric, evidence)
        if paired is not None:
            shown, p = f"{_fmt(diff)} [{_fmt(paired.lo)}, {_fmt(paired.hi)}]", paired.p_value
        else:
            shown, p = _fmt(diff), compare(a, b, metric).p_value
        if p is None:
            verdict = "not tested"
        elif p >= alpha:
            verdict = "no difference shown"
        elif info.higher_is_better is None:
            verdict = "differs"
        else:
            verdict = "better" if (diff > 0) == info.higher_is_better else "worse"
        spread = seed_std(seeds, metric)
        if spread is not None and verdict in ("better", "worse", "differs") and abs(diff) < 2 * spread[0]:
            verdict += "; within 2 seed std"
        rows.append({"metric": info.display, "base": _fmt(float(b[metric].iloc[0])),
                     "run": _fmt(float(a[metric].iloc[0])), "run - base [95 % CI]": shown,
                     "p": "" if p is None else f"{p:.3g}",
                     "base seed std (n)": "–" if spread is None else f"{_fmt(spread[0])} ({spread[1]})",
                     "verdict": verdict})
    return rows


def to_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return "no metric recorded by both runs\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(base: RunRecord, runs: Sequence[RunRecord], evidence: Evidence, metrics: Sequence[str] = METRICS,
           alpha: float = ALPHA, seeds: Sequence[RunRecord] = ()) -> str:
    """A markdown section per run: what its config changes, then its metrics against the base."""
    parts = [f"Base: {base.run_id} ({base.model}/{base.method}/{base.bits}, seed {base.seed}). Intervals and "
             f"p-values: paired bootstrap over the shared eval samples (else the records' intervals, unpaired);\n"
             f"verdicts at alpha {alpha} ('not tested': no uncertainty recorded for that metric). The paired test "
             f"sees the eval noise only: 'base seed std' is the spread of the base's config over the {len(seeds)} "
             f"seed(s) in the stores\n(calibration rows, minibatches); a difference under 2 of those is "
             f"marked 'within 2 seed std': one seed does not show it would hold at another.\n"]
    for run in runs:
        changes = "; ".join(config_changes(base.config, run.config)) or "(same config)"
        table = to_markdown(comparison_rows(base, run, evidence, metrics, alpha, seeds))
        parts.append(f"### {run.run_id}: {changes}\n\n{table}")
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.compare", description=__doc__.splitlines()[0])
    p.add_argument("base", help="run id (or unique prefix) of the reference run")
    p.add_argument("runs", nargs="+", help="run ids (or unique prefixes) to compare with it")
    p.add_argument("--store", type=Path, action="append", help="a results store (repeat; default results/store)")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma list of metric keys")
    p.add_argument("--alpha", type=float, default=ALPHA, help="level of the better / worse verdicts")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stores = args.store or [Path("results/store")]
    records: list[RunRecord] = []
    features: dict[str, Path] = {}
    for store in stores:
        found = ResultsStore(store).records()
        records += found
        features |= feature_files(store, found)
    try:
        base = find(args.base, records)
        runs = [find(r, records) for r in args.runs]
        unfinished = [r.run_id for r in (base, *runs) if not r.finished]
        if unfinished:
            raise ValueError(f"runs {unfinished} are not finished (status in their records); compare finished runs")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    text = report(base, runs, Evidence(features), metrics, args.alpha, seed_runs(base, records))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
