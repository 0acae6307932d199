"""The ``codetr`` command: train, eval, predict, export, bench, demo, data, convert, weights.

One module per command owns its arguments (``add_parser``) and runs it (``run``); this module
builds the parser from them and turns the errors a user can fix into a short message.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import Any

import yaml
from PIL import Image

from codetr import __version__
from codetr.cli import bench, convert, data, demo, evaluate, export, predict, train, weights
from codetr.cli.common import INTERRUPTED_EXIT, Terminated, short_warnings, sigterm_as_exception
from codetr.errors import UserError

DEBUG_ENV = "CODETR_DEBUG"
# Errors the user can fix: printed in a few lines, exit code 2, no traceback (unless --debug / CODETR_DEBUG=1).
# OSError covers missing files, permissions, folders given as files, full disks and unreadable images.
USER_ERRORS = (UserError, OSError, yaml.YAMLError, Image.DecompressionBombError)
USER_ERROR_EXIT = 2
COMMANDS = (train, evaluate, predict, demo, data, convert, weights, export, bench)  # in the order of `codetr --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetr", description="Co-DETR detectors in pure PyTorch: train, evaluate and run them.")
    parser.add_argument("--version", action="version", version=f"codetr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--debug`` on ``parser`` and on every subcommand below it, so it may come anywhere."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of an error (also: environment variable {DEBUG_ENV}=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, argparse.SUPPRESS)  # SUPPRESS: leaves the main parser's value alone


def report_error(err: BaseException, debug: bool) -> None:
    """``codetr: error: <message>`` on stderr, after the traceback when ``debug``."""
    if debug:
        traceback.print_exception(err)
    message = str(err) or type(err).__name__
    if isinstance(err, yaml.YAMLError):
        message = f"invalid YAML: {message}"
    print(f"codetr: error: {message}", file=sys.stderr)
    if not debug:
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line ``argv`` (default: ``sys.argv[1:]``), config overrides in
    ``overrides`` wherever they stand; exits with a usage message when it does not parse."""
    parser = build_parser()
    _add_debug_flag(parser, False)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # ``train CONFIG --out DIR a=b``: overrides after options are left over by argparse.
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code: 0, 2 for an
    error the user can fix (a short message naming the culprit), 130 when interrupted (Ctrl-C), 143
    when stopped by SIGTERM (after removing the temporary file of a write in progress)."""
    args = parse_command_line(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        with sigterm_as_exception(), short_warnings():
            return args.func(args)
    except USER_ERRORS as err:
        report_error(err, debug)
        return USER_ERROR_EXIT
    except Terminated:
        if debug:
            traceback.print_exc()
        print("codetr: stopped by SIGTERM (no file was left half-written)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("codetr: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
