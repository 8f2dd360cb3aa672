"""Export to and import from HuggingFace transformers checkpoints.

`nitp_jax.export.hf` has `export_hf`, `import_hf` and the CLI
`python -m nitp_jax.export.hf --workdir=DIR --out=HF_DIR [--step=N]`.
Nothing is imported here, so `python -m` runs the module only once.
"""
