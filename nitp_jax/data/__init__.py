"""Data: corpus -> SentencePiece tokenizer -> ArrayRecord shards -> Grain.

  corpus.py     documents from files, directories, globs, or the default
  token_files.py  pre-tokenized documents (ArrayRecord, Parquet id lists)
  bad_records.py  malformed records: skipped, counted, refused above a limit
  heldout.py    what is held out for validation (documents or their tails)
  heldout_sets.py  eval batches per source of a mixture, losses combined by weight
  tokenizer.py  lossless SentencePiece training and loading
  prepare.py    tokenize once into shards + manifest (`ensure_prepared`)
  pipeline.py   packed, sharded, checkpointable training batches

Kept import-light: import the submodule you need.
"""

from nitp_jax.errors import DataError  # noqa: F401
