#!/usr/bin/env bash
# The wheels the GPU machine lacks, into .whl/ (and .bnb/, .trl112/): ../shared/gpu/fetch_wheels.sh, plus what it
# misses for this stack -- transformers 5.25 needs huggingface_hub 2.x (and its httpx2 / hf-xet / click), pytest runs
# the CUDA-only tests -- and TRL 1.12 for the side-by-side benchmark. Run from the project root on the CPU machine.
set -eu
bash ../shared/gpu/fetch_wheels.sh
PY=${PY:-.venv/bin/python}
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for pkg in huggingface_hub httpx2 httpcore2 truststore click hf-xet pytest pluggy iniconfig pygments; do
  v=$($PY -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null || true)
  $PY -m pip download -q $P -d .whl "$pkg${v:+==$v}" 2>&1 | grep -v WARNING || true
done
[ -d .trl112/trl ] || $PY -m pip install -q --no-deps --target .trl112 trl==1.12.0
grep -qx '/.trl112/' .git/info/exclude || echo '/.trl112/' >> .git/info/exclude
du -sh .whl .trl112
