"""`python -m harness.report --store DIR --out DIR`: the store as one static HTML page.

What a researcher looks at after a sweep, in one file that opens from disk (no server, no network):
the quality, ablation and latency tables with their significance marks (the aggregator's tables,
rendered by aggregate/render.py), the temporal-feature error per timestep with seed bands, FID vs
bit-width, calibration time and latency bars, the FP and quantized sample grids side by side per
setting, and a link to every record. Images are embedded as data URIs; the figures are also written
beside the page (figures/*.png, *.pdf) for reuse. A run's grid lives in its outputs folder, which a
fresh clone does not have: such grids are shown as missing, with the way to regenerate them.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from PIL import Image

from harness.aggregate.cli import load_frame, make_tables
from harness.aggregate.frame import FP_METHOD
from harness.aggregate.plots import plot_bars, plot_metric_vs_bits, plot_temporal_error
from harness.aggregate.render import to_html
from harness.aggregate.significance import ALPHA
from harness.aggregate.style import DPI
from harness.aggregate.table import METHOD_LABELS, sort_key
from harness.report_page import PAGE
from harness.store import RunRecord

PAGE_FILE = "index.html"
FIGURES = "figures"


def data_uri(path: Path) -> str:
    """The image inlined, so the page is one file that works anywhere."""
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def find_artifact(name: str, store: Path) -> Path | None:
    """A record's artifact path: as written (absolute, or relative to where the run was launched: the
    current folder or the repository above results/store); None when it is not on this machine."""
    if not name:
        return None
    path = Path(name)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, store.parent.parent / path, store.parent / path]
    return next((c for c in candidates if c.is_file()), None)


def _label(record: RunRecord) -> str:
    return METHOD_LABELS.get(record.method, record.method) + (f" ({record.variant})" if record.variant else "")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _figure(png: Path, alt: str, caption: str) -> str:
    pdf = png.with_suffix(".pdf")
    link = f' (<a href="{quote(FIGURES + "/" + pdf.name)}">PDF</a>)' if pdf.is_file() else ""
    with Image.open(png) as im:  # shown at 100 px per figure inch, so a one-panel figure is not blown up
        width = round(im.width * 100 / DPI)
    return (f'<figure><img src="{data_uri(png)}" alt="{html.escape(alt)}" width="{width}">'
            f"<figcaption>{html.escape(caption)}{link}</figcaption></figure>")


def figures_section(records: Sequence[RunRecord], frame: pd.DataFrame, out: Path) -> str:
    """Every figure the store supports, written to out/figures and inlined."""
    folder = out / FIGURES
    made = [
        (plot_temporal_error(records, folder / "temporal_feature_error.png"), "temporal-feature error per timestep",
         "Temporal-feature error of each method against FP per sampling step; seeds as mean with a min-max band."),
        (plot_metric_vs_bits(frame, folder / "fid_vs_bits.png"), "FID vs bit-width",
         "FID per bit-width; the dashed line is the FP model."),
        (plot_bars(frame[frame["method"] != FP_METHOD], folder / "calib_seconds.png", "calib_seconds", "quality",
                   "bits"), "calibration time", "Calibration wall time per method and bit-width (seconds)."),
    ]
    latency = frame[frame["kind"] == "latency"]
    batch_keys = sorted((c for c in latency.columns if c.startswith("latency_ms_b") and latency[c].notna().any()),
                        key=lambda c: int(c.rsplit("_b", 1)[1]))
    if batch_keys:
        made.append((plot_bars(latency, folder / "latency.png", batch_keys[0], "latency", "backend"), "latency",
                     f"Denoiser latency per backend at batch {batch_keys[0].rsplit('_b', 1)[1]}; hatching: bit-width."))
    shown = [_figure(png, alt, caption) for png, alt, caption in made if png is not None]
    return _section("figures", "Figures", "".join(shown) or "<p>No record carries curves or timings yet.</p>")


def grids_section(records: Sequence[RunRecord], store: Path) -> str:
    """Per (model, bit-width): the FP grid of that model beside each quantized run's grid."""
    quality = [r for r in records if r.finished and r.kind == "quality"]
    fp = {}
    for r in quality:
        if r.method == FP_METHOD:
            fp.setdefault(r.model, r)
    settings: dict[tuple[str, str], list[RunRecord]] = {}
    for r in quality:
        if r.method != FP_METHOD:
            settings.setdefault((r.model, r.bits), []).append(r)
    missing = 0
    blocks = []
    for model, bits in sorted(settings, key=lambda k: (k[0], sort_key("bits", k[1]))):
        runs = sorted(settings[(model, bits)], key=lambda r: (sort_key("method", r.method), r.variant or "", r.seed))
        cells = []
        for r in ([fp[model]] if model in fp else []) + runs:
            path = find_artifact(str(r.artifacts.get("grid", "")), store)
            name = f"{_label(r)}, seed {r.seed}, run {r.run_id}"
            if path is None:
                missing += 1
                cells.append(f'<figure><div class="missing"><span>sample grid not on this machine:<br>'
                             f'<code>{html.escape(str(r.artifacts.get("grid", "none recorded")))}</code></span></div>'
                             f"<figcaption>{html.escape(name)}</figcaption></figure>")
            else:
                cells.append(f'<figure><img src="{data_uri(path)}" alt="{html.escape(name)}">'
                             f"<figcaption>{html.escape(name)}</figcaption></figure>")
        blocks.append(f"<h3>{html.escape(model)} {html.escape(bits)}</h3><div class=\"grids\">{''.join(cells)}</div>")
    note = ""
    if missing:
        note = (f'<p class="note">{missing} sample grid(s) are not on this machine: a run writes its grid to its '
                "outputs folder (<code>outputs/runs/&lt;run_id&gt;/grid.png</code>), which is not committed. "
                "Rerun the sweep with <code>force=true</code>, or into a fresh <code>paths.store=...</code>, "
                "to regenerate them.</p>")
    body = note + "".join(blocks) if blocks else "<p>No finished quality runs.</p>"
    return _section("grids", "Samples: FP and quantized, side by side", body)


