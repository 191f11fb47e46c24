"""Runs a command and prints the disks' read and write rates over its run, one line per
second (GB/s read, GB/s write, summed over whole disks from /proc/diskstats), then a summary:
bytes read and written, and the seconds in which both went faster than 0.3 GB/s (the disk
reading and writing at once).

    python3 scripts/bench/diskrate.py LABEL -- COMMAND...
"""

import json
import os
import subprocess
import sys
import time


def totals():
    read = written = 0
    with open("/proc/diskstats") as fh:
        for line in fh:
            f = line.split()
            name = f[2]
            if not os.path.exists(f"/sys/block/{name}") or name.startswith(("loop", "ram", "dm-", "md")):
                continue
            read += int(f[5]) * 512
            written += int(f[9]) * 512
    return read, written


def main():
    label = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    start = time.time()
    r0, w0 = last = totals()
    proc = subprocess.Popen(cmd)
    rows = []
    while True:
        done = proc.poll() is not None
        time.sleep(0.0 if done else 1.0)
        now = totals()
        rows.append(((now[0] - last[0]) / 1e9, (now[1] - last[1]) / 1e9))
        last = now
        if done:
            break
    seconds = time.time() - start
    timeline = " ".join(f"{r:.1f}/{w:.1f}" for r, w in rows)
    print(f"{label} disk read/write GB/s by second: {timeline}", flush=True)
    print(json.dumps({"label": label, "rc": proc.returncode, "seconds": round(seconds, 2),
                      "read_gb": round((last[0] - r0) / 1e9, 2), "written_gb": round((last[1] - w0) / 1e9, 2),
                      "both_busy_s": sum(1 for r, w in rows if r > 0.3 and w > 0.3)}), flush=True)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
