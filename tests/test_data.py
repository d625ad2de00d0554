"""Tests for dpo.data: HH transcript splitting, file formats, TRL conversational rows, bad and
unusable records, the bundled HH-RLHF test splits, hub datasets (from tests/hub_server.py, a hub on
127.0.0.1, through huggingface_hub) and the offline fallback, splits."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from http_server import unused_port
from hub_server import HubServer, hub, isolate_hub_env  # noqa: F401 (hub is a fixture)

from dpo import data as data_module
from dpo.data import (
    BUNDLED_HH,
    SKIP_REASONS,
    UNUSABLE_REASONS,
    DataError,
    PreferencePair,
    bundled_hh_files,
    load_preferences,
    load_preferences_with_report,
    _BAD_OPENERS,
    _GOOD_OPENERS,
    make_synthetic_pairs,
    split_hh_transcript,
    train_eval_split,
)

P1 = "\n\nHuman: What is 2+2?\n\nAssistant:"
HH_ROW = {"chosen": P1 + " It is 4.", "rejected": P1 + " No idea."}
HH_ROW2 = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A car.",
}
PCR_ROW = {"prompt": P1, "response": " It is 4.", "chosen": " It is 4.", "rejected": " Five."}


def write_jsonl(path: Path, rows, *, gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" if not isinstance(r, str) else r + "\n" for r in rows)
    (gzip.open if gz else open)(path, "wt", encoding="utf-8").write(data)
    return path


# ---------------------------------------------------------------------------- transcripts

def test_split_hh_transcript_multi_turn():
    prompt, chosen, rejected = split_hh_transcript(HH_ROW2["chosen"], HH_ROW2["rejected"])
    assert prompt.endswith("\n\nHuman: Name a fruit.\n\nAssistant:")
    assert prompt.count("\n\nAssistant:") == 2
    assert (chosen, rejected) == (" An apple.", " A car.")
    assert prompt + chosen == HH_ROW2["chosen"] and prompt + rejected == HH_ROW2["rejected"]


def test_split_hh_transcript_errors():
    with pytest.raises(DataError, match="no '\\\\n\\\\nAssistant:' turn") as e:
        split_hh_transcript("\n\nHuman: hi", P1 + " x")
    assert e.value.reason == "no_assistant_turn" and e.value.field == "chosen"
    with pytest.raises(DataError, match="differ before the last Assistant turn") as e:
        split_hh_transcript(P1 + " a\n\nHuman: ok\n\nAssistant: b", P1 + " c\n\nHuman: ok\n\nAssistant: b")
    assert e.value.reason == "prompt_mismatch"


# ---------------------------------------------------------------------------- formats

def test_jsonl_hh_rows(tmp_path):
    pairs = load_preferences(write_jsonl(tmp_path / "d.jsonl", [HH_ROW, HH_ROW2]))
    assert pairs[0] == PreferencePair(P1, " It is 4.", " No idea.", source=f"{tmp_path.name}/d.jsonl:1")
    assert pairs[1].chosen == " An apple." and pairs[1].source.endswith("d.jsonl:2")


def test_jsonl_gz_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl.gz", [HH_ROW, "", "   ", HH_ROW2], gz=True)
    pairs = load_preferences(path)
    assert len(pairs) == 2 and pairs[1].source.endswith("d.jsonl.gz:4")  # lines count blanks


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([HH_ROW, PCR_ROW]))
    pairs = load_preferences(path)
    assert [p.chosen for p in pairs] == [" It is 4.", " It is 4."]
    assert pairs[1].rejected == " Five." and pairs[1].source.endswith("d.json:2")


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(HH_ROW))
    with pytest.raises(DataError, match="d.json: expected a JSON list"):
        load_preferences(path)


def test_prompt_chosen_rejected_rows(tmp_path):
    (pair,) = load_preferences(write_jsonl(tmp_path / "d.jsonl", [PCR_ROW]))
    assert (pair.prompt, pair.chosen, pair.rejected) == (P1, " It is 4.", " Five.")


def test_directory_sorted_and_list_of_inputs(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [HH_ROW2])
    write_jsonl(d / "a.jsonl.gz", [HH_ROW], gz=True)
    (d / "notes.txt").write_text("ignored")
    pairs = load_preferences(d)
    assert [p.source for p in pairs] == ["dir/a.jsonl.gz:1", "dir/b.jsonl:1"]
    other = write_jsonl(tmp_path / "c.jsonl", [PCR_ROW])
    assert len(load_preferences([d, str(other)])) == 3
    assert len(load_preferences([d, other], limit=2)) == 2


def test_directory_with_split_files(tmp_path):
    for sub in ("helpful-base", "harmless-base"):
        (tmp_path / sub).mkdir()
        write_jsonl(tmp_path / sub / "train.jsonl.gz", [HH_ROW], gz=True)
        write_jsonl(tmp_path / sub / "test.jsonl.gz", [HH_ROW2], gz=True)
    train = load_preferences(tmp_path)
    test = load_preferences(tmp_path, split="test")
    assert [p.source for p in train] == ["harmless-base/train.jsonl.gz:1", "helpful-base/train.jsonl.gz:1"]
    assert all(p.chosen == " An apple." for p in test) and len(test) == 2
    with pytest.raises(DataError, match=r"no 'validation' split here; .*\['test', 'train'\]"):
        load_preferences(tmp_path, split="validation")


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="no .jsonl, .jsonl.gz, .json, .parquet files"):
        load_preferences(tmp_path)
    with pytest.raises(DataError, match="no such file or directory"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file or directory"):
        load_preferences("./not/here.jsonl")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("chosen,rejected\n")
    with pytest.raises(DataError, match="d.csv: unsupported file type"):
        load_preferences(path)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="d.parquet: reading parquet needs pyarrow: pip install pyarrow"):
        load_preferences(path)


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([HH_ROW, HH_ROW2]), path)
    pairs = load_preferences(path)
    assert [p.chosen for p in pairs] == [" It is 4.", " An apple."]
    assert pairs[1].source.endswith("d.parquet:2")


# ---------------------------------------------------------------------------- bad records

def load_error(tmp_path, lines, name="bad.jsonl", **kwargs) -> DataError:
    path = tmp_path / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        write_jsonl(path, lines)
    with pytest.raises(DataError) as e:
        load_preferences(path, **kwargs)
    return e.value


def test_malformed_json_names_file_and_line(tmp_path):
    err = load_error(tmp_path, [HH_ROW, '{"chosen": "x", "rejected": '])
    assert "bad.jsonl: line 2: malformed JSON" in str(err) and err.reason == "bad_json"
    assert err.line == 2 and str(tmp_path) in str(err)


def test_malformed_json_list(tmp_path):
    err = load_error(tmp_path, b'[\n{"chosen": "a",\n "rejected": }\n]', name="bad.json")
    assert "bad.json: line 3: malformed JSON" in str(err)


def test_invalid_utf8(tmp_path):
    ok = json.dumps(HH_ROW).encode()
    err = load_error(tmp_path, ok + b"\n" + ok[:20] + b"\xff\xfe" + ok[20:] + b"\n")
    assert "bad.jsonl: line 2: invalid UTF-8 at byte 20" in str(err) and err.reason == "bad_utf8"


@pytest.mark.parametrize("row, field, reason, message", [
    ({"chosen": P1 + " a"}, "rejected", "bad_shape", "missing field(s) 'rejected'"),
    ({"text": "hi"}, "chosen", "bad_shape", "missing field(s) 'chosen', 'rejected'"),
    ({"prompt": P1, "chosen": " a"}, "rejected", "bad_shape", "missing field(s) 'rejected'"),
    (["a", "b"], None, "bad_shape", "expected a JSON object, got list"),
    ({"chosen": [{"role": "user"}], "rejected": "x"}, "chosen", "bad_messages",
     "message 0: expected an object with 'role' and 'content', got keys ['role']"),
    ({"prompt": 3, "chosen": " a", "rejected": " b"}, "prompt", "not_string",
     "expected a string (or a list of chat messages), got int"),
    ({"chosen": "", "rejected": P1 + " b"}, "chosen", "empty", "empty or whitespace only"),
    ({"prompt": P1, "chosen": " a", "rejected": "  "}, "rejected", "empty", "empty or whitespace only"),
    ({"chosen": P1 + " ", "rejected": P1 + " b"}, "chosen", "empty", "final Assistant answer is empty"),
    ({"chosen": P1 + " a", "rejected": P1 + " a"}, "chosen", "identical", "identical"),
    ({"prompt": P1, "chosen": " a", "rejected": " a"}, "chosen", "identical", "identical"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}, "chosen", "no_assistant_turn", "no '"),
    ({"chosen": P1 + " a\n\nHuman: x\n\nAssistant: y", "rejected": P1 + " b\n\nHuman: x\n\nAssistant: z"},
     None, "prompt_mismatch", "differ before the last Assistant turn"),
])
def test_bad_rows_name_file_line_field(tmp_path, row, field, reason, message):
    err = load_error(tmp_path, [HH_ROW, HH_ROW2, row], skip_unusable=False)
    assert (err.reason, err.field, err.line) == (reason, field, 3)
    assert f"bad.jsonl: line 3: " in str(err) and message in str(err)
    if field:
        assert f"field {field!r}" in str(err)
    assert reason in SKIP_REASONS


def test_unusable_rows_are_skipped_by_default(tmp_path):
    """Rows without a usable preference are skipped and reported unless skip_unusable=False;
    malformed rows still raise unless skip_bad_records=True."""
    rows = [HH_ROW, {"chosen": P1 + " a", "rejected": P1 + " a"}, {"chosen": P1 + " ", "rejected": P1 + " b"},
            {"chosen": P1 + " a\n\nHuman: x\n\nAssistant: y", "rejected": P1 + " b\n\nHuman: x\n\nAssistant: z"},
            HH_ROW2]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs, report = load_preferences_with_report(path)
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["1", "5"]
    assert report.skipped == {"identical": 1, "empty": 1, "prompt_mismatch": 1}
    assert set(report.skipped) <= set(UNUSABLE_REASONS) and report.fallback is None
    assert "loaded 2 pairs from 1 file(s), skipped 3" in str(report)
    assert load_preferences(path) == pairs
    with pytest.raises(DataError, match="d.jsonl: line 2: field 'chosen': chosen and rejected are identical"):
        load_preferences(path, skip_unusable=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + ["{not json", {"chosen": P1 + " a"}])
    with pytest.raises(DataError, match="bad.jsonl: line 6: malformed JSON"):
        load_preferences(bad)
    pairs, report = load_preferences_with_report(bad, skip_bad_records=True)
    assert len(pairs) == 2 and report.skipped == {"identical": 1, "empty": 1, "prompt_mismatch": 1,
                                                  "bad_json": 1, "bad_shape": 1}


def test_gigantic_line_is_rejected_in_bounded_memory(tmp_path):
    big = {"chosen": P1 + " " + "x" * 3_000_000, "rejected": P1 + " y"}
    path = write_jsonl(tmp_path / "big.jsonl", [HH_ROW, big, HH_ROW2])
    with pytest.raises(DataError, match=r"big.jsonl: line 2: line is 3,000,\d+ bytes, above the cap "
                                        r"max_line_bytes=1,000,000"):
        load_preferences(path)
    pairs, report = load_preferences_with_report(path, skip_bad_records=True)
    assert len(pairs) == 2 and pairs[1].source.endswith("big.jsonl:3")  # reading resumed after it
    assert report.skipped == {"line_too_long": 1}
    assert len(load_preferences(path, max_line_bytes=4_000_000)) == 3
    # exactly at the cap is fine: the cap counts the line without its newline
    line = json.dumps(HH_ROW).encode()
    cap = tmp_path / "cap.jsonl"
    cap.write_bytes(line + b"\n" + line)  # the last line has no newline
    assert len(load_preferences(cap, max_line_bytes=len(line))) == 2
    with pytest.raises(DataError, match=f"cap.jsonl: line 1: line is {len(line)} bytes"):
        load_preferences(cap, max_line_bytes=len(line) - 1)


def test_skip_bad_records_counts_and_examples(tmp_path):
    rows = [HH_ROW, "{not json", {"chosen": P1 + " a"}, {"chosen": P1 + " a", "rejected": P1 + " a"},
            HH_ROW2, {"chosen": P1 + " a", "rejected": P1 + " "}, "[1, 2"]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match="mixed.jsonl: line 2: malformed JSON"):
        load_preferences(path)
    pairs, report = load_preferences_with_report(path, skip_bad_records=True)
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["1", "5"]
    assert report.loaded == 2 and report.total_skipped == 5
    assert report.skipped == {"bad_json": 2, "bad_shape": 1, "identical": 1, "empty": 1}
    assert report.examples[0].startswith("bad_json: ") and "mixed.jsonl: line 2:" in report.examples[0]
    assert [e.split("line ")[1].split(":")[0] for e in report.examples] == ["2", "3", "4", "6", "7"]
    text = str(report)
    assert "loaded 2 pairs from 1 file(s), skipped 5" in text and "bad_json" in text
    assert load_preferences(path, skip_bad_records=True) == pairs


def test_nothing_loaded_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"chosen": P1 + " a", "rejected": P1 + " a"}])
    with pytest.raises(DataError, match=r"no preference pairs loaded from .*all_bad.jsonl.*identical"):
        load_preferences(path, skip_bad_records=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no preference pairs loaded from .*empty.jsonl"):
        load_preferences(empty)


def test_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(HH_ROW) + "\n").encode() * 50)[:-30])
    with pytest.raises(DataError, match="broken.jsonl.gz: cannot read the file after line"):
        load_preferences(path)


# ---------------------------------------------------------------------------- real HH data

def test_real_hh_test_splits(hh_files):
    # the library call skips and reports the 24 unusable rows by default
    pairs, report = load_preferences_with_report(hh_files)
    # documented in dpo/data.py: 14 prompt mismatches, 8 empty answers, 2 identical rows
    assert report.skipped == {"prompt_mismatch": 14, "empty": 8, "identical": 2}
    assert load_preferences(hh_files) == pairs
    assert load_preferences_with_report(hh_files, skip_bad_records=True)[0] == pairs
    with pytest.raises(DataError, match=r"helpful-base/test.jsonl.gz: line 121: field 'rejected': "
                                        r"the final Assistant answer is empty"):
        load_preferences(hh_files, skip_unusable=False)
    helpful = [p for p in pairs if p.source.startswith("helpful-base/")]
    harmless = [p for p in pairs if p.source.startswith("harmless-base/")]
    assert (len(helpful), len(harmless)) == (2354 - 9 - 4 - 2, 2312 - 5 - 4)
    assert len(pairs) == 4642 and len(pairs) + report.total_skipped == data_module.BUNDLED_HH_ROWS
    # prompt + response reproduces every original transcript exactly
    originals = {}
    for path in hh_files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                originals[f"{path.parent.name}/{path.name}:{n}"] = json.loads(line)
    for p in pairs:
        row = originals[p.source]
        assert p.prompt + p.chosen == row["chosen"] and p.prompt + p.rejected == row["rejected"]
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert p.chosen.startswith(" ") and p.rejected.startswith(" ")
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
        assert p.prompt_messages is None
    # the directory form with split= picks the same files (in sorted order: harmless first)
    hh_dir = os.path.commonpath([str(f) for f in hh_files])
    by_source = lambda ps: sorted(ps, key=lambda p: p.source)
    assert by_source(load_preferences(hh_dir, split="test")) == by_source(pairs)


# ---------------------------------------------------------------------------- bundled HH files

def test_bundled_hh_files_are_the_upstream_files(hh_files):
    """Size and sha256 of each bundled file as recorded from the upstream repositories
    (dpo/bundled/PROVENANCE.md); the licence travels with them."""
    assert bundled_hh_files(verify=True) == hh_files
    assert [f"{p.parent.name}/{p.name}" for p in hh_files] == list(BUNDLED_HH)
    assert [p.stat().st_size for p in hh_files] == [875_191, 742_801]
    licence = data_module.BUNDLED_HH_DIR / "LICENSE"
    assert licence.read_text().startswith("MIT License")
    provenance = (data_module.BUNDLED_DIR / "PROVENANCE.md").read_text()
    for rel, (size, sha256) in BUNDLED_HH.items():
        assert sha256 in provenance and f"{size:,}" in provenance and rel in provenance


def test_bundled_hh_files_detect_a_changed_or_missing_file(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "hh-rlhf"
    shutil.copytree(data_module.BUNDLED_HH_DIR, copy)
    monkeypatch.setattr(data_module, "BUNDLED_HH_DIR", copy)
    assert bundled_hh_files(verify=True)[0].parent.parent == copy
    target = copy / "harmless-base" / "test.jsonl.gz"
    data = bytearray(target.read_bytes())
    data[1000] ^= 1
    target.write_bytes(bytes(data))
    bundled_hh_files()  # not verified: no read
    with pytest.raises(DataError, match=r"harmless-base/test.jsonl.gz: 742,801 bytes with sha256 [0-9a-f]{64}, "
                                        r"expected 742,801 bytes with sha256 ebfaaed2"):
        bundled_hh_files(verify=True)
    target.unlink()
    with pytest.raises(DataError, match="harmless-base/test.jsonl.gz: missing from this installation of dpo"):
        bundled_hh_files()


def test_bundled_hh_files_from_any_working_directory(tmp_path):
    import subprocess
    import sys

    code = ("from dpo.data import bundled_hh_files, load_preferences; "
            "print(len(load_preferences(bundled_hh_files())))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, check=True)
    assert out.stdout.strip() == "4642"


@pytest.mark.slow
def test_wheel_ships_the_bundled_data(tmp_path):
    """`pip install .` gets the data: the wheel built from pyproject.toml holds every bundled file."""
    import subprocess
    import sys
    import zipfile

    import shutil

    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: building in place would write build/ into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for package in ("dpo", "smollm"):
        shutil.copytree(repo / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    if build.returncode:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-500:]}")
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = repo / "dpo" / "bundled"
    expected = {f"dpo/bundled/{p.relative_to(bundled).as_posix()}" for p in bundled.rglob("*") if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)


# ---------------------------------------------------------------------------- TRL conversational rows

def msg(role, content):
    return {"role": role, "content": content}


CONV_EXPLICIT = {"prompt": [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!"),
                            msg("user", "Name a fruit.")],
                 "chosen": [msg("assistant", "An apple.")], "rejected": [msg("assistant", "A car.")]}
CONV_IMPLICIT = {"chosen": [msg("user", "Name a fruit."), msg("assistant", "An apple.")],
                 "rejected": [msg("user", "Name a fruit."), msg("assistant", "A car.")]}


def test_conversational_rows_explicit_prompt(tmp_path):
    (pair,) = load_preferences(write_jsonl(tmp_path / "c.jsonl", [CONV_EXPLICIT]))
    assert pair.prompt_messages == tuple(CONV_EXPLICIT["prompt"])
    assert pair.chosen_messages == (msg("assistant", "An apple."),)
    assert pair.rejected_messages == (msg("assistant", "A car."),)
    # the text fields are HH style, for the NLTK filter and for training without a template
    assert pair.prompt == ("\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!"
                           "\n\nHuman: Name a fruit.\n\nAssistant:")
    assert (pair.chosen, pair.rejected) == (" An apple.", " A car.")
    assert pair.source.endswith("c.jsonl:1")
    hash(pair)  # still usable in sets and as a dict key
    assert pair != PreferencePair(pair.prompt, pair.chosen, pair.rejected, pair.source)


def test_conversational_rows_implicit_prompt(tmp_path):
    long = {"chosen": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Fruit?"),
                       msg("assistant", "An apple."), msg("assistant", "Or a pear.")],
            "rejected": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Fruit?"),
                         msg("assistant", "A car.")]}
    one, two = load_preferences(write_jsonl(tmp_path / "c.jsonl", [CONV_IMPLICIT, long]))
    assert one.prompt_messages == (msg("user", "Name a fruit."),)
    assert (one.prompt, one.chosen, one.rejected) == (
        "\n\nHuman: Name a fruit.\n\nAssistant:", " An apple.", " A car.")
    assert two.prompt_messages == tuple(long["rejected"][:3])
    assert two.chosen_messages == (msg("assistant", "An apple."), msg("assistant", "Or a pear."))
    assert two.chosen == " An apple.\n\nAssistant: Or a pear."  # a second assistant turn, HH style
    assert two.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Fruit?\n\nAssistant:"


def test_conversational_rows_keep_only_role_and_content(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Hi", "name": "bob"}],
           "chosen": [msg("assistant", "Hello!")], "rejected": [msg("assistant", "Go.")]}
    (pair,) = load_preferences(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert pair.prompt_messages == (msg("user", "Hi"),)


@pytest.mark.parametrize("row, field, reason, message", [
    ({**CONV_EXPLICIT, "chosen": " An apple."}, "chosen", "bad_messages",
     "expected a list of chat messages like the other fields, got str"),
    ({**CONV_EXPLICIT, "prompt": []}, "prompt", "bad_messages", "an empty list of messages"),
    ({**CONV_EXPLICIT, "prompt": ["Hi"]}, "prompt", "bad_messages",
     "message 0: expected an object with 'role' and 'content', got str"),
    ({**CONV_EXPLICIT, "prompt": [msg("human", "Hi")]}, "prompt", "bad_messages",
     "message 0: role 'human' is not one of system, user, assistant"),
    ({**CONV_EXPLICIT, "prompt": [msg("user", None)]}, "prompt", "bad_messages",
     "message 0: content must be a string, got NoneType"),
    ({**CONV_EXPLICIT, "prompt": [msg("user", [{"type": "text", "text": "Hi"}])]}, "prompt", "bad_messages",
     "multimodal content parts are not supported"),
    ({**CONV_EXPLICIT, "prompt": [msg("user", "Hi"), msg("system", "Be brief.")]}, "prompt", "bad_messages",
     "message 1: a system message may only come first"),
    ({**CONV_EXPLICIT, "rejected": [msg("user", "A car.")]}, "rejected", "bad_messages",
     "message 0: an answer holds assistant messages only, got role 'user'"),
    ({**CONV_EXPLICIT, "prompt": [msg("user", "\ud800")]}, "prompt", "bad_utf8", "lone UTF-16 surrogate"),
    ({**CONV_EXPLICIT, "chosen": [msg("assistant", " ")]}, "chosen", "empty", "the assistant answer is empty"),
    ({**CONV_EXPLICIT, "rejected": CONV_EXPLICIT["chosen"]}, "chosen", "identical", "identical"),
    (CONV_IMPLICIT | {"rejected": CONV_IMPLICIT["chosen"]}, "chosen", "identical", "identical"),
    ({**CONV_EXPLICIT, "chosen": [msg("assistant", "x"), msg("assistant", "y")],  # the same HH text
      "rejected": [msg("assistant", "x\n\nAssistant: y")]}, "chosen", "identical", "identical"),
    ({"chosen": [msg("user", "A?"), msg("assistant", "a")], "rejected": [msg("user", "B?"), msg("assistant", "b")]},
     None, "prompt_mismatch", "differ at message 0, not only in the final assistant answer"),
    ({"chosen": [msg("user", "A?"), msg("assistant", "a"), msg("user", "ok"), msg("assistant", "c")],
      "rejected": [msg("user", "A?"), msg("assistant", "b"), msg("user", "ok"), msg("assistant", "c")]},
     None, "prompt_mismatch", "differ at message 1"),
    ({"chosen": [msg("user", "A?"), msg("assistant", "a")], "rejected": [msg("user", "A?")]},
     "rejected", "empty", "no assistant answer after the 1 shared messages"),
])
def test_bad_conversational_rows_name_file_line_field(tmp_path, row, field, reason, message):
    err = load_error(tmp_path, [CONV_EXPLICIT, HH_ROW, row], skip_unusable=False)
    assert (err.reason, err.field, err.line) == (reason, field, 3)
    assert "bad.jsonl: line 3: " in str(err) and message in str(err)
    if reason in UNUSABLE_REASONS:  # skipped and counted by default
        pairs, report = load_preferences_with_report(tmp_path / "bad.jsonl")
        assert len(pairs) == 2 and report.skipped == {reason: 1}
    else:
        pairs, report = load_preferences_with_report(tmp_path / "bad.jsonl", skip_bad_records=True)
        assert len(pairs) == 2 and report.skipped == {reason: 1}


# ---------------------------------------------------------------------------- splits, synthetic

def test_train_eval_split_disjoint_and_deterministic():
    pairs = make_synthetic_pairs(200, seed=1)
    pairs = pairs + pairs[:30]  # exact duplicates must stay on one side
    train, evals = train_eval_split(pairs, 40, seed=3)
    key = lambda p: (p.prompt, p.chosen, p.rejected)
    assert not {key(p) for p in train} & {key(p) for p in evals}
    assert sorted(map(key, train + evals)) == sorted(map(key, pairs))
    assert 40 <= len(evals) <= 42
    assert (train, evals) == train_eval_split(pairs, 40, seed=3)
    assert evals != train_eval_split(pairs, 40, seed=4)[1]
    train, evals = train_eval_split(pairs[:200], 0.1, seed=0)
    assert (len(train), len(evals)) == (180, 20)
    with pytest.raises(ValueError, match="eval_size"):
        train_eval_split(pairs, 10_000, seed=0)


def test_synthetic_pairs():
    pairs = make_synthetic_pairs(64, seed=0)
    assert pairs == make_synthetic_pairs(64, seed=0) and pairs != make_synthetic_pairs(64, seed=1)
    assert len({(p.prompt, p.chosen, p.rejected) for p in pairs}) == 64
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman: ") and p.prompt.endswith("\n\nAssistant:")
        assert p.chosen.split(" To ")[0].strip() in _GOOD_OPENERS
        assert p.rejected.split(" To ")[0].strip() in _BAD_OPENERS
        assert p.chosen != p.rejected and len(p.chosen.split()) < 25 and len(p.rejected.split()) < 25
        # the same split as real HH rows: prompt + response is a transcript
        assert split_hh_transcript(p.prompt + p.chosen, p.prompt + p.rejected) == (p.prompt, p.chosen, p.rejected)


# ---------------------------------------------------------------------------- TRL's standard rows

def test_standard_implicit_prompt_is_trls(tmp_path):
    """Plain chosen/rejected texts that are not HH transcripts share their prompt as trl.extract_prompt finds it."""
    trl_data = pytest.importorskip("trl.data_utils", reason="TRL's extract_prompt is the oracle")
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Q: 2+2?\nA: 4", "rejected": "Q: 2+2?\nA: 5, maybe"},
            {"chosen": "Translate 'chat': cat", "rejected": "Translate 'chat': chat"}]
    pairs = load_preferences(write_jsonl(tmp_path / "s.jsonl", rows))
    for row, pair in zip(rows, pairs):
        expected = trl_data.extract_prompt(row)
        assert (pair.prompt, pair.chosen, pair.rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    assert (pairs[0].prompt, pairs[0].chosen) == ("The sky is", " blue.")
    err = load_error(tmp_path, [rows[0], {"chosen": "Yes.", "rejected": "No."}], skip_unusable=False)
    assert (err.reason, err.line) == ("prompt_mismatch", 2) and "share no prompt" in str(err)
    err = load_error(tmp_path, [rows[0], {"chosen": "The sky", "rejected": "The sky is green."}], skip_unusable=False)
    assert (err.reason, err.field) == ("empty", "chosen")


@pytest.mark.parametrize("rows", [[{"prompt": "Hi", "completion": " Hello"}], [{"messages": [msg("user", "Hi")]}],
                                  [{"text": "Hi"}, HH_ROW]], ids=["prompt-completion", "messages", "text"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_file_in_no_preference_format_is_one_error(tmp_path, rows, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pa = pytest.importorskip("pyarrow", reason="pyarrow writes the parquet file")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    else:
        write_jsonl(path, rows)
    with pytest.raises(DataError) as info:
        load_preferences(path, skip_bad_records=True)  # not a bad record to skip: the whole file is wrong
    message = str(info.value)
    assert len(message.splitlines()) == 1 and f"d{suffix}: not preference data in a format dpo reads" in message
    assert f"its records have the columns {sorted(rows[0])}" in message
    assert "needed: 'chosen' and 'rejected', with or without 'prompt'" in message


def test_json_file_of_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(HH_ROW) + "\n" + json.dumps(CONV_IMPLICIT) + "\n")
    first, second = load_preferences(path)
    assert first.chosen == " It is 4." and second.prompt_messages == (msg("user", "Name a fruit."),)
    assert second.source.endswith("d.json:2")


# ---------------------------------------------------------------------------- hub datasets

GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.gz filter=lfs diff=lfs merge=lfs -text\n"


def parquet_bytes(rows: list[dict]) -> bytes:
    pa = pytest.importorskip("pyarrow", reason="pyarrow writes the parquet files the hub serves")
    import io

    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def card(*configs: dict) -> bytes:
    """A dataset card (README.md) whose YAML header lists `configs`, as push_to_hub writes it."""
    import yaml

    return ("---\n" + yaml.safe_dump({"configs": list(configs)}, sort_keys=False) + "---\n# A dataset\n").encode()


def parquet_repo(train: list[dict], test: list[dict]) -> dict[str, bytes]:
    """A dataset repo laid out as push_to_hub lays it out (and as trl-lib/ultrafeedback_binarized is)."""
    return {".gitattributes": GITATTRIBUTES,
            "README.md": card({"config_name": "default", "data_files": [
                {"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}]}),
            "data/train-00000-of-00001.parquet": parquet_bytes(train),
            "data/test-00000-of-00001.parquet": parquet_bytes(test)}


def file_requests(server: HubServer) -> list[str]:
    """The repo files and listings the server was asked for (not huggingface_hub's other calls)."""
    return [f"{r.method} {r.path}" for r in server.requests if "/resolve/" in r.path or "/api/datasets/" in r.path]


# trl-lib/ultrafeedback_binarized's columns: chosen and rejected are whole conversations (the user's
# message, then the answer: an implicit prompt), with the judge's scores beside them.
ULTRAFEEDBACK = [
    {"chosen": [msg("user", "Name a fruit."), msg("assistant", "An apple.")],
     "rejected": [msg("user", "Name a fruit."), msg("assistant", "A car.")], "score_chosen": 8.0, "score_rejected": 2.5},
    {"chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],
     "rejected": [msg("user", "Say hi."), msg("assistant", "No.")], "score_chosen": 7.0, "score_rejected": 1.0},
]
FORMATS = {  # TRL's four preference formats, each as rows with extra columns a real dataset has
    "standard-explicit": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 1}],
    "standard-implicit": [{"chosen": "The sky is blue.", "rejected": "The sky is green.", "id": 1}],
    "conversational-explicit": [{"prompt": [msg("user", "What color is the sky?")],
                                 "chosen": [msg("assistant", "It is blue.")],
                                 "rejected": [msg("assistant", "It is green.")], "score_chosen": 9.0}],
    "conversational-implicit": ULTRAFEEDBACK,
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_hub_dataset_in_each_trl_format(hub, tmp_path, fmt):
    rows = FORMATS[fmt]
    test_rows = [{**rows[0], "id": 2} if "id" in rows[0] else rows[-1]]
    hub.add_repo("someone/prefs", parquet_repo(rows, test_rows), repo_type="dataset")
    pairs = load_preferences("someone/prefs")
    assert len(pairs) == len(rows) and pairs[0].source == "someone/prefs/data/train-00000-of-00001.parquet:1"
    if fmt.startswith("standard"):
        assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("The sky is", " blue.", " green.")
        assert pairs[0].prompt_messages is None
    else:
        assert pairs[0].prompt_messages == (rows[0]["chosen"][0] if fmt.endswith("implicit") else rows[0]["prompt"][0],)
        assert pairs[0].chosen_messages[0]["role"] == "assistant" and pairs[0].prompt.endswith("\n\nAssistant:")
    fetched = file_requests(hub)
    assert not any("data/test-" in r for r in fetched)  # only the split asked for is downloaded
    assert len(load_preferences("someone/prefs", split="test")) == 1
    # The same files in a local folder (a clone of the repo) read the same
    local = tmp_path / "clone"
    for name, body in hub.repos[("dataset", "someone/prefs")].files_at[
            hub.repos[("dataset", "someone/prefs")].revisions["main"]].items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(body)
    assert [(p.prompt, p.chosen, p.rejected) for p in load_preferences(local)] == [
        (p.prompt, p.chosen, p.rejected) for p in pairs]


