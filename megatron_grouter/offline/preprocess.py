"""mg-preprocess: a corpus in the format it ships in → tokenizer and megatron indexed dataset.

Inputs: text files, JSON lines (.jsonl / .json, or a JSON array), any of them .gz / .zst / .bz2 /
.xz compressed, .parquet, .arrow, a Hugging Face `datasets` directory (save_to_disk), a directory
(every file, or --suffixes), glob patterns, several of these, or 'stdlib' (this Python's standard
library). What is skipped, and why, is printed.

  mg-preprocess --input stdlib --train-tokenizer --vocab-size 4096 --output-prefix data/stdlib/stdlib
  mg-preprocess --input 'c4/en/c4-train.*.json.gz' --tokenizer /models/Qwen3-30B-A3B --output-prefix data/c4/c4
  mg-preprocess --input perl/ --suffixes .pm,.pl --train-tokenizer --output-prefix data/perl/perl
Writes <output-prefix>_text_document.bin/.idx/.meta.json (and <dir>/tokenizer/ when training one).
Tokenises with one process per core (--workers); the output does not depend on the worker count.
"""

from __future__ import annotations

import argparse
import logging
import sys
from itertools import islice
from pathlib import Path

from megatron_grouter.app import command_status
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mg-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+",
                        help="files, directories, glob patterns, a datasets directory, or 'stdlib'")
    parser.add_argument("--text-field", "--jsonl-key", dest="text_field", default="text",
                        help="record field / column holding the text (JSON lines, parquet, arrow; default: text)")
    parser.add_argument("--suffixes", default=None,
                        help="in directories, read only files ending in these (comma-separated, e.g. .pm,.pl); "
                             "default: every file that is not binary or hidden")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="a tokenizer.json or a local Hugging Face model directory")
    source.add_argument("--train-tokenizer", action="store_true",
                        help="train a byte-level BPE on the input (saved beside the output)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (with --train-tokenizer)")
    parser.add_argument("--output-prefix", required=True, help="output path prefix")
    parser.add_argument("--max-documents", type=int, default=None, help="use only the first N documents")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenising processes (default: one per usable core; 1: in this process)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def preprocess(args: argparse.Namespace) -> str:
    from megatron_grouter.data.corpus import iter_documents, resolve_corpus
    from megatron_grouter.data.default_corpus import BPE_SAMPLE_EVERY
    from megatron_grouter.data.indexed import write_indexed_dataset
    from megatron_grouter.data.tokenizer import load_tokenizer, train_byte_level_bpe

    if args.vocab_size < 300:
        raise UserError(f"--vocab-size {args.vocab_size} is below the 256 byte symbols plus merges; use ≥ 300")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}; use 1 (tokenise in this process) or more")
    output_prefix = f"{args.output_prefix}_text_document"
    plan = resolve_corpus(args.input, args.text_field, args.suffixes)
    log.info("%s", plan.summary())
    if args.train_tokenizer:
        texts = (document.text for document in islice(
            iter_documents(plan, args.text_field, args.max_documents), 0, None, BPE_SAMPLE_EVERY))
        tokenizer_dir = Path(args.output_prefix).parent / "tokenizer"
        tokenizer = train_byte_level_bpe(texts, args.vocab_size, tokenizer_dir)
        log.info("trained a %d-token byte-level BPE -> %s", tokenizer.vocab_size, tokenizer_dir)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    info = write_indexed_dataset(iter_documents(plan, args.text_field, args.max_documents),
                                 tokenizer, output_prefix, source=plan.description, workers=args.workers,
                                 progress=not args.no_progress,
                                 extra_meta={"text_field": args.text_field, "skipped": plan.skipped_counts()})
    log.info("%d documents, %d tokens -> %s.bin/.idx (%d undecodable characters replaced)",
             info.num_documents, info.num_tokens, output_prefix, info.replaced_chars)
    return output_prefix


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from megatron_grouter.data.output_dirs import removed_if_failed

    def job() -> str:
        with removed_if_failed(Path(args.output_prefix).parent):  # a refusal leaves no empty directory
            return preprocess(args)

    return command_status(job)


if __name__ == "__main__":
    sys.exit(main())
