"""Ratios the Speed targets are stated in, from `cass bench --json` outputs.

Usage: python benchmarks/bench_summary.py ROWS.json [MORE.json ...]
For each file: its rows, end-to-end / model-only per method and batch size, and CASS against DINO
(epoch time at the same batch size and mode). Then every row against the paper-reference row of
the same networks, size and batch, whichever file holds them.
"""

from __future__ import annotations

import json
import sys


def summarise(name: str, rows: list[dict]) -> None:
    print(name)
    for r in rows:
        print(f"  {r['method']:10} {r['mode']:10} batch {r['batch_size']:4} {r['img_per_s']:9.1f} img/s "
              f"{r['step_ms']:9.1f} ms {r['cpu_ms_per_img']:8.1f} CPU ms/img {r['peak_memory_mb']:8.0f} MB  "
              f"{r['networks']} {r['img_size']}px {r['precision']} {r['data_path']} {r['label']}")
    timed = {(r["method"], r["batch_size"], r["mode"]): r for r in rows if not r["label"]}
    for (method, batch, mode), row in timed.items():
        model = timed.get((method, batch, "model-only"))
        if mode == "end-to-end" and model:
            print(f"  {method} batch {batch}: end-to-end / model-only = {row['img_per_s'] / model['img_per_s']:.3f} "
                  f"(CPU time per image: {model['cpu_ms_per_img'] / row['cpu_ms_per_img']:.3f})")
    for (method, batch, mode), row in timed.items():
        dino = timed.get(("dino-vit", batch, mode))
        if method == "cass" and dino:
            print(f"  batch {batch} {mode}: CASS epoch time = {dino['img_per_s'] / row['img_per_s']:.2f}x DINO's")


def main(paths: list[str]) -> None:
    everything = []
    for path in paths:
        rows = json.load(open(path))
        summarise(path, rows)
        everything += rows
    for reference in (r for r in everything if r["label"] == "paper-reference"):
        same = (reference["networks"], reference["img_size"], reference["batch_size"])
        for r in everything:
            if not r["label"] and (r["networks"], r["img_size"], r["batch_size"]) == same:
                print(f"{r['method']} {r['mode']} {r['precision']}: {r['img_per_s'] / reference['img_per_s']:.2f}x "
                      "the paper's configuration run as plain eager fp32")


if __name__ == "__main__":
    main(sys.argv[1:])
