"""bench/guidellm_bench.py without guidellm: the command it builds for guidellm 0.8.1's CLI, the rows it
reads from guidellm's JSON report, and the docs section it writes in place."""

from __future__ import annotations

import json

import pytest


# An excerpt of a real guidellm 0.8.1 report of this script (streams 1 and 4, 10 s each), keys as
# guidellm writes them; the two errored requests at 4 streams are added by hand, their message in
# guidellm's form (the worker stores repr() of the backend's exception).
HTTP_400 = ("HTTPStatusError(\"Client error '400 Bad Request' for url "
            "'http://127.0.0.1:41315/v1/chat/completions'\")")
REPORT = {
    "metadata": {"version": 2, "guidellm_version": "0.8.1"},
    "benchmarks": [
        {"config": {"strategy": {"streams": 1}},
         "metrics": {"request_totals": {"successful": 1, "errored": 0, "incomplete": 1, "total": 2},
                     "output_tokens_per_second": {"total": {"mean": 7.9}},
                     "time_to_first_token_ms": {"successful": {"median": 1001.5089511871338}},
                     "time_per_output_token_ms": {"successful": {"median": 128.02468612790108}},
                     "request_latency": {"successful": {"median": 8.19458794593811}},
                     "prompt_token_count": {"successful": {"median": 158.0}}},
         "requests": {"errored": [],
                      "incomplete": [{"info": {"error": "Request was cancelled", "status": "cancelled"}}]},
         "start_time": 1796095871.5821428, "end_time": 1796095881.5821428},
        {"config": {"strategy": {"streams": 4}},
         "metrics": {"request_totals": {"successful": 0, "errored": 2, "incomplete": 4, "total": 6},
                     "output_tokens_per_second": {"total": {"mean": 9.099999999999996}},
                     "time_to_first_token_ms": {"successful": {"median": 0.0}},
                     "time_per_output_token_ms": {"successful": {"median": 0.0}},
                     "request_latency": {"successful": {"median": 0.0}},
                     "prompt_token_count": {"successful": {"median": 0.0}}},
         "requests": {"errored": [{"info": {"error": HTTP_400, "status": "errored"}}] * 2,
                      "incomplete": [{"info": {"error": "Request was cancelled", "status": "cancelled"}}]},
         "start_time": 1796095898.5358102, "end_time": 1796095908.5358102},
    ],
}


@pytest.fixture(scope="module")
def bench(bench_script):
    with bench_script("guidellm_bench") as module:
        yield module


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_command_speaks_guidellm_0_8_1s_cli(bench, tmp_path):
    args = bench.parse_args(["--streams", "1,16", "--duration-s", "45", "--exit", "22", "--budget-ms", "1500"])
    command = bench.guidellm_command(args, "http://127.0.0.1:8000", tmp_path / "tok", tmp_path / "r.json")
    assert command[:2] == [str(bench.DEFAULT_GUIDELLM), "run"]
    backend = json.loads(option(command, "--backend"))
    assert backend == {"kind": "openai_http", "target": "http://127.0.0.1:8000",
                       "request_format": "/v1/chat/completions",
                       "extras": {"headers": {"X-Balcony-Exit": "22", "X-Latency-Budget-Ms": "1500"}}}
    assert command[command.index("--override"):command.index("--override") + 3] == \
        ["--override", "profile.streams", "1,16"]
    assert option(command, "--profile") == "kind=concurrent"
    assert option(command, "--data") == "kind=synthetic_text,prompt_tokens=128,output_tokens=64"
    assert option(command, "--tokenizer") == f"kind=huggingface_auto,model={tmp_path / 'tok'}"
    assert option(command, "--constraint") == "kind=max_duration,seconds=45"
    assert option(command, "--output") == f"kind=json,path={tmp_path / 'r.json'}"
    plain = bench.guidellm_command(bench.parse_args([]), "http://h:1", tmp_path, tmp_path / "r.json")
    assert "extras" not in json.loads(option(plain, "--backend"))  # no header: full depth


def test_rows_come_from_the_report(bench):
    one, four = bench.summarise(REPORT)
    assert (one.streams, one.completed, one.errored, one.incomplete) == (1, 1, 0, 1)
    assert one.output_tok_s == pytest.approx(7.9)
    assert (round(one.ttft_p50_ms), round(one.tpot_p50_ms, 1), round(one.latency_p50_s, 2)) == (1002, 128.0, 8.19)
    assert one.prompt_tokens_p50 == 158 and one.errors == {}
    assert (four.completed, four.errored, four.incomplete) == (0, 2, 4)
    assert four.ttft_p50_ms is None  # no completed request: no median (guidellm writes 0.0)
    assert four.errors == {HTTP_400: 2}
    assert four.window == (1796095898.5358102, 1796095908.5358102)

    table = bench.markdown_table([one, four])
    assert "| 1 | 1 | 0 | 1 | 7.9 | 1002 | 128.0 | 8.19 | - |" in table
    assert "| 4 | 0 | 2 | 4 | 9.1 | - | - | - | - |" in table
    assert bench.error_lines([one, four]) == [f"- 4 streams, 2x: `{HTTP_400}`"]
    assert bench.error_lines([one]) == ["Errors: none."]


def test_cores_over_a_window(bench):
    samples = [bench.Sample(at, server, guidellm, busy) for at, server, guidellm, busy in
               [(9.0, 0.0, 0.0, 0.0), (10.0, 1.0, 0.5, 2.0), (12.0, 2.0, 1.0, 5.0), (20.0, 9.0, 9.0, 99.0)]]
    assert bench.window_cores(samples, 10.0, 12.5) == pytest.approx((0.5, 0.25, 0.75))
    assert bench.window_cores(samples, 10.5, 12.5) is None  # one sample inside


def test_section_goes_after_the_load_test_and_is_then_replaced_in_place(bench, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- load-test:begin -->\nload\n<!-- load-test:end -->\n\n## Later\ntext\n")
    bench.write_doc(doc, "first table", "python bench/guidellm_bench.py")
    bench.write_doc(doc, "second table", "python bench/guidellm_bench.py --streams 16")
    assert doc.read_text() == (
        "# Benchmarks\n\n<!-- load-test:begin -->\nload\n<!-- load-test:end -->\n\n"
        f"{bench.HEADING}\n\n<!-- guidellm:begin -->\n`python bench/guidellm_bench.py --streams 16`\n\n"
        "second table\n<!-- guidellm:end -->\n\n## Later\ntext\n")
