#!/usr/bin/env bash
# End to end on the example CT (default mode, OpenVINO) with PyTorch's CPU build, in a virtual environment of
# its own: the README's figure for machines without a GPU. PyTorch's default Linux wheel (the one pinned for
# the tests) loads its CUDA libraries at `import torch` even on a CPU, which costs every process 0.35 GB.
#
#   bash benchmarks/e2e_cpu_build.sh                     # torch from PyTorch's CPU index
#   TORCH_INDEX= TORCH_REQUIREMENT="torch==2.13.0+cpu" bash benchmarks/e2e_cpu_build.sh   # a local wheel store
#
# Environment: VENV (default .venv-cpu), TORCH_REQUIREMENT (default "torch"), TORCH_INDEX (default PyTorch's
# CPU index; empty: pip's own configuration). Further arguments go to benchmark_runtimes.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv-cpu}"
requirement="${TORCH_REQUIREMENT:-torch}"
index="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ -n "$index" ]; then
    "$venv/bin/pip" install -q --index-url "$index" "$requirement"
else
    "$venv/bin/pip" install -q "$requirement"
fi
# The library's own pins without torch/torchvision (constraints-ci.txt pins the default wheel), and the
# extras the benchmark needs: OpenVINO, and pynrrd for the .seg.nrrd it writes.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
grep -v -E '^(torch|torchvision)==' constraints-ci.txt > "$constraints"
"$venv/bin/pip" install -q -c "$constraints" -e ".[openvino,slicer]"
"$venv/bin/python" -c "import torch; print('PyTorch', torch.__version__, '- CUDA build' if torch.version.cuda else '- CPU build')"
exec "$venv/bin/python" benchmarks/benchmark_runtimes.py --skip-window --phantoms 0 "$@"
