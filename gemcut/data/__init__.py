"""The data layer: read, validate, clean, deduplicate, split, tokenize and collate a run's records.

    gemcut data prepare examples/sft_chatterbot.yaml --out prepared/
    python -m pytest -q tests/test_data_pipeline.py

It sits below the models (it never loads one: tokenizers come in as arguments) and above the config.
"""
