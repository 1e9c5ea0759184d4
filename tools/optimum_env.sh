#!/usr/bin/env bash
# An environment for the benchmark's Optimum ONNX Runtime engine: optimum-onnx pins transformers<4.58,
# while el-export pins transformers 5.23, so Optimum lives in its own virtual environment (.venv-optimum,
# git-ignored). `el-export bench` finds it there (or at $EL_EXPORT_OPTIMUM_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v /usr/bin/python3.11 || command -v python3.11)}
"$PYTHON" -m venv .venv-optimum
.venv-optimum/bin/pip install --quiet --disable-pip-version-check \
    torch==2.13.0 "transformers==4.57.6" "optimum-onnx[onnxruntime]==0.1.0" numpy==1.26.4 rich==15.0.0
echo "Optimum environment ready: .venv-optimum/bin/python"
