"""PH2 (Mendonca et al. 2013) in its release layout."""

from __future__ import annotations

import re
from pathlib import Path

from . import io
from .base import Sample
from .errors import DataError

PH2_FOLDER = "PH2 Dataset images"
_CASE = re.compile(r"IMD\d+")


def ph2_cases_dir(root: Path) -> Path:
    """The folder holding the IMDxxx case folders: ``root/PH2 Dataset images`` or ``root`` itself."""
    nested = root / PH2_FOLDER
    return nested if nested.is_dir() else root


def _case_sample(case: Path) -> Sample:
    case_id = case.name
    image = case / f"{case_id}_Dermoscopic_Image" / f"{case_id}.bmp"
    mask = case / f"{case_id}_lesion" / f"{case_id}_lesion.bmp"
    if not image.is_file():
        raise DataError(f"PH2 case {case} has no image: expected {image}; restore it or remove the case folder")
    if not mask.is_file():
        raise io.missing_mask(image, [mask])
    return Sample(case_id, image, mask)


def ph2_samples(root: Path) -> list[Sample]:
    """Every PH2 case under ``root``, sorted by id (IMD002, IMD003, ...)."""
    cases_dir = ph2_cases_dir(root)
    cases = sorted(path for path in cases_dir.iterdir() if path.is_dir() and _CASE.fullmatch(path.name))
    if not cases:
        raise DataError(
            f"no PH2 cases (IMDxxx folders) in {cases_dir}; point the root at the folder "
            f"holding '{PH2_FOLDER}/' or at that folder itself"
        )
    return [_case_sample(case) for case in cases]
