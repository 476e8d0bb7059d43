"""Bytes, requests and row groups read by one shuffled streaming epoch from a Hub dataset repo.

A dataset of 4 parquet files with one row group each (8,000 rows of 32 px JPEGs: the first 8,000
CIFAR-10 images from ``../shared/data/cifar10`` when present, else random ones) is served by the loopback
Hub of the tests (``tests/hub_server.py``, which counts every byte it sends). A fresh process loads it
with ``data.dataset: ORG/NAME``-style streaming (``load_images(get_spec("bench/stream"), streaming=True)``),
then reads one epoch the way training does: ``shuffle(seed, buffer)``, ``split_dataset_by_node`` over
``--processes`` simulated processes, a DataLoader with ``--workers`` workers each. The listing and the
epoch are counted separately. ``--before REV`` runs the same epoch with ``hub_ccrop`` as it was at git
revision REV, side by side (same server, same data).

    python benchmarks/bench_streaming.py --before f2f22bb
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hub_server import FakeHub  # noqa: E402

EPOCH = """
import multiprocessing, sys
import pyarrow.parquet as pq
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from hub_ccrop.data import get_spec, load_images

reads = multiprocessing.Value("i", 0)  # row groups read, summed over the forked DataLoader workers
original = pq.ParquetFile.read_row_group
def counted(self, *args, **kwargs):
    with reads.get_lock():
        reads.value += 1
    return original(self, *args, **kwargs)
pq.ParquetFile.read_row_group = counted

processes, workers, buffer = (int(v) for v in sys.argv[1:4])
spec = get_spec("bench/stream", image_column="img", image_size=32, test_split=None)
stream = load_images(spec, streaming=True).shuffle(seed=0, buffer_size=buffer)
print("listed", stream.num_shards, flush=True)
sys.stdin.readline()
rows = 0
for rank in range(processes):
    shard = split_dataset_by_node(stream, rank=rank, world_size=processes)
    loader = DataLoader(shard, batch_size=256, num_workers=workers, collate_fn=len)
    rows += sum(loader)
print("epoch", rows, reads.value, flush=True)
"""


def dataset_files(rows: int, files: int) -> tuple[dict[str, bytes], int]:
    """Hub-style parquet files (one row group each) and the total bytes of their images."""
    cifar = REPO.parent / "shared" / "data" / "cifar10" / "plain_text" / "train-00000-of-00001.parquet"
    if os.environ.get("HUB_CCROP_SHARED"):
        cifar = Path(os.environ["HUB_CCROP_SHARED"]) / "data" / "cifar10" / "plain_text" / cifar.name
    if cifar.exists():
        table = pq.read_table(cifar, columns=["img", "label"]).slice(0, rows)
    else:
        rng = np.random.default_rng(0)
        images = []
        for _ in range(rows):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            images.append({"bytes": buf.getvalue(), "path": None})
        table = pa.table({"img": images, "label": rng.integers(0, 10, rows)})
    image_bytes = sum(len(v["bytes"]) for v in table.column("img").to_pylist())
    out = {}
    per_file = rows // files
    for k in range(files):
        buf = io.BytesIO()
        pq.write_table(table.slice(k * per_file, per_file), buf, row_group_size=per_file)
        out[f"data/train-{k:05d}-of-{files:05d}.parquet"] = buf.getvalue()
    return out, image_bytes


def package_at(rev: str) -> Path:
    """A folder holding ``hub_ccrop`` as it was at git revision ``rev``."""
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", rev, "hub_ccrop"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def one_epoch(hub: FakeHub, code_root: Path, args: argparse.Namespace, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(code_root), HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    start = len(hub.requests)
    proc = subprocess.Popen([sys.executable, "-c", EPOCH, str(args.processes), str(args.workers), str(args.buffer)],
                            env=env, cwd=code_root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listed"):
        raise SystemExit(proc.communicate()[1][-3000:])
    time.sleep(0.5)  # the server records a request just after answering it
    listed = len(hub.requests)
    tic = time.perf_counter()
    out, err = proc.communicate("go\n", timeout=1800)
    seconds = time.perf_counter() - tic
    if proc.returncode:
        raise SystemExit(err[-3000:])
    _, rows, row_groups = out.split()[-3:]
    time.sleep(0.5)

    def summary(records: list) -> dict:
        return {
            "api_requests": sum(r.origin == "api" and "/resolve/" not in r.path for r in records),
            "resolve_requests": sum(r.origin == "api" and "/resolve/" in r.path for r in records),
            "storage_requests": sum(r.origin == "storage" for r in records),
            "bytes": sum(r.body_bytes for r in records),
        }

    return {"shards": int(line.split()[1]), "rows": int(rows), "row_groups_read": int(row_groups),
            "epoch_seconds": seconds, "listing": summary(hub.requests[start:listed]),
            "epoch": summary(hub.requests[listed:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2, help="simulated processes (split_dataset_by_node)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--buffer", type=int, default=2560, help="shuffle buffer (training uses 10 x batch size)")
    parser.add_argument("--before", default=None, help="also run hub_ccrop at this git revision")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_streaming.json"))
    args = parser.parse_args()

    files, image_bytes = dataset_files(args.rows, args.files)
    file_bytes = sum(map(len, files.values()))
    versions = {"now": REPO}
    if args.before:
        versions[f"before ({args.before})"] = package_at(args.before)
    results = {}
    with FakeHub() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add_files("bench/stream", files)
        for name, root in versions.items():
            results[name] = one_epoch(hub, root, args, Path(tmp) / name.split()[0])
    print(f"{args.rows} rows in {args.files} files of one row group each; image bytes {image_bytes:,}, "
          f"file bytes {file_bytes:,}; {args.processes} processes x {args.workers} workers, buffer {args.buffer}")
    print(f"{'version':<20}{'shards':>8}{'rows':>7}{'row groups':>12}{'epoch bytes':>14}{'x files':>9}{'x images':>10}"
          f"{'ranges':>8}{'resolves':>10}{'API calls':>10}{'listing API':>13}")
    for name, r in results.items():
        e, listing = r["epoch"], r["listing"]
        print(f"{name:<20}{r['shards']:>8}{r['rows']:>7}{r['row_groups_read']:>12}{e['bytes']:>14,}"
              f"{e['bytes'] / file_bytes:>9.2f}{e['bytes'] / image_bytes:>10.2f}{e['storage_requests']:>8}{e['resolve_requests']:>10}"
              f"{e['api_requests']:>10}{listing['api_requests'] + listing['resolve_requests']:>13}")
    meta = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
            "rows": args.rows, "files": args.files, "image_bytes": image_bytes, "file_bytes": file_bytes,
            "processes": args.processes, "workers": args.workers, "buffer": args.buffer}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
