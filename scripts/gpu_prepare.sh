#!/usr/bin/env bash
# Prepare this checkout for scripts/gpu_check.sh on an offline GPU machine whose Python 3.12 has
# torch, torchvision, numpy, pandas, seaborn, matplotlib, pyyaml, rich and jinja2 (and what they
# need) but not the rest. Run it from the repository root, on a machine that reaches PyPI. Writes:
#   .whl/   the wheels that machine lacks (about 25 MB): MLflow's client and SQLite store, Optuna,
#           pydantic with the pydantic-core it pins, typer (the CLI), pytest (the CUDA tests)
#   data/   Fashion-MNIST's four idx files (30 MB), copied from $ABLATE_DATA or the system copy
#           (Debian's dataset-fashion-mnist); skipped with a note when neither has them
# Both are ignored by git. Carry both to the GPU machine (together under 64 MiB) and run
#   bash scripts/gpu_check.sh
# which installs the wheels into /tmp/site when the imports it needs are missing.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 \
  -d .whl \
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 optuna==5.0.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  sqlalchemy alembic mako sqlparse annotated-types typing-inspection colorlog cachetools \
  databricks-sdk google-auth pyasn1 pyasn1-modules fastapi starlette uvicorn gitpython gitdb smmap \
  importlib-metadata lazy-importer opentelemetry-api opentelemetry-proto opentelemetry-sdk \
  opentelemetry-semantic-conventions python-dotenv annotated-doc cryptography cffi pycparser \
  typer shellingham pytest pluggy iniconfig packaging pygments
echo "wheels: $(find .whl -name '*.whl' | wc -l) in .whl ($(du -sh .whl | cut -f1))"

mkdir -p data
found=""
for dir in "${ABLATE_DATA:-}" /usr/share/datasets/fashion-mnist; do
  if [ -n "$dir" ] && ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    found=$dir
    break
  fi
done
if [ -n "$found" ]; then
  for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    cp -p "$found/$name"* data/
  done
  echo "Fashion-MNIST: data/ from $found ($(du -sh data | cut -f1))"
else
  echo "Fashion-MNIST: not found (set ABLATE_DATA or apt-get install dataset-fashion-mnist);" \
    "gpu_check.sh will run its smoke grid on synthetic data"
fi
du -sh --exclude=.git . | sed 's/\t.*/ in the working tree (a device call carries up to 64 MiB)/'
