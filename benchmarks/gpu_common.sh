#!/usr/bin/env bash
# Shared by the one-shot GPU scripts (gpu_check.sh, gpu_overhead.sh); sourced, not run.

# install_wheels: what the GPU image lacks, from .whl/ (git-ignored; gpu_check.sh says how to rebuild it),
# into /tmp/site, then PYTHONPATH=/tmp/site:<repo>. SKIP_WHEELS=1 uses $PY's own packages. Appends the
# `STATUS wheels` line to $SUMMARY.
install_wheels() {
    if [ "${SKIP_WHEELS:-0}" != 1 ]; then
        rm -rf /tmp/site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        rc=$?
        if [ $rc != 0 ]; then # no pip: a wheel is a zip laid out for site-packages
            echo "pip install failed ($rc); unzipping the wheels instead"
            for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site; done
        fi
        echo "STATUS wheels $rc"
        SUMMARY+="STATUS wheels $rc"$'\n'
        # huggingface_hub and fsspec only where the image's version does not satisfy datasets 5.2 / transformers
        need=$("$PY" - <<'EOF'
import glob, importlib.metadata as md
from packaging.version import Version as V
fits = {"huggingface_hub": lambda v: V("1.31") <= v < V("2.0"), "fsspec": lambda v: V("2023.1") <= v <= V("2026.9.0")}
for name, ok in fits.items():
    try:
        have = V(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is None or not ok(have):
        print(*glob.glob(f".whl/optional/{name}-*.whl"))
EOF
)
        if [ -n "$need" ]; then
            echo "installing from .whl/optional: $need"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $need ||
                for w in $need; do "$PY" -m zipfile -e "$w" /tmp/site; done
        fi
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
}
