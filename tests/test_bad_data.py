"""Bad data is never silent: malformed records are skipped, counted and named
the same way however a file is reached, and refused above
data.max_bad_fraction; long one-line documents train a tokenizer; a
one-document corpus trains and says what it held out."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nitp_jax import flag_names
from nitp_jax import train
from nitp_jax.data import bad_records
from nitp_jax.data import corpus as corpus_lib
from nitp_jax.data import heldout
from nitp_jax.data import pipeline
from nitp_jax.data import prepare
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import DataError
from tests.conftest import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe", "de", "an", "or"]


def _words(n: int, seed: int) -> str:
  rng = random.Random(seed)
  return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
                  for _ in range(n))


def _jsonl_with_bad_lines(path, good: int) -> list[str]:
  """`good` documents and four malformed lines (lines 2-5); the documents."""
  docs = [f"document {i}: {_words(30, i)}" for i in range(good)]
  lines = [json.dumps({"text": d}).encode() for d in docs]
  lines[1:1] = [b"{not json", b'{"body": "no text field"}', b'{"text": 7}',
                b'{"text": "caf\xe9"}']  # a Latin-1 byte: not UTF-8
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"\n".join(lines) + b"\n")
  return docs


def test_one_policy_whether_named_directly_in_a_directory_or_by_a_glob(tmp_path):
  docs = _jsonl_with_bad_lines(tmp_path / "d" / "x.jsonl", good=16)  # 4 of 20 bad
  specs = [str(tmp_path / "d" / "x.jsonl"), str(tmp_path / "d"), str(tmp_path / "*" / "*.jsonl")]
  for spec in specs:
    with flag_names.spelled(prepare.FLAG_NAMES, has_config=False):
      with pytest.raises(DataError) as e:
        list(corpus_lib.open_corpus(spec))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("4 of 20 records are malformed (20%), above the limit "
                              "--max_bad_fraction=0.01; first: "), (spec, message)
    assert "x.jsonl:2: line 2 is not valid JSON" in message
    assert message.endswith("(and 1 more). Fix or remove those records, or accept them "
                            "with --max_bad_fraction=0.2"), message
    corpus = corpus_lib.open_corpus(spec, max_bad_fraction=0.2)
    assert list(corpus) == docs, spec
    assert [(os.path.basename(p), r.split(" (")[0]) for p, r in corpus.skipped] == [
        ("x.jsonl:2", "line 2 is not valid JSON"),
        ("x.jsonl:3", "line 3 has no string field 'text'; set --config.data.text_field to "
                      "the field holding the text"),
        ("x.jsonl:4", "line 4 has no string field 'text'; set --config.data.text_field to "
                      "the field holding the text"),
        ("x.jsonl:5", "line 5 is not valid UTF-8")], spec
    assert (corpus.bad.count, corpus.bad.total) == (4, 20)


def test_bad_records_counter():
  bad = bad_records.BadRecords(max_fraction=0.25)
  bad.record_ok(3)
  bad.skip("a.jsonl:4", "line 4 is not valid JSON")
  bad.check()  # 1 of 4 is at the limit, not above it
  assert bad.summary() == ("1 of 4 records are malformed (25%) (limit 0.25), skipped; "
                           "first: a.jsonl:4: line 4 is not valid JSON")
  bad.skip("a.jsonl:5", "line 5 is not valid JSON")
  with pytest.raises(DataError, match=r"2 of 5 records are malformed \(40%\).*"
                                      r"--config\.data\.max_bad_fraction=0\.4$"):
    bad.check()
  assert bad_records.BadRecords(0.0).summary() == "no malformed records in 0 records"


def test_prepare_logs_records_and_rechecks_bad_records(tmp_path, caplog):
  _jsonl_with_bad_lines(tmp_path / "d" / "x.jsonl", good=96)  # 4 of 100 bad
  (tmp_path / "d" / "blob.txt").write_bytes(b"\0\1binary")    # and one bad file
  out = str(tmp_path / "p")
  manifest = prepare.prepare(str(tmp_path / "d"), out, 300, workers=1, max_bad_fraction=0.05)
  assert (manifest["skipped_count"], manifest["records"]) == (5, 101)
  assert [os.path.basename(s["path"]) for s in manifest["skipped"]] == [
      "blob.txt", "x.jsonl:2", "x.jsonl:3", "x.jsonl:4", "x.jsonl:5"]  # files in order
  warned = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
  assert len(warned) == 1 and "5 of 101 records are malformed (5%)" in warned[0]
  assert "x.jsonl:2: line 2 is not valid JSON" in warned[0]
  lines = prepare.report_lines(out)
  assert lines[1].startswith(f"5 malformed record(s) skipped while preparing {out}")
  # The limit only accepts or refuses: not an input, but a stricter one refuses.
  assert prepare.prepare(str(tmp_path / "d"), out, 300, workers=1,
                         max_bad_fraction=0.5) == manifest
  with flag_names.spelled(prepare.FLAG_NAMES, has_config=False):
    with pytest.raises(DataError, match=r"5 of 101 records .*--max_bad_fraction=0\.05$"):
      prepare.prepare(str(tmp_path / "d"), out, 300, workers=1, max_bad_fraction=0.01)


def test_prepare_cli_refuses_too_many_bad_records_in_one_line(tmp_path):
  _jsonl_with_bad_lines(tmp_path / "d" / "x.jsonl", good=16)
  proc = subprocess.run(
      [sys.executable, "-m", "nitp_jax.data.prepare", f"--input={tmp_path / 'd'}",
       f"--output={tmp_path / 'p'}", "--vocab_size=300"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 2, proc.stderr
  error = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and "Traceback" not in proc.stderr
  assert error[0].startswith("error: 4 of 20 records are malformed (20%)")
  assert error[0].endswith("or accept them with --max_bad_fraction=0.2")
  assert not os.path.exists(tmp_path / "p" / "manifest.json")


def test_long_lines_are_split_for_tokenizer_training(tmp_path):
  line = "😀 ab" * 5000 + "x" * 20000  # 4-byte characters, and no space at the end
  pieces = list(tok_lib._pieces(line))  # pylint: disable=protected-access
  assert "".join(pieces) == line and len(pieces) > 1
  assert max(len(p.encode()) for p in pieces) <= tok_lib.MAX_LINE_BYTES
  assert list(tok_lib._pieces("short")) == ["short"]  # pylint: disable=protected-access
  for i in range(3):  # one-line documents of ~26 KB, longer than SentencePiece takes
    (tmp_path / "c" / f"{i}.txt").parent.mkdir(exist_ok=True)
    (tmp_path / "c" / f"{i}.txt").write_text(_words(5000, i)[:26_000])
  manifest = prepare.prepare(str(tmp_path / "c"), str(tmp_path / "p"), 300, workers=1)
  tokenizer = tok_lib.load_tokenizer(str(tmp_path / "p" / "tokenizer.model"))
  text = (tmp_path / "c" / "0.txt").read_text()
  assert tokenizer.decode(tokenizer.encode(text)) == text
  assert len(tokenizer.encode(text)) < len(text) / 2  # it learned the words' pieces
  assert sum(manifest["documents"].values()) == 3


def test_held_out_split_of_tiny_corpora(tmp_path):
  assert heldout.plan(1, 0.02, 0).mode == heldout.TAILS
  assert heldout.plan(2, 0.5, 0).mode == heldout.DOCUMENTS
  assert heldout.plan(1, 0.0, 0).mode == heldout.NONE
  tails = heldout.plan(1, 0.1, 0)
  ids = list(range(100))
  assert [(s, len(p)) for s, p in tails.split(0, np.array(ids))] == [
      ("train", 90), ("validation", 10)]
  assert [s for s, _ in tails.split(0, np.array([5, 6, 3]))] == ["train"]
  (tmp_path / "one.txt").write_text(_words(400, 0))
  out = str(tmp_path / "p")
  prepare.prepare(str(tmp_path / "one.txt"), out, 300, workers=1, val_fraction=0.0)
  assert pipeline.make_eval_batches(out, 32, 4, 2) == []
  assert prepare.report_lines(out) == [
      "held out: nothing (--config.data.val_fraction=0), so there is no evaluation"]


def test_a_one_document_corpus_trains_and_says_what_it_held_out(tmp_path, capsys, caplog):
  (tmp_path / "one.txt").write_text("\n".join(_words(80, i) for i in range(40)))
  cfg = train_config(str(tmp_path / "data"), steps=2, eval_every=2, checkpoint_every=2,
                     geometry_every=0, log_every=1)
  cfg.data.input, cfg.data.val_fraction, cfg.model.vocab_size = str(tmp_path / "one.txt"), 0.1, 300
  cfg.train.eval_tasks = "next_line"  # as configs/tiny.py: one held-out tail is too few for it
  result = train.run(cfg, str(tmp_path / "w"))
  out = capsys.readouterr().out
  manifest = prepare.load_manifest(str(tmp_path / "data"))
  assert manifest["documents"] == {"train": 1, "validation": 1}
  val, total = manifest["tokens"]["validation"], sum(manifest["tokens"].values())
  assert abs(val - 0.1 * total) <= 1
  assert (f"held out: the last 10% of the tokens of each document ({val} tokens from 1 of "
          "1 document(s)), since the corpus has too few documents to hold out whole ones"
          ) in out
  assert result["step"] == 2 and result["eval"]["tokens"] > 0
  assert "next_line/acc" not in result["eval"]
  assert any(r.getMessage().startswith("eval task next_line left out: the held-out documents "
                                       "are too few") for r in caplog.records)
