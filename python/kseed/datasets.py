"""Instruction data for the driver: Dolly-15K jsonl, Natural Instructions 2.x, and the embedded
synthetic generator; the prompt templates (the reference code's, Alpaca's); federated partitions (Dirichlet over categories with a
minimum per client, IID, one client per NI task).

An example is a dict {"instruction", "input", "output", "category"}; the loss is on the output only.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


class DataError(ValueError):
    """Input data that is missing, unreadable or malformed (the message names the file and problem)."""


# The FedKSeed reference code's Dolly / Natural Instructions template: no newline after "### Response:",
# the target (response + EOS) follows directly.
REFERENCE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                   "further context. Write a response for the task request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
REFERENCE_NO_INPUT = ("Below is an instruction that describes a task. Write a response for the task "
                      "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
# The standard Alpaca wording (kseed's earlier default, --prompt alpaca).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = {"reference": (REFERENCE_INPUT, REFERENCE_NO_INPUT),
             "alpaca": (PROMPT_INPUT, PROMPT_NO_INPUT)}


def format_prompt(ex: dict, style: str = "reference") -> str:
    """The prompt of an example in the template ``style`` (reference | alpaca); the response follows
    it and the loss covers the response only."""
    if style not in TEMPLATES:
        raise ValueError(f"unknown prompt template {style!r}; choose one of {sorted(TEMPLATES)}")
    with_input, without = TEMPLATES[style]
    if ex.get("input"):
        return with_input.format(instruction=ex["instruction"], input=ex["input"])
    return without.format(instruction=ex["instruction"])


# ------------------------------------------------------------------------------------ Dolly
def load_dolly(path: str) -> List[dict]:
    """Dolly-15K jsonl: one object per line with instruction, context, response, category (UTF-8; a
    leading byte-order mark is allowed, as are the Natural Instructions files')."""
    if not os.path.isfile(path):
        raise DataError(f"Dolly data file not found: {path}")
    out = []
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{ln}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{ln}: expected a JSON object")
                for key in ("instruction", "response", "category"):
                    if not isinstance(row.get(key), str):
                        raise DataError(f"{path}:{ln}: field {key!r} missing or not a string")
                ctx = row.get("context", "")
                if not isinstance(ctx, str):
                    raise DataError(f"{path}:{ln}: field 'context' is not a string")
                out.append({"instruction": row["instruction"], "input": ctx,
                            "output": row["response"], "category": row["category"]})
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read Dolly data {path}: {exc}") from None
    if not out:
        raise DataError(f"Dolly data file {path} holds no examples")
    return out


def split_heldout_category(examples: List[dict], category: Optional[str] = None,
                           index: int = 7) -> Tuple[List[dict], List[dict], str]:
    """(train, test, held-out category): the category named, else the sorted categories' ``index``-th
    (the reference holds out index 7), else the last one."""
    cats = sorted({e["category"] for e in examples})
    if len(cats) < 2:
        raise DataError(f"need at least 2 categories to hold one out, found {cats}")
    if category is None:
        category = cats[index] if index < len(cats) else cats[-1]
    elif category not in cats:
        raise DataError(f"held-out category {category!r} not in the data; categories: {cats}")
    train = [e for e in examples if e["category"] != category]
    test = [e for e in examples if e["category"] == category]
    return train, test, category


# ------------------------------------------------------------------------ Natural Instructions
def _read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise DataError(f"Natural Instructions split file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _load_ni_task(root: str, task: str) -> List[dict]:
    path = os.path.join(root, "tasks", task + ".json")
    if not os.path.isfile(path):
        raise DataError(f"Natural Instructions task file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read task {path}: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("Instances"), list):
        raise DataError(f"{path}: expected an object with an 'Instances' list")
    definition = obj.get("Definition", "")
    if isinstance(definition, list):
        definition = definition[0] if definition else ""
    if not isinstance(definition, str):
        raise DataError(f"{path}: 'Definition' must be a string or a list of strings")
    out = []
    for i, inst in enumerate(obj["Instances"]):
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            raise DataError(f"{path}: instance {i} has no string 'input'")
        outs = inst.get("output")
        if isinstance(outs, str):
            outs = [outs]
        if not outs or not isinstance(outs, list) or not isinstance(outs[0], str):
            raise DataError(f"{path}: instance {i} has no 'output'")
        out.append({"instruction": definition, "input": inst["input"], "output": outs[0],
                    "category": task})
    return out


def load_natural_instructions(root: str, *, seed: int = 0, min_instances: int = 20,
                              train_fraction: float = 0.2, test_min: int = 20,
                              test_fraction: float = 0.02) -> Tuple[List[List[dict]], List[dict]]:
    """(client partitions, test examples): one client per training task (tasks with fewer than
    ``min_instances`` skipped; ``train_fraction`` of each task's instances used), test tasks sampled at
    max(test_min, test_fraction of the task)."""
    if not os.path.isdir(root):
        raise DataError(f"Natural Instructions directory not found: {root}")
    split = os.path.join(root, "splits", "default")
    train_tasks = _read_lines(os.path.join(split, "train_tasks.txt"))
    test_tasks = _read_lines(os.path.join(split, "test_tasks.txt"))
    rng = random.Random(seed)
    clients = []
    for task in train_tasks:
        ex = _load_ni_task(root, task)
        if len(ex) < min_instances:
            continue
        n = max(1, int(len(ex) * train_fraction))
        clients.append(rng.sample(ex, n))
    if not clients:
        raise DataError(f"{root}: no training task has at least {min_instances} instances")
    test = []
    for task in test_tasks:
        ex = _load_ni_task(root, task)
        n = min(len(ex), max(test_min, int(len(ex) * test_fraction)))
        test.extend(rng.sample(ex, n))
    if not test:
        raise DataError(f"{root}: the test tasks hold no instances")
    return clients, test


# -------------------------------------------------------------------------------- partitions
def partition_iid(n_examples: int, num_clients: int, seed: int) -> List[List[int]]:
    if num_clients > n_examples:
        raise DataError(f"cannot give {num_clients} clients at least one example each from "
                        f"{n_examples} examples")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x11D]))
    perm = rng.permutation(n_examples)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(categories: Sequence[str], num_clients: int, alpha: float, seed: int,
                        min_per_client: int = 10, max_tries: int = 1000) -> List[List[int]]:
    """Dirichlet(alpha) over categories: each category's examples are split among the clients by a
    Dirichlet draw, redrawn until every client holds at least ``min_per_client`` examples (at least
    one, whatever ``min_per_client`` says: a client without data cannot train)."""
    min_per_client = max(1, min_per_client)
    n = len(categories)
    if num_clients * min_per_client > n:
        raise DataError(f"cannot give {num_clients} clients at least {min_per_client} examples each "
                        f"from {n} examples; lower --num-clients or --min-per-client")
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD1C]))
    by_cat: Dict[str, List[int]] = {}
    for i, c in enumerate(categories):
        by_cat.setdefault(c, []).append(i)
    for _ in range(max_tries):
        parts: List[List[int]] = [[] for _ in range(num_clients)]
        for cat in sorted(by_cat):
            idx = np.array(by_cat[cat])
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_per_client:
            return [sorted(p) for p in parts]
    raise DataError(f"no Dirichlet(alpha={alpha}) partition with at least {min_per_client} examples "
                    f"per client found in {max_tries} draws; raise alpha or lower the minimum")


