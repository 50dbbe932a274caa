#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST, a .venv, `pip install -e .[dev,pi]` and CrypTen 0.4.1.
# A second run only checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/dataset-fashion-mnist
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.snl_fx-installed
# crypten==0.4.1 goes in with --no-deps (it asks for the dead `sklearn` package and tensorboard); its
# runtime needs are the extra `pi`
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! compgen -G ".venv/lib/python3*/site-packages/crypten-0.4.1.dist-info" >/dev/null; then
    echo "[setup] pip install -e .[dev,pi] and crypten==0.4.1 (torch from local disk; ~2 min the first time)"
    log=.venv/pip-install.log
    if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[dev,pi]" \
            && .venv/bin/python -m pip install -q --no-deps crypten==0.4.1; } >"$log" 2>&1; then
        tail -n 30 "$log"; echo "[setup] pip install failed; full log in $log" >&2; exit 1
    fi
    touch "$stamp"
fi

# The extra `hf` (timm, transformers: models built from configs, nothing downloaded) for
# tests/test_hf_models.py. Optional: without it those tests skip and the rest works.
hf_stamp=.venv/.snl_fx-hf-installed
if [ ! -f "$hf_stamp" ] || [ pyproject.toml -nt "$hf_stamp" ]; then
    echo "[setup] pip install -e .[hf]: timm and transformers (~20 s the first time)"
    hf_log=.venv/hf-pip-install.log
    if .venv/bin/python -m pip install -q -e ".[hf]" >"$hf_log" 2>&1 \
            && .venv/bin/python -c "import timm, transformers" >>"$hf_log" 2>&1; then
        touch "$hf_stamp"
    else
        echo "[setup] the extra hf (timm, transformers) could not be installed (log: $hf_log): tests/test_hf_models.py skips, the rest works"
    fi
fi

# SecretFlow SPU (pi-bench --backend spu-cheetah|spu-semi2k) needs Python 3.10/3.11, jax 0.4.34 and numpy<2:
# its own venv, which snl_fx calls as a subprocess. Optional: without it the rest of the tool works.
spu_stamp=.venv-spu/.spu-installed
if [ -z "${SNL_FX_SPU_PYTHON:-}" ] && [ ! -f "$spu_stamp" ]; then
    SPU_PY=""
    for candidate in python3.11 python3.10; do
        if command -v "$candidate" >/dev/null 2>&1; then SPU_PY=$candidate; break; fi
    done
    if [ -z "$SPU_PY" ]; then
        echo "[setup] no python3.11 or python3.10 here: the SPU backend of pi-bench is not installed (the rest works)"
    else
        echo "[setup] creating .venv-spu with $SPU_PY: spu==0.9.5 and onnx (~1 min the first time)"
        rm -rf .venv-spu
        spu_log=.venv/spu-pip-install.log
        if "$SPU_PY" -m venv .venv-spu >"$spu_log" 2>&1 \
                && .venv-spu/bin/python -m pip install -q spu==0.9.5 onnx >>"$spu_log" 2>&1 \
                && .venv-spu/bin/python -c "import spu, onnx" >>"$spu_log" 2>&1; then
            touch "$spu_stamp"
        else
            rm -rf .venv-spu
            echo "[setup] SPU could not be installed (log: $spu_log): the SPU backend of pi-bench is off, the rest works"
        fi
    fi
fi
