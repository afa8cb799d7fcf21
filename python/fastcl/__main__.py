"""``fastcl [info]`` / ``fastcl doctor`` / ``fastcl bench ...`` (also ``python -m fastcl ...``).

  info    print what this installation contains and what "auto" picks (the default)
  doctor  check this installation (versions, Triton, CUDA driver and GPUs, usable backends) and probe
          each usable backend against reference; exit status 1 if a problem was found (fastcl doctor -h)
  bench   sweep batch size: time and peak memory vs naive PyTorch and the GEMM floor (fastcl bench -h)

(A command line rather than a ``fastcl.info`` module, which would shadow the ``fastcl.info()`` function.)
"""
import sys

USAGE = ("usage: fastcl [info | doctor [--json] [--no-probe] | bench [options]]   "
         "(fastcl doctor -h, fastcl bench -h for their options)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv else ("info", [])
    if command == "bench":
        # Imported only here: the benchmark pulls in subprocess machinery that `info` never needs.
        from .benchmark.cli import main as bench

        return bench(rest)
    if command == "doctor":
        from ._doctor import main as doctor

        return doctor(rest)
    if command == "info" and not rest:
        from ._info import main as show_info

        show_info()
        return 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
