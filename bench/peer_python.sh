# Sourced by the benchmarks that run a PyTorch peer: sets PY to a Python with effdet and
# safetensors, either the one named by EFFDET_BENCH_PYTHON or a private .venv created on first
# use from tools/requirements.txt.
PY="${EFFDET_BENCH_PYTHON:-.venv/bin/python}"
if ! [ -x "$PY" ] || ! "$PY" -c "import effdet, safetensors" 2>/dev/null; then
  PY=.venv/bin/python
  echo "== creating .venv with effdet (PyTorch peer)"
  python3 -m venv .venv
  .venv/bin/pip install -q -r tools/requirements.txt
fi
