"""Folders written by Hugging Face ``datasets``' ``save_to_disk``, read with pyarrow alone.

``datasets`` is not needed to read them (pyarrow and polars are core dependencies), so a
``hf_dataset`` task works without the heavy ``datasets`` package. The on-disk layout, as
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write it and ``load_from_disk`` reads it
(datasets 2.x to 5.x; checked against datasets 5.2.0):

- a **Dataset** folder holds ``state.json``, whose ``_data_files`` lists the shards in order
  (``[{"filename": "data-00000-of-00001.arrow"}, ...]``), ``dataset_info.json`` (the features, not
  needed here: the Arrow schema has the columns) and the shards, each an Arrow IPC *stream* (not
  the random-access IPC file format). A saved selection or shuffle is written as its own rows:
  there is no indices file to apply;
- a **DatasetDict** folder holds ``dataset_dict.json`` (``{"splits": ["train", "test"]}``) and one
  Dataset folder per split, named after the split.

Every problem (not a folder, no ``state.json`` nor ``dataset_dict.json``, bad JSON, a shard that is
missing or not an Arrow stream, shards with different columns, an unknown split) is a one-line
``WorkbenchError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc

from workbench.errors import WorkbenchError, bad_value, one_line, parse_json, short_repr

STATE_JSON = "state.json"
DATASET_DICT_JSON = "dataset_dict.json"
DATASET_INFO_JSON = "dataset_info.json"


def _plain_name(name: object) -> bool:
    """A file or folder name inside the dataset folder: nothing a path could escape through."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"{path}: cannot read it ({short_repr(one_line(e), 120)})") from None
    return parse_json(text, str(path), "bad JSON")


@dataclass(frozen=True)
class SavedDataset:
    """A ``save_to_disk`` folder: its splits (``{"": path}`` for a single Dataset) and their folders."""

    path: Path
    splits: dict[str, Path]
    is_dict: bool

    @classmethod
    def open(cls, path: Path, task: str) -> "SavedDataset":
        if not path.is_dir():
            raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: no such folder "
                                 "(a folder written by datasets' save_to_disk)")
        if (path / DATASET_DICT_JSON).is_file():
            meta = _read_json(path / DATASET_DICT_JSON)
            splits = meta.get("splits") if isinstance(meta, dict) else None
            if not isinstance(splits, list) or not splits or not all(_plain_name(s) for s in splits) \
                    or len(set(splits)) != len(splits):
                raise WorkbenchError(f"{path / DATASET_DICT_JSON}: expected {{\"splits\": [split names]}}, "
                                     f"got {short_repr(meta, 120)}")
            return cls(path, {s: path / s for s in splits}, True)
        if (path / STATE_JSON).is_file():
            return cls(path, {"": path}, False)
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise WorkbenchError(f"{task}.path={str(path)!r} is invalid: not a save_to_disk folder (no "
                             f"{DATASET_DICT_JSON} nor {STATE_JSON}; it holds {found})")

    def check_split(self, task: str, param: str, name: object) -> str:
        """``name`` if it is a split of this DatasetDict, else a one-line error listing the splits."""
        if not self.is_dict:
            raise bad_value(f"{task}.{param}", name, f"None: {self.path} is a single Dataset (no "
                            f"{DATASET_DICT_JSON}), it has no splits; hold out with heldout_fraction")
        if not isinstance(name, str) or name not in self.splits:
            raise bad_value(f"{task}.{param}", name, f"a split of {self.path}: {', '.join(self.splits)}")
        return str(name)

    def shard_files(self, split: str) -> list[Path]:
        """The files a split is read from, in order: ``state.json``, then its shards."""
        folder = self.splits[split]
        state_path = folder / STATE_JSON
        if not state_path.is_file():
            raise WorkbenchError(f"{folder}: split {split!r} has no {STATE_JSON} (not a save_to_disk Dataset folder)")
        state = _read_json(state_path)
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list) or not files or not all(
                isinstance(f, dict) and _plain_name(f.get("filename")) for f in files):
            raise WorkbenchError(f"{state_path}: expected \"_data_files\": a list of {{\"filename\": NAME}} "
                                 f"inside the folder, got {short_repr(files, 120)}")
        return [state_path] + [folder / f["filename"] for f in files]

    def frame(self, split: str) -> pl.DataFrame:
        """One split (``""`` for a single Dataset) as a polars DataFrame: its shards concatenated."""
        tables = []
        for shard in self.shard_files(split)[1:]:
            try:
                with pa.OSFile(str(shard), "rb") as src:
                    tables.append(pa.ipc.open_stream(src).read_all())
            except (pa.ArrowException, OSError) as e:
                raise WorkbenchError(f"{shard}: not a readable Arrow IPC stream ({short_repr(one_line(e), 120)})") from None
        try:
            table = pa.concat_tables(tables)
        except pa.ArrowException as e:
            raise WorkbenchError(f"{self.splits[split]}: its shards have different columns "
                                 f"({short_repr(one_line(e), 160)})") from None
        try:
            return pl.from_arrow(table.replace_schema_metadata(None))
        except Exception as e:  # noqa: BLE001 - an Arrow type polars cannot hold (an extension type)
            raise WorkbenchError(f"{self.splits[split]}: polars cannot read its columns "
                                 f"({short_repr(one_line(e), 160)})") from None


__all__ = ["DATASET_DICT_JSON", "DATASET_INFO_JSON", "STATE_JSON", "SavedDataset"]
