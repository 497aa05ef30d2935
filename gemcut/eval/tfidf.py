"""The classical baseline of a label task: TF-IDF features and logistic regression, trained on the run's train split.

    python -m pytest -q tests/test_eval_baselines.py
    from gemcut.eval.tfidf import tfidf_predictions
    predictions, info = tfidf_predictions(train_texts, train_labels, test_texts, validation=(val_texts, val_labels))

What a practitioner would try before fine-tuning a language model, in scikit-learn's standard form: word
unigrams and bigrams with sublinear term frequency (`TfidfVectorizer`; n-grams seen at least twice once the
split has 1,000 texts), a multinomial logistic regression with balanced class weights (the headline is
macro-F1, which weighs every class alike).

The regularisation C: on a train split of at most `GRID_UP_TO` texts it is chosen from `C_GRID` by macro-F1
on the run's validation split (fits are cheap there and the choice matters most); on a larger split it is
scikit-learn's default 1.0, because each fit then costs tens of seconds on a 2-core CPU. Measured on the
quickstart's 29,487 tweets (2026-12-03, a busy 2-core machine): one fit 23 s; the grid's best (C=3) scored
0.731 validation macro-F1 against 0.726 at C=1, for about 90 s more.
"""

from __future__ import annotations

from collections.abc import Sequence

C_GRID = (0.3, 1.0, 3.0, 10.0)
GRID_UP_TO = 5000


def tfidf_features(train_texts: Sequence[str]):
    """A TF-IDF vectorizer fitted on the train texts (word 1-2 grams, sublinear tf, min_df 2 from 1,000 texts)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True,
                           min_df=2 if len(train_texts) >= 1000 else 1).fit(list(train_texts))


def logistic_regression(c: float, seed: int = 0):
    """An unfitted multinomial logistic regression with balanced class weights."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)


def tfidf_predictions(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str], *,
                      validation: tuple[Sequence[str], Sequence[str]] | None = None, seed: int = 0) -> tuple[list[str], dict]:
    """(a label for each of `texts`, {c, validation_macro_f1, n_train, n_features, grid}) from the baseline fitted on
    the train texts (module docstring).

    Raises ValueError when the train split holds fewer than two labels (no classifier can be fitted)."""
    from sklearn.metrics import f1_score

    if len(set(train_labels)) < 2:
        raise ValueError(f"the train split holds {len(set(train_labels))} label(s); TF-IDF needs at least two")
    vectorizer = tfidf_features(train_texts)
    x, y = vectorizer.transform(list(train_texts)), list(train_labels)
    best, best_c, best_f1, grid = None, 1.0, None, {}
    if validation is not None and len(validation[0]) > 0 and len(train_texts) <= GRID_UP_TO:
        x_val = vectorizer.transform(list(validation[0]))
        for c in C_GRID:
            model = logistic_regression(c, seed).fit(x, y)
            grid[c] = float(f1_score(list(validation[1]), model.predict(x_val), average="macro", zero_division=0))
            if best_f1 is None or grid[c] > best_f1:
                best, best_c, best_f1 = model, c, grid[c]
    if best is None:
        best = logistic_regression(best_c, seed).fit(x, y)
    predictions = [str(p) for p in best.predict(vectorizer.transform(list(texts)))]
    return predictions, {"c": best_c, "validation_macro_f1": best_f1, "n_train": len(train_texts), "n_features": x.shape[1],
                         "grid": {str(c): f for c, f in grid.items()}}
