"""Tests for dpo.data: HH transcript splitting, file formats, TRL conversational rows, bad and
unusable records, the bundled HH-RLHF test splits, hub names and the offline fallback, splits."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from http_server import FileServer

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


# ---------------------------------------------------------------------------- hub names

@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """smollm.hub.download_file replaced by a function serving files from tmp_path/hub."""
    import smollm.hub

    root = tmp_path / "hub"
    calls = []

    def download_file(repo_id, filename, *, repo_type="model", **kwargs):
        calls.append((repo_id, filename, repo_type))
        return root / repo_id / filename

    monkeypatch.setattr(smollm.hub, "download_file", download_file)
    for sub, row in (("helpful-base", HH_ROW), ("harmless-base", HH_ROW2)):
        for split in ("train", "test"):
            (root / "Anthropic/hh-rlhf" / sub).mkdir(parents=True, exist_ok=True)
            write_jsonl(root / "Anthropic/hh-rlhf" / sub / f"{split}.jsonl.gz", [row], gz=True)
    return calls


def test_hub_name_both_subsets(fake_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local path named "Anthropic/hh-rlhf" here
    pairs = load_preferences("Anthropic/hh-rlhf", split="test")
    assert fake_hub == [("Anthropic/hh-rlhf", "helpful-base/test.jsonl.gz", "dataset"),
                        ("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz", "dataset")]
    assert [p.source for p in pairs] == ["Anthropic/hh-rlhf/helpful-base/test.jsonl.gz:1",
                                         "Anthropic/hh-rlhf/harmless-base/test.jsonl.gz:1"]


def test_hub_name_one_subset_and_file(fake_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (pair,) = load_preferences("Anthropic/hh-rlhf/harmless-base")
    assert fake_hub[-1] == ("Anthropic/hh-rlhf", "harmless-base/train.jsonl.gz", "dataset")
    assert pair.chosen == " An apple."
    load_preferences("Anthropic/hh-rlhf/helpful-base/test.jsonl.gz")
    assert fake_hub[-1] == ("Anthropic/hh-rlhf", "helpful-base/test.jsonl.gz", "dataset")
    with pytest.raises(DataError, match="'someone/else' is not a local path, and not a known hub dataset"):
        load_preferences("someone/else")
    assert len(fake_hub) == 2


def test_local_path_wins_over_hub_name(fake_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "Anthropic" / "hh-rlhf"
    local.mkdir(parents=True)
    write_jsonl(local / "mine.jsonl", [PCR_ROW])
    (pair,) = load_preferences("Anthropic/hh-rlhf")
    assert pair.rejected == " Five." and fake_hub == []


def test_hub_download_through_local_server(monkeypatch, tmp_path):
    """The real smollm.hub.download_file against tests/http_server.py."""
    from smollm.hub import CACHE_ENV, HUB_URL_ENV, OFFLINE_ENV, HubOfflineError

    data = gzip.compress((json.dumps(HH_ROW) + "\n" + json.dumps(HH_ROW2) + "\n").encode())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with FileServer({"/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz": data}) as server:
        monkeypatch.setenv(HUB_URL_ENV, server.url)
        pairs = load_preferences("Anthropic/hh-rlhf/helpful-base", split="test")
    assert [p.chosen for p in pairs] == [" It is 4.", " An apple."]
    # offline and not cached: the hub's own error propagates unchanged
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(HubOfflineError):
        load_preferences("Anthropic/hh-rlhf/harmless-base", split="test")
    assert len(load_preferences("Anthropic/hh-rlhf/helpful-base", split="test")) == 2  # cached


FALLBACK = ("the hub is unreachable: using the HH-RLHF test splits bundled with dpo "
            "(helpful-base + harmless-base, 4,666 pairs) instead of Anthropic/hh-rlhf train")


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The hub at a closed local port (connection refused at once), with an empty cache."""
    from smollm.hub import CACHE_ENV, HUB_URL_ENV, OFFLINE_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(HUB_URL_ENV, "http://127.0.0.1:9")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    return tmp_path / "cache"


def test_offline_fallback_to_the_bundled_test_splits(unreachable_hub, hh_files):
    pairs, report = load_preferences_with_report("Anthropic/hh-rlhf")
    assert report.fallback == FALLBACK
    assert str(report).splitlines()[0] == "loaded 4642 pairs from 2 file(s), skipped 24"
    assert report.files == [str(p) for p in hh_files]
    assert pairs == load_preferences(hh_files)  # same sources: "helpful-base/test.jsonl.gz:1", ...
    # the report-less call warns instead
    with pytest.warns(RuntimeWarning, match="the hub is unreachable: using the HH-RLHF test splits"):
        assert len(load_preferences("Anthropic/hh-rlhf", limit=5)) == 5
    _, report = load_preferences_with_report("Anthropic/hh-rlhf", split="test", limit=3)
    assert report.fallback.endswith("instead of Anthropic/hh-rlhf test")


def test_offline_fallback_can_be_switched_off(unreachable_hub):
    from smollm.hub import HubOfflineError

    with pytest.raises(HubOfflineError, match="could not reach http://127.0.0.1:9/datasets/Anthropic/hh-rlhf"):
        load_preferences("Anthropic/hh-rlhf", offline_fallback=False)
    # only the whole "Anthropic/hh-rlhf" falls back: a subset or a file asked for by name does not
    for name in ("Anthropic/hh-rlhf/helpful-base", "Anthropic/hh-rlhf/helpful-base/train.jsonl.gz"):
        with pytest.raises(HubOfflineError):
            load_preferences(name)


def test_offline_fallback_never_mixes_train_and_test(unreachable_hub, monkeypatch, hh_files):
    """One train split cached, the other not: both come from the bundled test splits."""
    from smollm.hub import OFFLINE_ENV, cached_file_path

    cached = cached_file_path("Anthropic/hh-rlhf", "helpful-base/train.jsonl.gz", repo_type="dataset")
    cached.parent.mkdir(parents=True)
    write_jsonl(cached, [HH_ROW], gz=True)
    pairs, report = load_preferences_with_report("Anthropic/hh-rlhf")
    assert report.fallback == FALLBACK and report.files == [str(p) for p in hh_files] and len(pairs) == 4642
    monkeypatch.setenv(OFFLINE_ENV, "1")  # SMOLLM_OFFLINE=1 and not cached: the same fallback
    assert load_preferences_with_report("Anthropic/hh-rlhf", limit=1)[1].fallback == FALLBACK


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
