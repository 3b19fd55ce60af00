"""The HTML shell of `python -m harness.report`: one self-contained page (inline style and script, images
as data URIs), so it opens from file:// with no server and no network.

The script checks, once the page has loaded, that every <img> decoded (complete, naturalWidth > 0) and
records the result on <body> (`data-images`, `data-broken`) together with any script error
(`data-errors`): headless Chromium's `--dump-dom` shows them, which is how tests/test_report.py
asserts that the page renders.
"""

from __future__ import annotations

from string import Template

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<link rel="icon" href="data:,">
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1rem 2rem; color: #222; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.2rem; }
.meta { color: #555; font-size: 0.9rem; }
nav a { margin-right: 1rem; }
table.results { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
table.results caption { caption-side: bottom; text-align: left; font-size: 0.8rem; color: #444; max-width: 1100px;
                        padding-top: 0.4rem; }
table.results caption strong { display: block; font-size: 0.9rem; color: #222; }
table.results caption p { margin: 0.2rem 0; }
table.results th, table.results td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e5e5e5; white-space: nowrap; }
table.results thead th { border-bottom: 2px solid #333; text-align: left; }
table.results thead th.num { text-align: right; }
table.results td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #444; }
.grids { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.grids figure { margin: 0; max-width: 320px; }
.grids img { width: 300px; image-rendering: pixelated; }
.missing { width: 300px; height: 300px; display: flex; align-items: center; justify-content: center; text-align: center;
           background: repeating-linear-gradient(45deg, #f6f6f6, #f6f6f6 10px, #eee 10px, #eee 20px);
           color: #666; font-size: 0.8rem; padding: 1rem; box-sizing: border-box; border: 1px dashed #bbb; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5rem 1rem; font-size: 0.9rem; }
code { font-size: 0.85rem; }
.missing code { word-break: break-all; }
</style>
</head>
<body data-images="pending">
<h1>$title</h1>
<p class="meta">$meta</p>
<nav>$nav</nav>
$sections
<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e)); });
  function check() {
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
    document.body.dataset.images = broken.length ? "broken" : "ok";
    document.body.dataset.imageCount = String(imgs.length);
    document.body.dataset.broken = broken.map(function (i) { return i.alt; }).join(" | ");
    document.body.dataset.errors = errors.join(" | ");
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
</script>
</body>
</html>
""")