def test_ultrafeedback_layout_and_its_explicit_prompt_variant(hub):
    """trl-lib/ultrafeedback_binarized as the hub has it (card, data/{train,test}-00000-of-00001.parquet,
    conversations with scores), and the same with the prompt as its own message list."""
    hub.add_repo("trl-lib/ultrafeedback_binarized", parquet_repo(ULTRAFEEDBACK, ULTRAFEEDBACK[:1]),
                 repo_type="dataset")
    explicit = [{"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:],
                 "score_chosen": r["score_chosen"], "score_rejected": r["score_rejected"]} for r in ULTRAFEEDBACK]
    hub.add_repo("someone/ultrafeedback-explicit", parquet_repo(explicit, explicit[:1]), repo_type="dataset")
    implicit = load_preferences("trl-lib/ultrafeedback_binarized")
    assert [(p.prompt, p.chosen, p.rejected) for p in implicit] == [
        ("\n\nHuman: Name a fruit.\n\nAssistant:", " An apple.", " A car."),
        ("\n\nHuman: Say hi.\n\nAssistant:", " Hi!", " No.")]
    assert implicit[0].prompt_messages == (msg("user", "Name a fruit."),)
    assert implicit[0].chosen_messages == (msg("assistant", "An apple."),)
    same = load_preferences("someone/ultrafeedback-explicit")
    assert [(p.prompt_messages, p.chosen_messages, p.rejected_messages) for p in same] == [
        (p.prompt_messages, p.chosen_messages, p.rejected_messages) for p in implicit]
    assert [p.source for p in load_preferences("trl-lib/ultrafeedback_binarized", split="test")] == [
        "trl-lib/ultrafeedback_binarized/data/test-00000-of-00001.parquet:1"]


