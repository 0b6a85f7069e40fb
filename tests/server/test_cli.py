"""The `balcony` command line: help that gives every default and serve's request headers; generate's
mode (chat by default when the model has a template, --raw) and exit, stated on stderr."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from server.cli import build_parser, main
from server.routing_headers import BUDGET_HEADER, EXIT_HEADER


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "generate", "bench", "train", "eval"])
def test_help_gives_every_default(command):
    parser = subcommand(command)
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction,
                                                            argparse._StoreFalseAction)):
            continue
        if "default" not in formatter._expand_help(action):  # the help text as --help prints it
            missing.append(action.option_strings[-1])
    assert not missing, f"balcony {command} --help gives no default for {missing}"


def test_serve_help_lists_the_request_headers_and_describes_the_log_level(capsys):
    text = help_of("serve", capsys)
    assert BUDGET_HEADER in text and EXIT_HEADER in text and "Authorization" in text
    flat = " ".join(text.split())
    for expected in ("--max-num-seqs MAX_NUM_SEQS requests running at once (default: 64)",
                     "(default: 256)", "(default: 30.0)", "(default: best-effort)", "--recalibrate"):
        assert expected in flat, expected
    log_level = flat[flat.index("--log-level {"):]
    assert "how much the server logs" in log_level and "(default: info)" in log_level


def test_an_environment_variable_shows_as_the_default(capsys, monkeypatch):
    monkeypatch.setenv("BALCONY_MAX_NUM_SEQS", "7")
    assert "(default: 7) [env BALCONY_MAX_NUM_SEQS]" in " ".join(help_of("serve", capsys).split())


def generate(capsys, tiny_model_dir, *args: str) -> tuple[int, str]:
    code = main(["generate", "--model", str(tiny_model_dir), "--adapters", "none", "--dtype", "float32",
                 "--device", "cpu", "--num-kv-blocks", "64", "--max-tokens", "2", *args, "Hello there"])
    return code, capsys.readouterr().err


def prompt_tokens(stderr: str) -> int:
    return int(re.search(r"prompt (\d+) tokens", stderr).group(1))


def test_generate_chats_by_default_and_says_so(capsys, tiny_model_dir):
    code, chat = generate(capsys, tiny_model_dir)
    assert code == 0, chat
    assert "exit full of 4 layers, chat" in chat and "--raw" in chat
    code, raw = generate(capsys, tiny_model_dir, "--raw", "--exit", "2")
    assert code == 0, raw
    assert "exit 2 of 4 layers, raw completion" in raw
    assert prompt_tokens(chat) > prompt_tokens(raw)  # the template's turn markers are in the prompt
    code, old = generate(capsys, tiny_model_dir, "--chat")  # the old flag still works: it is the default
    assert code == 0 and prompt_tokens(old) == prompt_tokens(chat)
    code, both = generate(capsys, tiny_model_dir, "--chat", "--raw")
    assert code == 2 and "not both" in both


def test_bench_host_only_times_the_host_side_of_a_decode_step(capsys, tiny_model_dir):
    code = main(["bench", "--model", str(tiny_model_dir), "--adapters", "none", "--dtype", "float32",
                 "--host-only", "--rows", "4", "--context", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 rows x 16 tokens" in out
    for phase in ("schedule", "prepare", "forward", "sample", "postprocess"):
        assert f"{phase} " in out


def test_bench_host_only_of_a_mixed_batch_through_decode_graphs(capsys, tiny_model_dir):
    code = main(["bench", "--model", str(tiny_model_dir), "--dtype", "float32", "--host-only", "--rows", "4",
                 "--context", "16", "--mixed", "--graphs"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rows at depths" in out and "decode graphs, replays stubbed" in out
    assert "forward " in out


@pytest.mark.parametrize("overlap", [[], ["--overlap"]])
def test_bench_host_only_on_a_simulated_device_is_never_faster_than_the_device(capsys, tiny_model_dir, overlap):
    code = main(["bench", "--model", str(tiny_model_dir), "--adapters", "none", "--dtype", "float32",
                 "--host-only", "--rows", "4", "--context", "16", "--device-ms", "5", *overlap])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("simulated device of 5 ms"))
    assert ("overlapped" if overlap else "synchronous") in line
    per_step = float(line.split(": ")[1].split(" ms per step")[0])
    assert per_step >= 5.0 * 0.99  # the device's queue paces the steps
    code = main(["bench", "--model", str(tiny_model_dir), "--adapters", "none", "--host-only", "--device-ms", "-1"])
    assert code == 2 and "--device-ms must be >= 0" in capsys.readouterr().err


def test_generate_takes_a_cpu_weight_format_and_refuses_an_impossible_one(capsys, tiny_model_dir):
    code, err = generate(capsys, tiny_model_dir, "--quantization", "int8", "--raw")
    assert code == 0, err
    code, err = main(["generate", "--model", str(tiny_model_dir), "--adapters", "none", "--dtype", "bfloat16",
                      "--quantization", "fp16", "--device", "cpu", "Hi"]), capsys.readouterr().err
    assert code == 2 and "float32 activations" in err and "Traceback" not in err


@pytest.mark.parametrize("variable, attribute", [("BALCONY_NO_PREFIX_CACHING", "prefix_caching"),
                                                 ("BALCONY_NO_OVERLAP_STEPS", "overlap_steps")])
@pytest.mark.parametrize("value, expected", [("true", False), ("0", True)])
def test_a_no_switch_reads_its_variable_as_the_switch(monkeypatch, variable, attribute, value, expected):
    monkeypatch.setenv(variable, value)
    assert getattr(subcommand("serve").parse_args([]), attribute) is expected


@pytest.mark.parametrize("argv, env, expected", [
    ([], None, "auto"), (["--engine-process"], None, "on"), (["--engine-process", "off"], None, "off"),
    (["--engine-process", "auto"], "1", "auto"), ([], "1", "on"), ([], "false", "off"), ([], "auto", "auto"),
])
def test_the_engine_process_is_on_off_or_auto(monkeypatch, argv, env, expected):
    if env is None:
        monkeypatch.delenv("BALCONY_ENGINE_PROCESS", raising=False)
    else:
        monkeypatch.setenv("BALCONY_ENGINE_PROCESS", env)
    assert subcommand("serve").parse_args(argv).engine_process == expected


def test_an_engine_process_mode_outside_on_off_auto_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        subcommand("serve").parse_args(["--engine-process", "sometimes"])
    assert exited.value.code == 2 and "expected on, off or auto" in capsys.readouterr().err


def test_auto_runs_the_engine_in_its_own_process_only_on_a_gpu(monkeypatch):
    from server.serve import engine_process_by_default

    assert engine_process_by_default("cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_process_by_default("auto") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_process_by_default("auto") is True
    assert engine_process_by_default("cuda") is True


def test_generate_takes_the_penalties_and_refuses_one_out_of_range(capsys, tiny_model_dir):
    def text(*args: str) -> str:
        code = main(["generate", "--model", str(tiny_model_dir), "--adapters", "none", "--dtype", "float32",
                     "--device", "cpu", "--num-kv-blocks", "64", "--max-tokens", "16", "--raw", *args, "Hello there"])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    # a model of random weights repeats its tokens under greedy decoding; the penalty steers it off them
    assert text() != text("--frequency-penalty", "2")
    assert text("--presence-penalty", "0") == text()
    code = main(["generate", "--model", str(tiny_model_dir), "--adapters", "none", "--frequency-penalty", "3", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and "frequency_penalty must be in [-2, 2]" in err and "Traceback" not in err
