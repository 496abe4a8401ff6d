"""Tables of examples (CSV, JSON Lines, Parquet, or a dataset saved with HF ``datasets``), read
through HF ``datasets``; the text-classification task built from one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from structpeft.workflow.tasks.base import Task, TaskError, make_task

TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "question")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target", "sentiment")


def is_table(path: Path) -> bool:
    return (path.is_file() and _suffix(path) in TABLE_FORMATS) or is_saved_dataset(path)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return suffixes[-1].lower() if suffixes else ""


def read_table(path: Path) -> dict[str, Any]:
    """The splits of a table as HF ``datasets.Dataset`` objects: ``{"train": ...}`` for a file,
    every saved split for a saved ``DatasetDict``."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        kwargs = {"delimiter": "\t"} if _suffix(path) == ".tsv" else {}
        return {
            "train": datasets.load_dataset(TABLE_FORMATS[_suffix(path)], data_files=str(path), split="train", **kwargs)
        }
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise TaskError(f"cannot read {path} as a table: {e}") from e


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], role: str, path: Path) -> str:
    """The column named by the user, else the one obvious candidate; otherwise an error listing the columns."""
    flag = f"--{role}-column"
    if wanted is not None:
        if wanted not in columns:
            raise TaskError(f"{path}: no column {wanted!r} ({flag}); its columns are {', '.join(columns)}")
        return wanted
    found = [c for c in candidates if c in columns]
    if not found:
        raise TaskError(f"{path}: no {role} column found by name; name it with {flag} (columns: {', '.join(columns)})")
    return found[0]


def label_encoding(values: list[Any], names: list[str] | None, path: Path, column: str) -> tuple[list[int], list[str]]:
    """Integer labels and class names. Strings become classes in sorted order; integers 0..K-1 are
    classes already; anything else (floats, missing values) is not a class."""
    if any(v is None or v == "" for v in values):
        raise TaskError(f"{path}: column {column!r} has missing labels")
    if names is not None:  # a datasets ClassLabel carries its own names
        return [int(v) for v in values], list(names)
    if all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        index = {c: i for i, c in enumerate(classes)}
        return [index[v] for v in values], classes
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise TaskError(f"{path}: column {column!r} has negative labels; classes are 0..K-1 or strings")
        return list(values), [str(i) for i in range(max(values) + 1)]
    bad = next(v for v in values if not isinstance(v, str | int) or isinstance(v, bool))
    raise TaskError(f"{path}: column {column!r} holds {bad!r}, which is not a class (use integers 0..K-1 or strings)")


def text_classification(
    splits: dict[str, Any], path: Path, *, text_column: str | None, label_column: str | None, **kw: Any
) -> Task:
    """Text and label columns; the classes are the labels found in every split."""
    columns = list(splits["train"].column_names)
    text = pick_column(columns, text_column, TEXT_COLUMNS, "text", path)
    label = pick_column(columns, label_column, LABEL_COLUMNS, "label", path)
    feature = splits["train"].features[label]
    names = list(feature.names) if hasattr(feature, "names") else None
    raw = {s: splits[s] for s in ("train", "test") if s in splits}
    all_labels = [v for s in raw.values() for v in s[label]]
    encoded, classes = label_encoding(all_labels, names, path, label)
    examples, start = {}, 0
    for split, data in raw.items():
        texts = data[text]
        if any(not isinstance(t, str) for t in texts):
            raise TaskError(f"{path}: column {text!r} has values that are not text")
        examples[split] = [{"text": t, "label": y} for t, y in zip(texts, encoded[start : start + len(texts)])]
        start += len(texts)
    source = {"path": str(path), "text_column": text, "label_column": label}
    return make_task(
        path.name,
        "text-classification",
        examples["train"],
        examples.get("test"),
        label_names=classes,
        source=source,
        **kw,
    )


def rotten_tomatoes(*, val_size: float | int, seed: int, **sizes: Any) -> Task:
    """Rotten Tomatoes snippets (fresh/rotten), split by movie (the package's own test split)."""
    from structpeft.zoo.rotten_tomatoes import LABELS, load_rotten_tomatoes

    train, test = load_rotten_tomatoes()
    as_dicts = lambda split: [{"text": e.text, "label": e.label} for e in split]  # noqa: E731
    return make_task(
        "rotten-tomatoes",
        "text-classification",
        as_dicts(train),
        as_dicts(test),
        val_size=val_size,
        seed=seed,
        label_names=list(LABELS),
        source={"preset": "rotten-tomatoes"},
        **sizes,
    )


SENTIMENT_WORDS = ("negative", "positive")  # the answers, by Rotten Tomatoes' label (rotten, fresh)


def sentiment_prompt(review: str) -> str:
    return f"Is this movie review positive or negative? Answer with one word.\n\n{review}"


def rotten_tomatoes_generation(*, val_size: float | int, seed: int, **sizes: Any) -> Task:
    """Rotten Tomatoes as a causal-LM task: each review a prompt whose completion is one word, ``negative`` or
    ``positive``. Its ``label_names`` are those words, so a causal-LM evaluation scores accuracy by which
    answer the model finds likelier (the same splits as ``rotten-tomatoes``)."""
    from structpeft.zoo.rotten_tomatoes import load_rotten_tomatoes

    train, test = load_rotten_tomatoes()
    as_dicts = lambda split: [  # noqa: E731
        {"prompt": sentiment_prompt(e.text), "completion": SENTIMENT_WORDS[e.label], "label": e.label} for e in split
    ]
    return make_task(
        "rotten-tomatoes-generation",
        "causal-lm",
        as_dicts(train),
        as_dicts(test),
        val_size=val_size,
        seed=seed,
        label_names=list(SENTIMENT_WORDS),
        source={"preset": "rotten-tomatoes-generation", "fields": ["prompt", "completion"]},
        **sizes,
    )


def wordnet_definitions(*, val_size: float | int, seed: int, **sizes: Any) -> Task:
    """WordNet glosses as prompt/completion rows (a word's definition), each text once, split by gloss."""
    from structpeft.zoo.wordnet import definition_prompt, is_test_gloss, load_glosses

    rows: dict[tuple[str, str], bool] = {}  # (prompt, completion) -> held out for test
    for gloss in load_glosses():
        rows.setdefault((definition_prompt(gloss), gloss.definition), is_test_gloss(gloss))
    train = [{"prompt": p, "completion": c} for (p, c), held_out in rows.items() if not held_out]
    test = [{"prompt": p, "completion": c} for (p, c), held_out in rows.items() if held_out]
    return make_task(
        "wordnet-definitions",
        "causal-lm",
        train,
        test,
        val_size=val_size,
        seed=seed,
        source={"preset": "wordnet-definitions", "fields": ["prompt", "completion"]},
        **sizes,
    )