def test_hub_dataset_subsets_splits_and_files(hub):
    """A card with two configs (one the default), files named after splits, one file by its path."""
    en = [{"prompt": "Hi", "chosen": " Hello", "rejected": " Go"}]
    fr = [{"prompt": "Salut", "chosen": " Bonjour", "rejected": " Va"}]
    hub.add_repo("someone/multi", {
        ".gitattributes": GITATTRIBUTES,
        "README.md": card({"config_name": "en", "default": True, "data_files": [
                               {"split": "train_prefs", "path": "en/train_prefs-*"}]},
                          {"config_name": "fr", "data_files": "fr/*.jsonl"}),
        "en/train_prefs-00000-of-00001.parquet": parquet_bytes(en),
        "fr/a.jsonl": (json.dumps(fr[0]) + "\n").encode()}, repo_type="dataset")
    assert load_preferences("someone/multi", split="train_prefs")[0].chosen == " Hello"  # the default config
    assert load_preferences("someone/multi", subset="fr")[0].chosen == " Bonjour"  # data_files without splits: train
    assert load_preferences("someone/multi/fr")[0].chosen == " Bonjour"  # the subset in the name
    assert load_preferences("someone/multi/fr/a.jsonl", split="ignored")[0].chosen == " Bonjour"  # one file
    with pytest.raises(DataError, match=r"someone/multi has no split 'train'; its splits: train_prefs "
                                        r"\(pick one with --data-split\)"):
        load_preferences("someone/multi")
    with pytest.raises(DataError, match=r"someone/multi has no subset 'de'; its subsets: en, fr"):
        load_preferences("someone/multi", subset="de")
    assert load_preferences("someone/multi", subset="en", split="train_prefs")[0].chosen == " Hello"
    with pytest.raises(DataError, match=r"the hub dataset someone/multi has no file 'fr/b.jsonl'"):
        load_preferences("someone/multi/fr/b.jsonl")
    # without a card: subsets are folders, splits come from the file names
    hub.add_repo("someone/plain", {".gitattributes": GITATTRIBUTES,
                                   "x/train.jsonl": (json.dumps(en[0]) + "\n").encode(),
                                   "x/test-00000-of-00002.parquet": parquet_bytes(fr),
                                   "x/test-00001-of-00002.parquet": parquet_bytes(en)}, repo_type="dataset")
    assert [p.chosen for p in load_preferences("someone/plain", split="test")] == [" Bonjour", " Hello"]
    with pytest.raises(DataError, match=r"someone/plain has no subset 'y': no data files under y/; "
                                        r"its folders with data: x"):
        load_preferences("someone/plain", subset="y")


