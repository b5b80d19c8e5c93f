"""The steps of scripts/gen-agent-link-order.sh that read LLD link maps and traces (see that script).

    link_order.py trace MAP OUT_FILE BASE1 SB1 [BASE2 SB2 ...]   valgrind superblocks -> order, first run first
    link_order.py pages PID BINARY                               file offsets of the executable's mapped pages
    link_order.py native BINARY MAP ORDER_FILE PAGES...          sort ORDER_FILE by the pages a native run touched
"""
import bisect
import re
import struct
import subprocess
import sys

# LLD map lines: VMA LMA Size Align, then an output section, an input section "file:(.section)", or a symbol.
MAP_LINE = re.compile(r"\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+(.*)$")


def sections(link_map):
    """Input sections as [start, end, first symbol or None, executable?], by address."""
    out = []
    for line in open(link_map):
        m = MAP_LINE.match(line)
        if not m:
            continue
        vma, size, rest = int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()
        if ":(" in rest:
            out.append([vma, vma + size, None, rest.split(":(", 1)[1].startswith(".text")])
        elif out and out[-1][2] is None and not rest.startswith("."):
            out[-1][2] = rest
    out.sort()
    return out


def write(order_file, names):
    with open(order_file, "w") as f:
        f.write("\n".join(names) + "\n")


def trace(link_map, order_file, runs):
    """The first symbol of each code section the traced runs entered, in the order they first entered it."""
    code = [s for s in sections(link_map) if s[2] and s[3]]
    starts = [s[0] for s in code]
    order, seen = [], set()
    for base_file, sb_file in zip(runs[::2], runs[1::2]):
        base = int(open(base_file).read().strip(), 16)
        for line in open(sb_file):
            addr = int(line, 16) - base
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and addr < code[i][1] and code[i][2] not in seen:
                seen.add(code[i][2])
                order.append(code[i][2])
    write(order_file, order)
    print(f"{order_file}: {len(order)} symbols")


def pages(pid, binary):
    pagemap = open(f"/proc/{pid}/pagemap", "rb")
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        if len(f) < 6 or f[5] != binary:
            continue
        start, end = (int(x, 16) for x in f[0].split("-"))
        pagemap.seek(start // 4096 * 8)
        entries = pagemap.read((end - start) // 4096 * 8)
        for i in range((end - start) // 4096):
            if struct.unpack_from("<Q", entries, i * 8)[0] >> 63:
                print(int(f[2], 16) + i * 4096)


def native(binary, link_map, order_file, page_files):
    """Hot (in the order's own order), then what the order lacks on touched pages (code, then data), then the rest."""
    secs = sections(link_map)
    # File offset -> virtual address, per PT_LOAD segment.
    loads = []
    readelf = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True, check=True)
    for line in readelf.stdout.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            loads.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
    touched = set()
    for name in page_files:
        for line in open(name):
            off = int(line)
            for fo, va, size in loads:
                if fo // 4096 * 4096 <= off < fo + size:
                    touched.add((off + va - fo) // 4096)
    hot = {name for lo, hi, name, _ in secs
           if name and hi > lo and any(p in touched for p in range(lo // 4096, (hi - 1) // 4096 + 1))}
    known = {name for _, _, name, _ in secs if name}
    order = [l.strip() for l in open(order_file) if l.strip()]
    have = set(order)
    kept = [n for n in order if n in hot]
    cold = [n for n in order if n not in hot and n in known]
    code, data = [], []
    for _, _, name, is_code in secs:
        if name in hot and name not in have:
            have.add(name)
            (code if is_code else data).append(name)
    write(order_file, kept + code + data + cold)
    print(f"{order_file}: {len(kept)} on touched pages, {len(code)} functions and {len(data)} data symbols added, "
          f"{len(cold)} moved behind them, {len(order) - len(kept) - len(cold)} no longer in the binary dropped")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "trace":
        trace(args[0], args[1], args[2:])
    elif cmd == "pages":
        pages(args[0], args[1])
    elif cmd == "native":
        native(args[0], args[1], args[2], args[3:])
    else:
        sys.exit(__doc__)
