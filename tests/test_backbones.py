"""The backbone contract with a decoder (tiny random Llama + byte-level BPE) beside the WordPiece encoder:
pad token, `last` pooling, `cls` refused, weight-decay exclusions, the layer list, bundle round trip, and
QA offsets / NER word alignment with byte-level BPE."""

from __future__ import annotations

import pytest
import torch

from mtlm.backbones import backbone_layers, check_pooling, is_decoder, no_decay, pool
from mtlm.config import RecipeError, TaskConfig
from mtlm.model import load_backbone
from mtlm.tasks import build_task
from mtlm.tasks.extractive_qa import encode_windows, span_tokens
from mtlm.tasks.token_classification import IGNORE


def test_decoder_gets_a_pad_token_and_is_told_apart_from_the_encoder(tiny_llama, tiny_backbone):
    llama, tok = load_backbone(tiny_llama)
    bert, _ = load_backbone(tiny_backbone)
    assert is_decoder(llama) and not is_decoder(bert)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "right"
    assert llama.config.pad_token_id == tok.pad_token_id
    assert len(backbone_layers(llama)) == 2 and len(backbone_layers(bert)) == 2


def test_last_pooling_reads_the_last_real_token_whatever_the_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_padded_decoder_row_pools_like_the_row_alone(tiny_llama):
    llama, tok = load_backbone(tiny_llama)
    llama.eval()
    batch = tok(["the movie was great", "bad"], padding=True, return_tensors="pt")
    alone = tok(["bad"], return_tensors="pt")
    with torch.no_grad():
        both = pool(llama(**batch).last_hidden_state, batch["attention_mask"], "last")
        one = pool(llama(**alone).last_hidden_state, alone["attention_mask"], "last")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]      # the row is padded
    assert torch.allclose(both[1], one[0], atol=1e-5)


def test_cls_pooling_on_a_decoder_is_refused_with_a_reason(tiny_llama, tiny_backbone):
    llama, _ = load_backbone(tiny_llama)
    with pytest.raises(RecipeError, match="pooling: cls .* decoder .* use last"):
        check_pooling("cls", llama.config)
    check_pooling("last", llama.config)
    check_pooling("cls", load_backbone(tiny_backbone)[0].config)


@pytest.mark.parametrize("name, exempt", [
    ("layers.0.input_layernorm.weight", True), ("norm.weight", True), ("layers.0.self_attn.q_proj.weight", False),
    ("encoder.layer.0.attention.output.LayerNorm.weight", True), ("h.0.ln_1.weight", True), ("ln_f.weight", True),
    ("h.0.attn.c_attn.bias", True), ("embed_tokens.weight", False), ("h.0.mlp.c_fc.weight", False),
])
def test_weight_decay_exclusions_cover_every_family(name, exempt):
    assert no_decay(name) is exempt


def test_qa_answers_from_byte_level_offsets_have_no_leading_space(tiny_llama):
    _, tok = load_backbone(tiny_llama)
    context = "john smith went to paris and london"
    windows, _ = encode_windows(tok, ["where did john go"], [context], max_length=64, doc_stride=16)
    offsets = windows[0]["offsets"]
    char = context.index("paris")
    first, last = span_tokens(offsets, char, char + len("paris"))
    assert (first, last) != (0, 0)
    assert context[offsets[first, 0]:offsets[last, 1]] == "paris"
    ctx = offsets[offsets[:, 0] >= 0]
    assert all(not context[s].isspace() for s, e in ctx if e - s > 1)    # a lone-space token stays one


def test_ner_gets_one_tag_per_word_with_byte_level_bpe(tiny_llama):
    _, tok = load_backbone(tiny_llama)
    task = build_task("ner", TaskConfig(type="token_classification", data={"train": "x"}))
    rows = [{"tokens": ["john", "smith", "went", "to", "paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]}]
    task.fit(rows)
    feature = task.encode(rows, tok, 32)[0]
    labelled = [int(x) for x in feature["token_labels"] if x != IGNORE]
    assert labelled == feature["label"] and len(labelled) == 5
    assert all(p >= 0 for p in feature["positions"])
    enc = task.encode_inputs([{"text": "john smith went to paris"}], tok, 32)[0]
    assert sorted({w for w in enc.meta["word_ids"] if w is not None}) == [0, 1, 2, 3, 4]


def test_decoder_trains_heads_and_round_trips_through_the_bundle(tiny_llama, toy_data, tmp_path):
    import json

    import yaml

    import mtlm
    from mtlm.checkpoint import load_bundle

    recipe = {"name": "llama", "backbone": tiny_llama, "pooling": "last", "max_length": 32,
              "output_dir": str(tmp_path / "run"),
              "tasks": {"sentiment": {"type": "classification", "data": {"train": str(toy_data / "sentiment.csv")}},
                        "ner": {"type": "token_classification", "data": {"train": str(toy_data / "ner.jsonl")}}},
              "train": {"batch_size": 8, "max_steps": 30, "eval_every": 30, "lr": 3e-3, "warmup_ratio": 0.0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = mtlm.fit(mtlm.load_recipe(tmp_path / "r.yaml"), progress=False)
    model, tok, tasks, meta = load_bundle(run)
    assert is_decoder(model.backbone) and tok.pad_token == "<|endoftext|>" and meta["pooling"] == "last"
    predictor = mtlm.load(run)
    out = predictor.predict(["the movie was great fun", "john smith went to paris"])
    assert out[0]["sentiment"]["label"] in ("positive", "negative")
    assert isinstance(out[1]["ner"]["entities"], list)
    best = json.loads((run / "metrics.json").read_text())["task_best"]
    assert best["sentiment"]["value"] > 0.7 and best["ner"]["value"] > 0.7   # toy sets a trained head learns