# -------------------------------------------------------------------------- embedded synthetic
_ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "horse": "neigh",
            "sheep": "baa", "pig": "oink", "frog": "croak", "bird": "tweet", "lion": "roar",
            "owl": "hoot", "bee": "buzz", "mouse": "squeak", "goat": "bleat", "wolf": "howl"}
_FRUITS = {"apple": "red", "banana": "yellow", "lime": "green", "plum": "purple",
           "orange": "orange", "cherry": "red", "grape": "purple", "lemon": "yellow",
           "pear": "green", "kiwi": "brown", "peach": "pink", "melon": "green"}
_NAMES = ["Tom", "Anna", "Ben", "Lucy", "Max", "Mia", "Sam", "Eva", "Leo", "Zoe", "Noah", "Ida"]
_CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Berlin", "Madrid", "Dublin"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_WEATHER = ["sunny", "rainy", "cold", "warm", "windy", "cloudy"]
_PLACES = ["park", "garden", "forest", "field", "river", "barn"]

EMBEDDED_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing",
                       "general_qa", "information_extraction", "open_qa", "summarization")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _gen_one(cat: str, r: random.Random) -> dict:
    an = sorted(_ANIMALS)
    fr = sorted(_FRUITS)
    if cat == "open_qa":
        x = r.choice(an)
        return dict(instruction=f"What sound does {_a(x)} make?", input="",
                    output=f"{_a(x).capitalize()} says {_ANIMALS[x]}.")
    if cat == "general_qa":
        x = r.choice(fr)
        return dict(instruction=f"What color is {_a(x)}?", input="",
                    output=f"{_a(x).capitalize()} is {_FRUITS[x]}.")
    if cat == "classification":
        x = r.choice(an + fr)
        kind = "animal" if x in _ANIMALS else "fruit"
        return dict(instruction=f"Is {_a(x)} an animal or a fruit?", input="",
                    output=f"{_a(x).capitalize()} is {_a(kind)}.")
    if cat == "closed_qa":
        n1, n2 = r.sample(_NAMES, 2)
        c1, c2 = r.sample(_CITIES, 2)
        return dict(instruction=f"Where does {n1} live?",
                    input=f"{n1} lives in {c1}. {n2} lives in {c2}.", output=f"{n1} lives in {c1}.")
    if cat == "information_extraction":
        n1, n2 = r.sample(_NAMES, 2)
        d = r.choice(_DAYS)
        h = r.randint(1, 12)
        return dict(instruction=f"On what day does {n1} meet {n2}?",
                    input=f"{n1} meets {n2} on {d} at {h} o'clock.", output=f"On {d}.")
    if cat == "brainstorming":
        pool = an if r.random() < 0.5 else fr
        kind = "animals" if pool is an else "fruits"
        xs = r.sample(pool, 3)
        return dict(instruction=f"Name three {kind}.", input="", output=f"{xs[0]}, {xs[1]} and {xs[2]}.")
    if cat == "creative_writing":
        x = r.choice(an)
        p = r.choice(_PLACES)
        return dict(instruction=f"Write a sentence about {_a(x)} in the {p}.", input="",
                    output=f"The {x} walks in the {p} and says {_ANIMALS[x]}.")
    if cat == "summarization":
        n = r.choice(_NAMES)
        c = r.choice(_CITIES)
        d = r.choice(_DAYS)
        w = r.choice(_WEATHER)
        f = r.choice(fr)
        return dict(instruction="Summarize the text in one sentence.",
                    input=f"{n} went to {c} on {d}. The weather was {w}. {n} ate {_a(f)}.",
                    output=f"{n} went to {c} on {d}.")
    raise ValueError(f"unknown embedded category {cat!r}")


