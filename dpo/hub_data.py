"""Which files of a hub dataset hold a split: read off the dataset card, or off the file names.

A dataset repo on the hub is a folder of data files. Which of them make up a split, and a subset
(the `datasets` library calls it a config), is said in one of two ways, and both are read here,
as the `datasets` library reads them:

1. The dataset card's YAML header (README.md) lists the configs. `push_to_hub` writes this, and
   trl-lib/ultrafeedback_binarized has exactly it::

       configs:
       - config_name: default
         data_files:
         - split: train
           path: data/train-*
         - split: test
           path: data/test-*

   In a path, `*` stays within a folder and `**` crosses folders; `data_dir` puts the paths in
   a folder. The config with ``default: true`` (else the one named "default", else the only one)
   is used when no subset is asked for.
2. Without a configs header, the layout: a subset is a top-level folder (Anthropic/hh-rlhf has
   helpful-base/, harmless-base/, ...), and a file's split is the folder it sits in when that is
   named like a split (train/, test/, ...), or else its own name without the suffix and the shard
   number: "train-00000-of-00001.parquet" and "test.jsonl.gz" are in "train" and "test".

Everything here works on the repo's file list; nothing is downloaded. A request that the repo
cannot answer raises `LayoutError`, whose message lists what the repo has instead.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

SPLIT_FOLDERS = ("train", "test", "validation", "valid", "eval", "dev")  # a folder of one split's files
_SHARD = re.compile(r"(-\d+-of-\d+|-\d{5})$")  # "train-00000-of-00003", "train-00001"


class LayoutError(ValueError):
    """The repo has no such subset or split, or its card's configs are malformed."""


def glob_regex(pattern: str) -> re.Pattern:
    """A repo path glob as a regex: ``*`` and ``?`` stay within a folder, ``**`` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


def split_of(path: str, suffix_of: Callable[[str], str | None]) -> str:
    """The split a file belongs to by its path (case 2 of the module docstring)."""
    *folders, name = path.split("/")
    for folder in reversed(folders):
        if folder in SPLIT_FOLDERS:
            return folder
    suffix = suffix_of(name) or ""
    return _SHARD.sub("", name[: len(name) - len(suffix)])


def _card_splits(config: dict, where: str) -> dict[str, list[str]]:
    """{split: [path globs]} of one config of a dataset card."""
    data_files, data_dir = config.get("data_files"), config.get("data_dir")
    prefix = f"{str(data_dir).strip('/')}/" if data_dir else ""
    if data_files is None:
        return {}  # only a data_dir: the layout inside it decides (see split_files)

    def paths(value: Any) -> list[str]:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise LayoutError(f"{where}: a data_files path must be a string or a list of strings, got {value!r}")
        return [prefix + v.removeprefix("./") for v in values]

    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files
                                                    and isinstance(data_files[0], dict)):
        return {"train": paths(data_files)}  # files without splits are the train split, as in `datasets`
    if isinstance(data_files, dict):
        return {str(split): paths(value) for split, value in data_files.items()}
    splits = {}
    for entry in data_files:
        if not isinstance(entry, dict) or "split" not in entry or "path" not in entry:
            raise LayoutError(f"{where}: each data_files entry needs 'split' and 'path', got {entry!r}")
        splits[str(entry["split"])] = paths(entry["path"])
    return splits


def _pick_config(configs: list, subset: str | None, repo: str) -> dict:
    if not all(isinstance(c, dict) for c in configs):
        raise LayoutError(f"{repo}: README.md's configs must be a list of mappings")
    names = [str(c.get("config_name", "default")) for c in configs]
    if subset is not None:
        if subset not in names:
            raise LayoutError(f"{repo} has no subset {subset!r}; its subsets: {', '.join(names)}")
        return configs[names.index(subset)]
    chosen = ([c for c in configs if c.get("default") is True] or
              [c for c, n in zip(configs, names) if n == "default"] or (configs if len(configs) == 1 else []))
    if not chosen:
        raise LayoutError(f"{repo} has several subsets ({', '.join(names)}) and none is the default: "
                          "pick one with --data-subset")
    return chosen[0]


def split_files(repo: str, files: Sequence[str], card: dict | None, split: str, subset: str | None,
                suffix_of: Callable[[str], str | None], default_subsets: Sequence[str] = ()) -> list[str]:
    """The data files of `split` (in `subset`) among a repo's `files`, sorted.

    card: the dataset card's YAML metadata (None: no card). suffix_of: the readable data suffix
    of a file name, or None for a file that is not data. default_subsets: the subset folders to
    use when none is asked for and the card names none (Anthropic/hh-rlhf's helpful-base and
    harmless-base; its other folders hold other kinds of data).
    """
    data = [f for f in files if suffix_of(f.rsplit("/", 1)[-1])]
    where = f"{repo}" + (f" (subset {subset})" if subset else "")
    configs = (card or {}).get("configs") if not (default_subsets and subset is None) else None
    if (configs and subset is not None and any(f.startswith(subset + "/") for f in data)
            and subset not in [str(c.get("config_name", "default")) for c in configs if isinstance(c, dict)]):
        configs = None  # a folder of that name, though the card's configs are named otherwise (a data_dir)
    folder = None
    if configs:
        config = _pick_config(configs if isinstance(configs, list) else [configs], subset, repo)
        splits = _card_splits(config, f"{repo}: README.md config {config.get('config_name', 'default')!r}")
        if splits:
            if split not in splits:
                raise LayoutError(f"{where} has no split {split!r}; its splits: {', '.join(splits)} "
                                  "(pick one with --data-split)")
            regexes = [glob_regex(p) for p in splits[split]]
            chosen = [f for f in data if any(r.fullmatch(f) for r in regexes)]
            if not chosen:
                raise LayoutError(f"{where}: no readable data file matches split {split!r}'s paths "
                                  f"{splits[split]} (among {len(files)} files)")
            return sorted(chosen)
        folder = str(config.get("data_dir") or "").strip("/") or None
    elif subset is not None:
        folder = subset
    if folder is not None:
        inside = [f for f in data if f.startswith(folder + "/")]
        if not inside:
            tops = sorted({f.split("/")[0] for f in data if "/" in f})
            raise LayoutError(f"{repo} has no subset {folder!r}: no data files under {folder}/"
                              + (f"; its folders with data: {', '.join(tops)}" if tops else ""))
        data = inside
    elif default_subsets:
        data = [f for f in data if f.split("/")[0] in default_subsets]
    by_split: dict[str, list[str]] = {}
    for f in data:
        by_split.setdefault(split_of(f, suffix_of), []).append(f)
    if not by_split:
        raise LayoutError(f"{where} has no readable data files among its {len(files)} files")
    if split not in by_split:
        raise LayoutError(f"{where} has no split {split!r}; its splits: {', '.join(sorted(by_split))} "
                          "(pick one with --data-split)")
    return sorted(by_split[split])
