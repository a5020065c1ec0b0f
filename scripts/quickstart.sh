#!/usr/bin/env bash
# The main job on a fresh machine: create .venv, install the project into it, and run the whole
# pipeline on the built-in shapes (tokenizer, CLIP, encode, generator, samples, variations,
# evaluation, report) into runs/quickstart. Arguments go to scripts/pipeline.py, for example
#   ./scripts/quickstart.sh experiment=pictures images=/path/to/images  (your own pictures)
# Run it again to reuse what is done: finished stages are skipped, training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/python scripts/pipeline.py "$@"