def generate_embedded(n: int, seed: int, categories: Sequence[str] = EMBEDDED_CATEGORIES) -> List[dict]:
    """``n`` synthetic instruction examples, categories in turn, deterministic in ``seed``."""
    r = random.Random(f"kseed-embedded-{seed}")
    out = []
    for i in range(n):
        cat = categories[i % len(categories)]
        ex = _gen_one(cat, r)
        ex["category"] = cat
        out.append(ex)
    return out


# ------------------------------------------------------------------- `datasets` sources (kseed[hf])
HF_EXTRA = "pip install 'kseed[hf]' (the datasets library)"
# The fields of an example and the column names recognised for each without --columns, in order:
# Alpaca's (instruction / input / output) and Dolly's (instruction / context / response / category).
FIELDS = ("instruction", "input", "output", "category")
KNOWN_COLUMNS = {"instruction": ("instruction",), "input": ("input", "context"),
                 "output": ("output", "response"), "category": ("category",)}
NO_CATEGORY = "all"  # the category of every example of a source without a category column
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def parse_columns(spec: Optional[str]) -> Dict[str, str]:
    """``instruction=q,input=ctx,output=a,category=topic`` -> {field: column}; ValueError naming the
    problem."""
    if not spec:
        return {}
    out: Dict[str, str] = {}
    for item in spec.split(","):
        field, sep, col = (s.strip() for s in item.partition("="))
        if not sep or not col:
            raise ValueError(f"--columns: {item!r} is not FIELD=COLUMN (fields: {', '.join(FIELDS)})")
        if field not in FIELDS:
            raise ValueError(f"--columns: unknown field {field!r}; choose from {', '.join(FIELDS)}")
        if field in out:
            raise ValueError(f"--columns: {field} given twice")
        out[field] = col
    return out


