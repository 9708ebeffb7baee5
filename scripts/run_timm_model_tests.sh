#!/usr/bin/env bash
# Run timm's own tests/test_models.py over every model of the CBT family, as a timm contributor adding the
# family would: the family's names join NON_STD_FILTERS (ViT-like: token outputs), its timm module ('cbt') joins
# FEAT_INTER_FILTERS (forward_intermediates + features_only), and EXCLUDE_JIT_FILTERS (no TorchScript: CBSA's
# products are custom autograd Functions). Nothing else in timm's file is changed.
#
# usage: scripts/run_timm_model_tests.sh TIMM_SOURCE_DIR [extra pytest arguments]
#   TIMM_SOURCE_DIR: a checkout of https://github.com/huggingface/pytorch-image-models (its tests/test_models.py
#   is used), or a bare clone of it (HEAD:tests/test_models.py). Use the timm version the project pins
#   (pyproject.toml) or a newer one.
#   PYTHON: the interpreter (default: the project's .venv/bin/python).
#
# The file is copied into a temporary folder with a conftest.py that imports cbsa_core before collection (this
# registers the family with timm) and deselects every test whose model is not one of the family's. A table of
# passed / skipped / failed tests per test function is printed at the end. Not part of `make test`: it needs
# a timm checkout and takes minutes on a CPU.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
SRC=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "error: no Python at $PY; run 'make venv' or set PYTHON=/path/to/python" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/timm_model_tests.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ -f "$SRC/tests/test_models.py" ]; then
    cp "$SRC/tests/test_models.py" "$WORK/test_models.py"
elif [ "$(git -C "$SRC" rev-parse --is-bare-repository 2>/dev/null || true)" = "true" ]; then
    if ! git -C "$SRC" show HEAD:tests/test_models.py > "$WORK/test_models.py" 2>/dev/null; then
        echo "error: the bare repository $SRC has no tests/test_models.py at HEAD" >&2
        exit 2
    fi
else
    echo "error: $SRC is neither a timm source tree (no tests/test_models.py) nor a bare timm repository" >&2
    exit 2
fi

# Add the family to the three filter lists (and nothing else); refuse a file whose lists are not found.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$WORK/test_models.py" <<'PYEOF'
import re
import sys

import timm

import cbsa_core  # noqa: F401  (registers the family with timm)

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
names = timm.list_models(module="cbt")
patterns = ", ".join(repr(f"{name}*") for name in names)
additions = {
    "NON_STD_FILTERS": patterns,        # token outputs like timm's ViTs: no 4-D features, no FeatureListNet
    "FEAT_INTER_FILTERS": "'cbt'",      # the family's timm module: forward_intermediates / FeatureGetterNet
    "EXCLUDE_JIT_FILTERS": patterns,    # not TorchScript-able (custom autograd Functions in CBSA)
}
for name, extra in additions.items():
    text, count = re.subn(rf"^{name} = \[", f"{name} = [\n    {extra},", text, flags=re.MULTILINE)
    if count != 1:
        sys.exit(f"error: {path}: expected one '{name} = [' list, found {count}; this timm version's test file "
                 f"is not supported")
open(path, "w", encoding="utf-8").write(text)
print(f"test_models.py: added {len(names)} CBT-family models to NON_STD_FILTERS and EXCLUDE_JIT_FILTERS, "
      f"module 'cbt' to FEAT_INTER_FILTERS")
PYEOF

cat > "$WORK/conftest.py" <<'PYEOF'
"""Import cbsa_core before timm's test_models.py is collected; run only the CBT family's tests."""
import collections

import timm

import cbsa_core  # noqa: F401  (registers the family with timm)

FAMILY = set(timm.list_models(module="cbt"))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = str(params.get("model_name", "")).split(".")[0]
        (keep if name in FAMILY else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_terminal_summary(terminalreporter):
    table = collections.defaultdict(collections.Counter)
    for outcome in ("passed", "skipped", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "::" in nodeid:
                table[nodeid.split("::")[1].split("[")[0]][outcome] += 1
    terminalreporter.write_sep("=", "CBT family: outcome per test function")
    for function in sorted(table):
        counts = table[function]
        terminalreporter.write_line(f"{function:45s} passed {counts['passed']:3d}  skipped {counts['skipped']:3d}  "
                                    f"failed {counts['failed']:3d}  errors {counts['error']:3d}")
PYEOF

cat > "$WORK/pytest.ini" <<'PYEOF'
[pytest]
markers =
    base: timm marker
    cfg: timm marker
    torchscript: timm marker
    features: timm marker
    fxforward: timm marker
    fxbackward: timm marker
PYEOF

cd "$WORK"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -c "$WORK/pytest.ini" --rootdir "$WORK" \
    -p no:cacheprovider -q test_models.py "$@"
