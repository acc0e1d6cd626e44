"""Tokenising throughput of mg-preprocess: tokens/s with one process per core against one worker
(one process, the tokenizer's own threads off), measured in the same run on the same documents.

  .venv/bin/python benchmarks/preprocess_throughput.py [--documents 600] [--workers N]

Prints tokens/s, tokens/s per core and the ratio to the 1-worker baseline for: 1 worker, 1 process
with the tokenizer's threads (the old default), and N workers (the new default, N = usable cores).
Each configuration runs in a fresh interpreter; the datasets they write must be byte-identical.
Documents: the first --documents files of the built-in stdlib corpus, held in memory, so reading
is not measured. Tokenizer: data/stdlib/tokenizer when prepared, else a 4096-token BPE trained on
the documents.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, os, sys, time
from megatron_grouter.data.corpus import iter_documents
from megatron_grouter.data.indexed import write_indexed_dataset
from megatron_grouter.data.tokenizer import load_tokenizer
documents, tokenizer_path, prefix, workers = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
docs = list(iter_documents("stdlib", max_documents=documents))
tokenizer = load_tokenizer(tokenizer_path)
started = time.perf_counter()
info = write_indexed_dataset(docs, tokenizer, prefix, workers=workers, progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"tokens": info.num_tokens, "seconds": seconds}))
"""


def measure(documents: int, tokenizer: str, prefix: Path, workers: int, backend_threads: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="true" if backend_threads else "false")
    result = subprocess.run([sys.executable, "-c", CHILD, str(documents), tokenizer, str(prefix), str(workers)],
                            env=env, cwd=REPO, capture_output=True, text=True, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256(Path(f"{prefix}.bin").read_bytes() + Path(f"{prefix}.idx").read_bytes()).hexdigest()
    return {**record, "rate": record["tokens"] / record["seconds"], "digest": digest}


def main() -> None:
    from megatron_grouter.data.indexed import usable_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=600)
    parser.add_argument("--workers", type=int, default=usable_cores())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = REPO / "data" / "stdlib" / "tokenizer" / "tokenizer.json"
        if not tokenizer.is_file():
            from megatron_grouter.data.corpus import iter_documents
            from megatron_grouter.data.tokenizer import train_byte_level_bpe

            texts = [document.text for document in iter_documents("stdlib", max_documents=args.documents)]
            tokenizer = train_byte_level_bpe(texts, 4096, Path(tmp) / "tokenizer").path
        runs = [("1 worker (baseline)", 1, False, 1), ("1 process + tokenizer threads", 1, True, args.workers),
                (f"{args.workers} workers (default)", args.workers, False, args.workers)]
        results = []
        for label, workers, threads, cores in runs:
            measured = measure(args.documents, str(tokenizer), Path(tmp) / f"w{workers}{threads}", workers, threads)
            results.append((label, cores, measured))
        baseline = results[0][2]["rate"]
        print(f"preprocess throughput: {args.documents} stdlib documents, {results[0][2]['tokens']} tokens, "
              f"{usable_cores()} usable cores")
        for label, cores, measured in results:
            print(f"  {label:32s} {measured['rate']:10.0f} tok/s  {measured['rate'] / cores:9.0f} tok/s/core  "
                  f"×{measured['rate'] / baseline:4.2f} vs 1 worker")
        identical = len({measured["digest"] for _, _, measured in results}) == 1
        print(f"  datasets byte-identical across worker counts: {identical}")
        if not identical:
            sys.exit(1)


if __name__ == "__main__":
    main()