def records_section(records: Sequence[RunRecord], store: Path, out: Path) -> str:
    """Every record (failed ones too) with a relative link to its JSON file."""
    rows = []
    for r in sorted(records, key=lambda r: (r.kind, r.model, sort_key("bits", r.bits), sort_key("method", r.method))):
        href = quote(Path(os.path.relpath(store / f"{r.run_id}.json", out)).as_posix())
        cells = [f'<a href="{href}">{html.escape(r.run_id)}</a>', r.status, r.kind, r.model, r.bits, _label(r),
                 r.backend or "", "" if r.seed is None else str(r.seed), r.created, (r.error or "")[:120]]
        rows.append("<tr>" + "".join(f"<td>{c if i == 0 else html.escape(str(c))}</td>" for i, c in enumerate(cells))
                    + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("record", "status", "kind", "model", "bits", "method", "backend", "seed",
                                             "created", "error"))
    table = f'<table class="results" id="records"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return _section("records", f"Records ({len(records)})", table)


def build_report(store: Path, out: Path, alpha: float = ALPHA, title: str = "PTQ benchmark report") -> Path:
    """Write out/index.html (and out/figures/) from the store; returns the page."""
    records, frame, evidence = load_frame(store)
    if not records:
        raise ValueError(f"no readable records in {store}")
    out.mkdir(parents=True, exist_ok=True)
    tables = make_tables(frame, evidence, alpha=alpha)
    sections = [_section(f"{kind}-table", f"{kind.capitalize()} table", to_html(t)) for kind, t in tables.items()]
    sections += [figures_section([r for r in records if r.run_id in set(frame["run_id"])], frame, out),
                 grids_section(records, store), records_section(records, store, out)]
    anchors = [*((f"{k}-table", k) for k in tables), ("figures", "figures"), ("grids", "samples"),
               ("records", "records")]
    finished = sum(r.finished for r in records)
    meta = (f"Store <code>{html.escape(str(store))}</code>: {len(records)} records, {finished} finished. "
            f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by <code>python -m harness.report</code>.")
    page = PAGE.substitute(title=html.escape(title), meta=meta, sections="\n".join(sections),
                           nav="".join(f'<a href="#{a}">{html.escape(n)}</a>' for a, n in anchors))
    path = out / PAGE_FILE
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("results/store"), help="results store folder")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="folder of index.html and figures/")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level of bold / tie marks")
    p.add_argument("--title", default="PTQ benchmark report")
    args = p.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            page = build_report(args.store, args.out, args.alpha, args.title)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {page} (open it in a browser: file://{page.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
