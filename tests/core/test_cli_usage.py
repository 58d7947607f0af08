"""A new user's first hour with `niyama`, in process: --version, usage errors of the verb at hand, files that are
not there, help text as printed, `niyama policies`, the dummy shapes --model names, capacity's legend."""

from __future__ import annotations

import argparse

import pytest

from niyama.cli import build_parser, main, version
from niyama.cli.capacity import legend
from niyama.cli.common import MODEL_SHAPES, POLICY_SUMMARIES
from niyama.cli.serve import model_from_args
from niyama.scheduler import POLICIES


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"niyama {version()}"
    assert version()[0].isdigit()


@pytest.mark.parametrize("argv, prog", [(["simulate", "--bogus"], "niyama simulate"),
                                        (["bench", "serve", "--qps", "1", "--bogus", "x"], "niyama bench serve")])
def test_a_bad_flag_shows_the_verbs_usage_and_error(argv, prog, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"usage: {prog} ")
    assert f"{prog}: error: unrecognized arguments: {' '.join(argv[argv.index('--bogus'):])}" in err


def test_serve_takes_the_model_as_a_positional_or_as_model(capsys):
    parse = build_parser().parse_args
    assert model_from_args(parse(["serve", "m1"])) == "m1"
    assert model_from_args(parse(["serve", "--model", "m1"])) == "m1"
    assert model_from_args(parse(["serve", "m1", "--port", "8001", "--model", "m1"])) == "m1"
    assert model_from_args(parse(["serve"])) is None
    assert main(["serve", "m1", "--model", "m2"]) == 2
    assert "the model is given twice and differs: MODEL 'm1' and --model 'm2'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bound", "--trace", "azure-code,traces/mine.csv"], "--trace: no such file: traces/mine.csv"),
    (["simulate", "--qps", "1", "--tiers", "my-tiers.json"], "--tiers: no such file: my-tiers.json"),
    (["simulate", "--qps", "1", "--executor-profile", "gone.json*2"], "--executor-profile: no such file: gone.json"),
    (["bench", "serve", "--dataset-name", "prompts.csv"], "--dataset-name: no such file: prompts.csv"),
])
def test_a_missing_file_is_no_such_file_not_an_unknown_name(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "unknown" not in err


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_no_help_shows_a_doubled_percent():
    texts = {p.prog: p.format_help() for p in parsers(build_parser())}
    assert len(texts) > 12 and "1% violations" in texts["niyama capacity"]
    assert not [prog for prog, text in texts.items() if "%%" in text]


def test_policies_say_in_one_line_what_each_does(capsys):
    assert set(POLICY_SUMMARIES) == set(POLICIES)      # a new policy needs its line
    assert main(["policies"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == list(POLICIES)
    assert all(len(h.split(": ", 1)[1]) > 20 for h in heads)


def test_model_help_names_every_dummy_shape():
    pytest.importorskip("torch")
    from niyama.engine.config import SHAPES

    assert MODEL_SHAPES == tuple(SHAPES)
    help_text = " ".join(next(p for p in parsers(build_parser()) if p.prog == "niyama serve").format_help().split())
    assert ", ".join(MODEL_SHAPES) in help_text


def test_capacity_legend_explains_the_bound_columns():
    text = legend(1.0)
    for column in ("goodput QPS:", "sustainable:", "paper Fig.7:", "bound:", "% of bound:", "runs, time:"):
        assert column in text
    assert "<= 1% violations" in text and "2552-token" in text


def test_every_example_in_the_help_parses():
    """The epilogs' commands, as a user pastes them (continuation lines joined, comments dropped)."""
    import shlex

    from niyama import cli

    parser = build_parser()
    count = 0
    for verb in cli.VERBS:
        for name in ("EXAMPLES", "PROFILE_EXAMPLES", "FIT_EXAMPLES"):
            text = getattr(verb, name, "").replace("\\\n", " ")
            lines = text.splitlines()
            while lines:
                line = lines.pop(0)
                if not line.startswith("  niyama "):       # an example, not prose
                    continue
                while True:
                    try:
                        words = shlex.split(line, comments=True)
                        break
                    except ValueError:         # a quoted argument that goes on over the next line
                        line += "\n" + lines.pop(0)
                parser.parse_args(words[1:])
                count += 1
    assert count > 40
