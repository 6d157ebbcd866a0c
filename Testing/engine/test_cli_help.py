"""Every option and argument of the ``covidlesionseg`` command has a help text."""

from __future__ import annotations

import argparse

from COVIDLesionSegLib.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "covidlesionseg"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_options_a_newcomer_asked_about_say_what_they_do():
    parser = build_parser()
    segment = parser._subparsers._group_actions[0].choices["segment"]
    helps = {a.dest: a.help for a in segment._actions}
    assert "results.csv" in helps["output"] and "auto" in helps["device"] and "cpu" in helps["device"]
    models = parser._subparsers._group_actions[0].choices["models"]
    imported = models._subparsers._group_actions[0].choices["import"]
    assert "checkpoint" in {a.dest: a.help for a in imported._actions}["path"]