def hh_repo(tmp_path) -> dict[str, bytes]:
    """Anthropic/hh-rlhf's layout: a folder per subset with {train,test}.jsonl.gz, and a folder
    of red-team transcripts that are not preference pairs. Its card's one config (every file) is
    not a subset: "Anthropic/hh-rlhf" is helpful-base + harmless-base, a subset is its folder."""
    def gz(rows):
        return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())

    card = b"---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files: '**/*.jsonl.gz'\n---\n# HH-RLHF\n"
    files = {".gitattributes": GITATTRIBUTES, "README.md": card,  # a card whose only config is not a subset
             "red-team-attempts/red_team_attempts.jsonl.gz": gz([{"transcript": "x", "rating": 1}])}
    for sub, row in (("helpful-base", HH_ROW), ("harmless-base", HH_ROW2)):
        for split in ("train", "test"):
            files[f"{sub}/{split}.jsonl.gz"] = gz([row])
    return files


def test_anthropic_hh_rlhf_from_the_hub(hub, tmp_path):
    hub.add_repo("Anthropic/hh-rlhf", hh_repo(tmp_path), repo_type="dataset")
    pairs = load_preferences("Anthropic/hh-rlhf", split="test")
    assert [p.source for p in pairs] == ["Anthropic/hh-rlhf/harmless-base/test.jsonl.gz:1",
                                         "Anthropic/hh-rlhf/helpful-base/test.jsonl.gz:1"]
    downloaded = {r.split("/resolve/")[1].split("/", 1)[1] for r in file_requests(hub) if r.startswith("GET /datasets/")}
    assert downloaded == {".gitattributes", "README.md", "harmless-base/test.jsonl.gz", "helpful-base/test.jsonl.gz"}
    assert [p.chosen for p in load_preferences("Anthropic/hh-rlhf/harmless-base")] == [" An apple."]
    assert [p.chosen for p in load_preferences("Anthropic/hh-rlhf", subset="helpful-base")] == [" It is 4."]
    assert load_preferences("Anthropic/hh-rlhf/helpful-base/test.jsonl.gz")[0].chosen == " It is 4."
    with pytest.raises(DataError, match=r"red_team_attempts.jsonl.gz: not preference data in a format dpo reads: "
                                        r"its records have the columns \['rating', 'transcript'\]"):
        load_preferences("Anthropic/hh-rlhf", subset="red-team-attempts", split="red_team_attempts")


