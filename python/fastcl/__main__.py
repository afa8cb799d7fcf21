"""``python -m fastcl [info]``: print what this installation contains and what "auto" picks.

(A command line rather than a ``fastcl.info`` module, which would shadow the ``fastcl.info()`` function.)
"""
import argparse

from ._info import main as show_info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastcl", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="info", choices=["info"])
    parser.parse_args(argv)
    show_info()


if __name__ == "__main__":
    main()
