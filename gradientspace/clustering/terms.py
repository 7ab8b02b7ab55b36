"""What a cluster is about, in words: each cluster's most distinctive terms, by class-based TF-IDF.

Without labels a cluster is only a list of ids. As BERTopic names its topics, the records of each
cluster are pooled into one document and every term is weighted by how often the cluster uses it
against how common it is over all clusters:

        W(t, c) = tf(t, c) · log(1 + A / f(t))

with tf(t, c) the term's share of cluster c's words, f(t) its count over every cluster, and A the
mean number of words per cluster. A term frequent in one cluster and rare elsewhere scores high;
one every cluster uses (`the`, `answer`) scores near zero. Counting is scikit-learn's
`CountVectorizer` (English stop words dropped); only the weighting is written here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from gradientspace.data.records import Record

TERMS_PER_CLUSTER = 8
TERMS_SAMPLE = (
    100_000  # records counted at most (a seeded sample): the terms of a million records are those of a hundred thousand
)


def record_text(record: Record) -> str:
    """What a record says: its prompt turns and its answer."""
    return " ".join(turn["content"] for turn in record.messages) + " " + record.response


def class_tfidf(counts, labels: np.ndarray, groups: int) -> np.ndarray:
    """W (groups × terms) from a documents × terms count matrix and each document's group."""
    from scipy.sparse import csr_matrix

    membership = csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(groups, len(labels)))
    per_group = np.asarray((membership @ counts).todense(), dtype=np.float64)  # groups × terms
    words = per_group.sum(axis=1, keepdims=True)
    tf = per_group / np.maximum(words, 1)
    idf = np.log1p(words.mean() / np.maximum(per_group.sum(axis=0), 1))
    return tf * idf


def cluster_terms(
    records: Sequence[Record], labels: Sequence[int], groups: int, top: int = TERMS_PER_CLUSTER, seed: int = 0
) -> dict[str, list[str]]:
    """Each group's `top` most distinctive terms (by class-based TF-IDF), keyed by the group's number as a string.

    A group whose records hold no countable word (numbers only, or too few records) gets an empty list."""
    from sklearn.feature_extraction.text import CountVectorizer

    chosen = (
        sorted(random.Random(f"terms-{seed}").sample(range(len(records)), TERMS_SAMPLE))
        if len(records) > TERMS_SAMPLE
        else range(len(records))
    )
    texts = [record_text(records[i]) for i in chosen]
    # words of two letters or more; numbers and code punctuation carry no name
    vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b", lowercase=True)
    try:
        counts = vectorizer.fit_transform(texts)
    except ValueError:  # no word at all in any record
        return {str(g): [] for g in range(groups)}
    weights = class_tfidf(counts, np.asarray([labels[i] for i in chosen]), groups)
    vocabulary = vectorizer.get_feature_names_out()
    terms = {}
    for group in range(groups):
        order = np.argsort(-weights[group], kind="stable")[:top]
        terms[str(group)] = [str(vocabulary[t]) for t in order if weights[group, t] > 0]
    return terms
