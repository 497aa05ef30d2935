"""Collecting human preferences: a queue of sampled completions, a ranking page, and the export of rankings.

    gemcut generate RUN_OR_MODEL prompts.jsonl --n 4    # store.py + generate.py
    gemcut label                                         # app.py + static/ (the page)
    gemcut label export --out prefs.jsonl                # export.py

See docs/preferences.md.
"""
