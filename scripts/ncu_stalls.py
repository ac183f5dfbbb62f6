"""Where a kernel's warps stall, by source line: joins ncu's per-instruction SASS table (taken
on the GPU host) with `nvdisasm -g` line info of the same kernel compiled here (the build host
has no profiler; the SASS of one translation unit compiled with the build's flags matches the
extension's instruction for instruction, which the script checks by count).

On the GPU host:
    ncu --kernel-name regex:NAME --launch-count 1 --set full --import-source yes -o rep python ...
    ncu -i rep.ncu-rep --page source --print-source sass --csv > src.csv
Here (the cubin with the build's nvcc flags plus -lineinfo -cubin, for sm_90a only):
    nvdisasm -g -c kernel.cubin > kernel.sass
    python scripts/ncu_stalls.py kernel.sass src.csv [--top 25]

Prints the stall reasons over the whole kernel, then the source lines with the most stall
samples: their share of samples and of executed instructions, and their top three reasons.
"""
import argparse
import collections
import csv
import re
import sys

LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_lines(path):
    """(file name, line) of each instruction of the disassembly, in address order."""
    where, out = None, []
    with open(path) as f:
        for text in f:
            m = LINE.search(text)
            if m:
                where = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
                continue
            m = INSTR.match(text)
            if m:
                out.append((where, m.group(2)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sass")
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    instrs = sass_lines(a.sass)
    with open(a.csv) as f:
        rows = list(csv.reader(f))
    header, data = rows[1], rows[2:]   # row 0 names the kernel
    if len(data) != len(instrs):
        sys.exit(f"{len(data)} profiled instructions against {len(instrs)} disassembled: not the same SASS")
    samples = header.index("Warp Stall Sampling (All Samples)")
    executed = header.index("Instructions Executed")
    reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    by_line = collections.Counter()
    exec_by_line = collections.Counter()
    why = collections.defaultdict(collections.Counter)
    for (where, _), r in zip(instrs, data):
        by_line[where] += int(r[samples] or 0)
        exec_by_line[where] += int(r[executed] or 0)
        for i in reasons:
            n = int(r[i] or 0)
            if n:
                total[header[i]] += n
                why[where][header[i]] += n
    n_samples, n_exec = max(sum(by_line.values()), 1), max(sum(exec_by_line.values()), 1)
    print(f"{n_samples} samples, {n_exec} warp instructions executed")
    print("reasons: " + ", ".join(f"{k[6:]} {100 * v / n_samples:.1f}%" for k, v in total.most_common(10)))
    for where, n in by_line.most_common(a.top):
        top3 = ", ".join(f"{k[6:]} {v}" for k, v in why[where].most_common(3))
        print(f"{where[0] if where else '?'}:{where[1] if where else '?'}  {100 * n / n_samples:5.1f}% samples  "
              f"{100 * exec_by_line[where] / n_exec:5.1f}% instructions  ({top3})")


if __name__ == "__main__":
    main()
