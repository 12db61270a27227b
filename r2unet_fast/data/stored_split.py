"""A run's train/val/test split, fixed at its start and checked against the data each time it is used.

Recomputing a split from whatever a folder holds today silently moves cases between
parts when images are added or removed: ``evaluate --split test`` would score training
images and ``--resume`` would train on former test cases. So a run stores its split
(``split_record``): the case ids of each part, the byte sizes of each case's files and a
fingerprint of those, and later uses reapply it (``apply_split``): vanished cases are an
error, new ones are left out with a note.

The fingerprint covers ids and byte sizes, not paths or mtimes, so a copy of the data
set elsewhere (``cp`` without ``-p``, another machine) matches and a different data set
does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .base import Sample
from .errors import DataError

SPLIT_FORMAT = 1
SPLIT_FILE = "split.json"
_EXAMPLES = 3


def absolute_root(root: Path | str) -> str:
    """``root`` as an absolute path without resolving symlinks: a link the user chose stays the way in."""
    return os.path.abspath(Path(root).expanduser())


def _sizes(sample: Sample) -> list[int | None]:
    """[image bytes, mask bytes (None without a mask)] of one case."""
    mask = None if sample.mask_path is None else sample.mask_path.stat().st_size
    return [sample.image_path.stat().st_size, mask]


def fingerprint(cases: dict[str, list[int | None]]) -> str:
    """Short hash of the sorted (id, image bytes, mask bytes) list."""
    canonical = json.dumps(sorted([case_id, *sizes] for case_id, sizes in cases.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def split_record(dataset: str, root: Path, scheme: str, seed: int,
                 parts: dict[str, list[Sample]]) -> dict[str, Any]:
    """The JSON-ready description of a split: dataset, absolute root, scheme, seed, ids per part,
    sizes per case and their fingerprint (stored as split.json and in every checkpoint)."""
    cases = {sample.id: _sizes(sample) for samples in parts.values() for sample in samples}
    return {"format": SPLIT_FORMAT, "dataset": dataset, "data": absolute_root(root), "scheme": scheme,
            "seed": seed, "fingerprint": fingerprint(cases),
            "parts": {part: [sample.id for sample in samples] for part, samples in parts.items()},
            "cases": cases}


def _examples(ids: list[str]) -> str:
    shown = ", ".join(ids[:_EXAMPLES])
    return f"{shown}, ..." if len(ids) > _EXAMPLES else shown


def _index(available: list[Sample]) -> dict[str, Sample]:
    by_id: dict[str, Sample] = {}
    for sample in available:
        if sample.id in by_id:
            # A stored split names cases by id, so two cases with one id cannot be told apart.
            raise DataError(f"two cases share the id {sample.id!r}: {by_id[sample.id].image_path} and "
                            f"{sample.image_path}; keep only one")
        by_id[sample.id] = sample
    return by_id


def apply_split(record: dict[str, Any], available: list[Sample],
                root: Path) -> tuple[dict[str, list[Sample]], list[str]]:
    """The stored parts of ``record`` as samples found among ``available`` (what ``root`` holds now), and
    notes to print (one line each).

    Raises DataError when cases of the run are gone from the run's own folder, or when ``root`` is another
    folder whose cases do not match the stored fingerprint (a different data set).
    """
    by_id = _index(available)
    stored: dict[str, list[int | None]] = record["cases"]
    missing = [case_id for case_id in stored if case_id not in by_id]
    changed = [case_id for case_id in stored if case_id in by_id and _sizes(by_id[case_id]) != list(stored[case_id])]
    moved = absolute_root(root) != record["data"]
    if moved and (missing or changed):
        current = {case_id: _sizes(by_id[case_id]) for case_id in stored if case_id in by_id}
        raise DataError(
            f"{root} does not hold the data set this run was trained on (fingerprint {fingerprint(current)}, the "
            f"run's is {record['fingerprint']}): {len(missing)} of its {len(stored)} cases are missing"
            + (f" (e.g. {_examples(missing)})" if missing else "")
            + f" and {len(changed)} differ in size" + (f" (e.g. {_examples(changed)})" if changed else "")
            + f"; pass the run's data (first at {record['data']}) or start a new run on this one")
    if missing:
        raise DataError(
            f"{len(missing)} of this run's {len(stored)} cases are gone from {root} (e.g. {_examples(missing)}); "
            "a run's train/val/test split is fixed at its start: restore them, or start a new run on the data "
            "as it is now")
    notes = []
    if changed:
        notes.append(f"note: {len(changed)} of this run's cases changed on disk since it started "
                     f"(e.g. {_examples(changed)}); using them as they are now")
    added = [case_id for case_id in by_id if case_id not in stored]
    if added:
        notes.append(f"note: {len(added)} case(s) in {root} are not part of this run's split (e.g. "
                     f"{_examples(added)}) and are left out: a run's split is fixed at its start")
    return {part: [by_id[case_id] for case_id in ids] for part, ids in record["parts"].items()}, notes
