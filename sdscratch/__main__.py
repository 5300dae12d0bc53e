"""The command line: `python -m sdscratch COMMAND` (also installed as `sdscratch`).

Errors print one line on stderr and exit with code 2, never a traceback.
"""

import argparse
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def cmd_train(args):
    from sdscratch.recipes import run_recipe

    manifest = run_recipe(args.recipe, out=args.out, seed=args.seed, steps=args.steps)
    print(f"trained in {manifest['wall_time_seconds']:.0f} s: {manifest['quality']}")


def cmd_book_build(args):
    import time

    from sdscratch.book import build

    start = time.perf_counter()
    out = build(root=args.root, out=args.out)
    pages = len(list(out.glob("[0-9][0-9]_*.html")))
    print(f"built {pages} lessons into {out} in {time.perf_counter() - start:.1f} s")


def cmd_book_execute(args):
    from sdscratch.book import execute

    execute(args.notebooks, root=args.root)


def add_book_commands(commands):
    from sdscratch.book import ROOT

    book = commands.add_parser("book", help="the course website and its lessons")
    book.add_argument("--root", default=ROOT, type=Path,
                      help="the repository: book.toml, README.md, lessons/")
    actions = book.add_subparsers(dest="action", required=True, parser_class=Parser)
    build = actions.add_parser("build", help="build the website into _build/site")
    build.add_argument("--out", help="site folder (default: _build/site)")
    build.set_defaults(func=cmd_book_build)
    execute = actions.add_parser(
        "execute", help="run lessons and store their outputs (as the tests run them)"
    )
    execute.add_argument("notebooks", nargs="*", help="default: every lesson")
    execute.set_defaults(func=cmd_book_execute)


def build_parser() -> Parser:
    parser = Parser(prog="sdscratch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="run a recipe that makes a checkpoint")
    train.add_argument("recipe", help="which model to train, e.g. vae or ldm")
    train.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    train.add_argument("--steps", type=positive_int, help="override the training steps")
    train.add_argument("--out", help="output folder (default: the bundled one)")
    train.set_defaults(func=cmd_train)
    add_book_commands(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"sdscratch: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdscratch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
