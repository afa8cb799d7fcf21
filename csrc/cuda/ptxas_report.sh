#!/usr/bin/env bash
# Registers, shared memory, stack frame and spills of every kernel for sm_80 and sm_90a
# (nvcc -Xptxas -v), with a summary table first. Usage: csrc/cuda/ptxas_report.sh [output file]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../bench/results/2026-12-05-ptxas-sm80-sm90a.txt}"
nvcc="${NVCC:-nvcc}"
flags=(-std=c++17 -O3 -lineinfo -Xptxas -v)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for arch in 80 90a; do
  for src in "$here"/*.cu; do
    name="$(basename "$src" .cu)"
    "$nvcc" "${flags[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$tmp/$name.$arch.o" \
      > "$tmp/$name.$arch.log" 2>&1
  done
done

{
  echo "# ptxas -v of csrc/cuda/*.cu: $("$nvcc" --version | tail -1)"
  echo "# flags: ${flags[*]} -gencode arch=compute_{80,90a},code=sm_{80,90a}; regenerate with csrc/cuda/ptxas_report.sh"
  echo
  cat "$tmp"/*.log | c++filt | python3 -c '
import re, sys
rows, fn, arch = [], None, None
for line in sys.stdin:
    m = re.search(r"Compiling entry function \x27(.*)\x27 for \x27(sm_\w+)\x27", line)
    if m:
        fn, arch, stack, spill = m.group(1), m.group(2), "?", "?"
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and fn:
        stack, spill = m.group(1), f"{m.group(2)}/{m.group(3)}"
        continue
    m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?(?:,|$)", line)
    if m and fn:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((arch, fn, m.group(1), stack, spill, smem.group(1) if smem else "0"))
        fn = None
print("%-7s %4s %5s %11s %11s  kernel" % ("arch", "regs", "stack", "spill st/ld", "static smem"))
for arch, fn, regs, stack, spill, smem in sorted(rows):
    print(f"{arch:7} {regs:>4} {stack:>5} {spill:>11} {smem:>11}  {fn}")
'
  echo
  echo "# dynamic shared memory (not in the table): lse_forward and pair_grad alike, stages of 128-row A and B"
  echo "# tiles (tile.cuh Smem): 73728 B (float: 2 stages, rows of 32 + 4 floats) / 61440 B (16-bit: 3 stages,"
  echo "# rows of 32 + 8 elements); the launchers opt in above 48 KiB. lse_prefixes_forward adds 3 KiB per prefix of"
  echo "# the launch (rows' running statistics and the factors: prefixes.cuh PrefixSmem)."
  echo
  echo "# raw ptxas output"
  for log in "$tmp"/*.log; do
    echo "## $(basename "$log" .log)"
    c++filt < "$log"
  done
} > "$out"
echo "wrote $out"
