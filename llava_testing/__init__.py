"""Helpers for tests, fixtures, benchmarks and the demo's training scripts, apart from the
runtime package (`mlx_llava`). Installed with it (``pip install -e ".[cpu,test]"``, editable: some
helpers find the checkout's examples and fixtures beside them), so nothing edits `sys.path`.

- `checkpoints`: tiny random llava-hf checkpoints written with MLX (no torch).
- `oracles`, `original_tokenization`: the transformers-built fixtures and their oracle outputs
  (tests/fixtures/make_fixtures.py and the live-oracle test run them; torch needed).
- `tokenizer_builder`: small tokenizers trained on a built-in corpus.
- `serving`: a live uvicorn server, `WorkerGate` (the worker's moments to wait on), request
  helpers, a headless Chromium.
- `cli`, `parity`, `pictures`, `videos`: running a command line in-process, parity tolerances,
  seeded pictures, seeded clips written with PyAV.
- `launching`, `pipeline_tokens`: processes under mlx.launch, the pipeline tests' tokens.
"""