def test_local_path_wins_over_hub_name(hub, tmp_path):
    local = tmp_path / "Anthropic" / "hh-rlhf"  # the hub fixture made tmp_path the current directory
    local.mkdir(parents=True)
    write_jsonl(local / "mine.jsonl", [PCR_ROW])
    (pair,) = load_preferences("Anthropic/hh-rlhf")
    assert pair.rejected == " Five." and file_requests(hub) == []


def test_hub_dataset_errors(hub):
    from smollm.sources import HubError

    with pytest.raises(HubError, match=r"dataset someone/missing: no such repo at http://127.0.0.1:\d+"):
        load_preferences("someone/missing")
    with pytest.raises(DataError, match=r"'some one/x' is not a local path, and not a hub dataset id"):
        load_preferences("some one/x")


def test_hub_dataset_revisions_and_offline_cache(hub, monkeypatch):
    """A revision by name, then everything again offline: from the cache huggingface_hub wrote, no request."""
    from smollm.sources import HubOfflineError

    old = [{"prompt": "Hi", "chosen": " Old", "rejected": " Bad"}]
    new = [{"prompt": "Hi", "chosen": " New", "rejected": " Bad"}]
    hub.add_repo("someone/versions", parquet_repo(old, old), repo_type="dataset", revision="v1")
    hub.add_repo("someone/versions", parquet_repo(new, new), repo_type="dataset")
    assert load_preferences("someone/versions")[0].chosen == " New"
    assert load_preferences("someone/versions@v1")[0].chosen == " Old"
    hub.clear_requests()
    for variable in ("HF_HUB_OFFLINE", "SMOLLM_OFFLINE"):  # SMOLLM_OFFLINE: the old name, an alias
        monkeypatch.setenv(variable, "1")
        assert load_preferences("someone/versions")[0].chosen == " New"
        assert load_preferences("someone/versions@v1")[0].chosen == " Old"
        with pytest.raises(HubOfflineError, match=rf"dataset someone/versions is only partly in the cache .*"
                                                  rf"and {variable}=1"):
            load_preferences("someone/versions", split="test")  # never downloaded
        monkeypatch.delenv(variable)
    assert hub.requests == []
    hub.stop()  # the hub is gone: the cache still serves what it holds
    assert load_preferences("someone/versions")[0].chosen == " New"


