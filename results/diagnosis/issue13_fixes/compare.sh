#!/bin/bash
# Each issue-13 fidelity fix against the run it changes, paired over the shared eval samples
# (python -m harness.compare). Run from the repository root; writes compare.md next to this script.
set -euo pipefail
D=results/diagnosis/issue13_fixes
S="--store results/store --store $D/store"
# The range-search pair (reservoir_wt_res0/1) ran the same config on two commits, so both records have
# the same run id and compare cannot tell them apart; the README quotes both records.
id() {  # the run id in the fixes store whose config has these dotted settings (key=value ...)
  python - "$@" <<'PY'
import json, sys
from pathlib import Path
from harness.compare import flatten
want = dict(a.split("=", 1) for a in sys.argv[1:])
hits = [r["run_id"] for p in Path("results/diagnosis/issue13_fixes/store").glob("*.json")
        for r in [json.loads(p.read_text())] for cfg in [dict(flatten(r["config"]))] if r["status"] == "finished"
        and all(str(cfg.get(k)).lower() == v.lower() for k, v in want.items())]
if len(hits) != 1:
    sys.exit(f"{want}: {len(hits)} finished runs match")
print(hits[0][:8])
PY
}
TFMQ=a4487360; QDIFF=80f1629f; PTQ4DM=7134dfbc  # main store, ddpm_mnist W4A8 seed 0
BRECQ=$(id method.name=tfmq method.variant=brecq)
section() {  # title, base id, then the settings that pick the run(s) in the fixes store (one run per "...")
  local title=$1 base=$2; shift 2
  local runs=(); for want in "$@"; do runs+=("$(id $want)"); done
  echo "## $title"
  python -m harness.compare "$base" "${runs[@]}" $S
}
{
  echo "# Issue 13 fixes on ddpm_mnist W4A8, seed 0: each run against the one it changes"
  echo
  section "TFMQ-DM: also keep the first time-embedding linear FP (the reference code does)" \
    $TFMQ "method.name=tfmq method.fp_time_embedding=true"
  section "TFMQ-DM: add Q-Diffusion's activation step-size reconstruction" $TFMQ "method.name=tfmq method.act_recon=true"
  section "Q-Diffusion: asymmetric activations (this harness before issue 13)" \
    $QDIFF "method.name=qdiff method.act_symmetric=false"
  section "Q-Diffusion: step-size pass as before issue 13 (lr 4e-5, quantized block inputs)" \
    $QDIFF "method.name=qdiff method.act_lr=4e-05"
  section "Q-Diffusion: split weight grids for the shortcut concatenation (reference code)" \
    $QDIFF "method.name=qdiff method.split_weights=true"
  section "Q-Diffusion: conv_in / conv_out quantized too (reference code: keep_fp=[])" \
    $QDIFF "method.name=qdiff method.keep_fp=[]"
  section "PTQ4DM: the released script (no reconstruction) against NDTC + QDrop-BRECQ" \
    $PTQ4DM "method.name=ptq4dm method.variant=released"
  section "TFMQ ablation: FSC alone (scope tib) and the old row (scope all) against the BRECQ baseline" \
    $BRECQ "method.variant=fsc method.fsc_scope=tib" "method.variant=fsc method.fsc_scope=all"
} > $D/compare.md
echo "wrote $D/compare.md"
