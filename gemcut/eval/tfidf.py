"""The classical baseline of a label task: TF-IDF features and logistic regression, trained on the run's train split.

    python -m pytest -q tests/test_eval_baselines.py
    from gemcut.eval.tfidf import tfidf_predictions
    predictions, info = tfidf_predictions(train_texts, train_labels, test_texts, validation=(val_texts, val_labels))

What a practitioner would try before fine-tuning a language model, in scikit-learn's standard form: word
unigrams and bigrams with sublinear term frequency (`TfidfVectorizer`), a multinomial logistic regression
with balanced class weights (the headline is macro-F1, which weighs every class alike). The regularisation C
is chosen from a small grid by macro-F1 on the run's validation split when there is one (1.0 otherwise), so
the baseline is tuned as honestly as the model it is compared with. Seconds on the CPU for thousands of texts.
"""

from __future__ import annotations

from collections.abc import Sequence

C_GRID = (0.3, 1.0, 3.0, 10.0)


def tfidf_model(c: float, seed: int = 0):
    """An unfitted scikit-learn pipeline: TF-IDF (word 1-2 grams, sublinear tf) -> logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
                         LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed))


def tfidf_predictions(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str], *,
                      validation: tuple[Sequence[str], Sequence[str]] | None = None, seed: int = 0) -> tuple[list[str], dict]:
    """(a label for each of `texts`, {c, validation_macro_f1, n_train, grid}) from the baseline fitted on the train texts.

    Raises ValueError when the train split holds fewer than two labels (no classifier can be fitted)."""
    from sklearn.metrics import f1_score

    if len(set(train_labels)) < 2:
        raise ValueError(f"the train split holds {len(set(train_labels))} label(s); TF-IDF needs at least two")
    best_c, best_f1, grid = 1.0, None, {}
    if validation is not None and len(validation[0]) > 0:
        for c in C_GRID:
            model = tfidf_model(c, seed).fit(list(train_texts), list(train_labels))
            grid[c] = float(f1_score(list(validation[1]), model.predict(list(validation[0])), average="macro", zero_division=0))
            if best_f1 is None or grid[c] > best_f1:
                best_c, best_f1 = c, grid[c]
    model = tfidf_model(best_c, seed).fit(list(train_texts), list(train_labels))
    predictions = [str(p) for p in model.predict(list(texts))]
    return predictions, {"c": best_c, "validation_macro_f1": best_f1, "n_train": len(train_texts),
                         "grid": {str(c): f for c, f in grid.items()}}