FALLBACK_END = ": using the HH-RLHF test splits bundled with dpo (helpful-base + harmless-base, 4,666 pairs) " \
               "instead of Anthropic/hh-rlhf train"


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The hub at a closed local port (connection refused at once), with an empty cache."""
    port = unused_port()
    isolate_hub_env(monkeypatch, tmp_path / "hf", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    return port


def test_offline_fallback_to_the_bundled_test_splits(unreachable_hub, hh_files):
    pairs, report = load_preferences_with_report("Anthropic/hh-rlhf")
    assert report.fallback == (f"the hub (http://127.0.0.1:{unreachable_hub}) cannot be reached "
                               f"(ConnectError: [Errno 111] Connection refused)" + FALLBACK_END)
    assert str(report).splitlines()[0] == "loaded 4642 pairs from 2 file(s), skipped 24"
    assert report.files == [str(p) for p in hh_files]
    assert pairs == load_preferences(hh_files)  # same sources: "helpful-base/test.jsonl.gz:1", ...
    # the report-less call warns instead
    with pytest.warns(RuntimeWarning, match="cannot be reached .*: using the HH-RLHF test splits"):
        assert len(load_preferences("Anthropic/hh-rlhf", limit=5)) == 5
    _, report = load_preferences_with_report("Anthropic/hh-rlhf", split="test", limit=3)
    assert report.fallback.endswith("instead of Anthropic/hh-rlhf test")


def test_offline_fallback_can_be_switched_off(unreachable_hub):
    from smollm.sources import HubOfflineError

    with pytest.raises(HubOfflineError, match=rf"dataset Anthropic/hh-rlhf is not in the cache .* and the hub "
                                              rf"\(http://127.0.0.1:{unreachable_hub}\) cannot be reached"):
        load_preferences("Anthropic/hh-rlhf", offline_fallback=False)
    # only the whole "Anthropic/hh-rlhf" falls back: a subset or a file asked for by name does not
    for name in ("Anthropic/hh-rlhf/helpful-base", "Anthropic/hh-rlhf/helpful-base/train.jsonl.gz"):
        with pytest.raises(HubOfflineError):
            load_preferences(name)


def test_offline_fallback_never_mixes_train_and_test(hub, monkeypatch, tmp_path, hh_files):
    """One train split cached (its subset was asked for), the other not: offline, both come from
    the bundled test splits; with HF_HUB_OFFLINE=1 too."""
    hub.add_repo("Anthropic/hh-rlhf", hh_repo(tmp_path), repo_type="dataset")
    assert len(load_preferences("Anthropic/hh-rlhf/helpful-base")) == 1
    hub.stop()
    pairs, report = load_preferences_with_report("Anthropic/hh-rlhf")
    assert report.fallback.endswith(FALLBACK_END) and "cannot be reached" in report.fallback
    assert report.files == [str(p) for p in hh_files] and len(pairs) == 4642
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_preferences_with_report("Anthropic/hh-rlhf", limit=1)[1].fallback == "HF_HUB_OFFLINE=1" + FALLBACK_END