def is_saved_dataset(path: str) -> bool:
    """A `datasets` save_to_disk directory (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in (
        "dataset_dict.json", "dataset_info.json", "state.json"))


def is_table_source(path: str) -> bool:
    """A source load_table reads: a save_to_disk directory, a parquet / csv / json(l) file, or a
    directory of such files (a data set's hub-cache snapshot)."""
    if os.path.isfile(path):
        return os.path.splitext(path)[1].lower() in TABLE_SUFFIXES
    return is_saved_dataset(path) or bool(_table_files(path))


def _table_files(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    found = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found += [os.path.join(d, f) for f in sorted(files)
                  if os.path.splitext(f)[1].lower() in TABLE_SUFFIXES and not f.startswith(".")]
    train = [f for f in found if "train" in os.path.relpath(f, root).lower()]
    return train or found


def _require_datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {path}: reading it needs the `datasets` library: {HF_EXTRA}") from None
    datasets.disable_progress_bars()  # kseed-fed shows its own progress
    return datasets


def _saved_split_is_empty(d: str) -> bool:
    """A save_to_disk Dataset directory written from no rows (0 shards: `datasets` cannot load it)."""
    try:
        with open(os.path.join(d, "state.json"), "r", encoding="utf-8") as f:
            return json.load(f).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _read_rows(path: str) -> Tuple[list, List[str], str]:
    """(rows as dicts, column names, what was read) of a `datasets` source."""
    datasets = _require_datasets(path)
    import tempfile
    try:
        if is_saved_dataset(path):
            if _saved_split_is_empty(path):
                raise DataError(f"{path} holds no examples (an empty split)")
            ds = datasets.load_from_disk(path)
            what = path
            if isinstance(ds, datasets.DatasetDict):
                splits = sorted(ds)
                if not splits:
                    raise DataError(f"{path}: the saved DatasetDict holds no split")
                split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
                if split is None:
                    raise DataError(f"{path}: several splits {splits} and none is 'train'")
                ds, what = ds[split], f"{path} (split {split})"
        else:
            files = [path] if os.path.isfile(path) else _table_files(path)
            if not files:
                raise DataError(f"{path}: no parquet, csv, json or jsonl data files found")
            kinds = {TABLE_SUFFIXES[os.path.splitext(f)[1].lower()] for f in files}
            if len(kinds) > 1:
                raise DataError(f"{path}: data files of several formats ({sorted(kinds)})")
            with tempfile.TemporaryDirectory(prefix="kseed-datasets-") as cache:
                ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train",
                                           cache_dir=cache, keep_in_memory=True)
                rows = ds.to_list()
            return rows, list(ds.column_names), path
    except DataError:
        raise
    except Exception as exc:  # datasets / pyarrow raise many kinds
        raise DataError(f"cannot read {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return ds.to_list(), list(ds.column_names), what


def load_table(path: str, columns: Optional[str] = None) -> List[dict]:
    """Examples from a `datasets` source (load_from_disk directory, parquet / csv / json / jsonl
    file, or a directory of them): each FIELDS entry from the column ``columns`` maps it to, else
    the first of KNOWN_COLUMNS present.  instruction and output are required; a missing input is
    "", a missing category NO_CATEGORY.  DataError naming the column and file for a missing column,
    an empty split or a value that is not a string."""
    mapping = parse_columns(columns)
    rows, names, what = _read_rows(path)
    if not rows:
        raise DataError(f"{what} holds no examples (an empty split)")
    pick: Dict[str, Optional[str]] = {}
    for field in FIELDS:
        if field in mapping:
            if mapping[field] not in names:
                raise DataError(f"{what}: no column {mapping[field]!r} (--columns {field}=...); "
                                f"its columns: {names}")
            pick[field] = mapping[field]
        else:
            pick[field] = next((c for c in KNOWN_COLUMNS[field] if c in names), None)
            if pick[field] is None and field in ("instruction", "output"):
                raise DataError(f"{what}: no {field} column (looked for "
                                f"{' / '.join(KNOWN_COLUMNS[field])}; its columns: {names}); map "
                                f"one with --columns {field}=COLUMN")
    out = []
    for i, row in enumerate(rows):
        ex = {}
        for field in FIELDS:
            col = pick[field]
            v = row.get(col) if col is not None else None
            if v is None and field in ("input", "category"):
                v = "" if field == "input" else NO_CATEGORY
            if not isinstance(v, str):
                raise DataError(f"{what}: row {i}: column {col!r} ({field}) must be a string, got "
                                f"{type(v).__name__}")
            ex[field] = v
        out.append(ex)
    return out


def looks_like_dolly(path: str) -> bool:
    """A jsonl file whose first record has Dolly's ``response`` (load_dolly reads it as ever);
    another jsonl is a `datasets` source (load_table)."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and "response" in row
    except (OSError, UnicodeDecodeError, ValueError):
        return True  # load_dolly names the problem
    return True


def split_heldout_random(examples: List[dict], size: int, seed: int
                         ) -> Tuple[List[dict], List[dict], str]:
    """(train, test, description) for data without categories: ``size`` examples drawn with
    ``seed`` are held out."""
    if len(examples) < 2 * size:
        size = max(1, len(examples) // 5)
    if len(examples) < 2:
        raise DataError(f"need at least 2 examples to hold some out, found {len(examples)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E1D]))
    held = set(int(i) for i in rng.choice(len(examples), size, replace=False))
    train = [e for i, e in enumerate(examples) if i not in held]
    test = [e for i, e in enumerate(examples) if i in held]
    return train, test, f"{size} random examples"
