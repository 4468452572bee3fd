"""One module per verb, as mlx-lm has lora.py, fuse.py, generate.py: plain functions on folders
that the worker, the CLI and the tests call alike. They import MLX (all but checks.py,
gguf_metadata.py and import_gguf.py), so the server process never imports them."""
