"""FORMAT.md's field tables and saev_store/format.py must list the same fields."""

import pathlib
import re

import numpy as np

from conftest import make_store
from saev_store import format as fmt
from saev_store.store import open_store

DOC = (pathlib.Path(fmt.__file__).parent / "FORMAT.md").read_text()


def doc_table(heading: str) -> dict[str, str]:
    """The first markdown table after `## heading` (or after the paragraph naming it), as name -> meaning."""
    start = DOC.index(heading)
    rows = {}
    for line in DOC[start:].splitlines()[1:]:
        if line.startswith("## ") and rows:
            break
        m = re.match(r"^\| ([^|]+?) \| (.+) \|$", line)
        if m and not set(m.group(1)) <= set("-") and m.group(1) not in ("field", "array"):
            rows[m.group(1)] = m.group(2)
        elif rows and not line.startswith("|"):
            break
    return rows


def test_root_fields_match():
    assert doc_table("## Root fields") == fmt.ROOT_FIELDS


def test_hook_fields_match():
    assert doc_table("## Hook entry") == fmt.HOOK_FIELDS


def test_layout_fields_match():
    assert doc_table("## Token layout") == fmt.LAYOUT_FIELDS


def test_preprocessing_fields_match():
    from saev_store.models.preprocess import PreprocessConfig

    assert doc_table("## Preprocessing") == fmt.PREPROCESSING_FIELDS
    assert list(PreprocessConfig().to_dict()) == list(fmt.PREPROCESSING_FIELDS)  # what a store holds


def test_arrays_match():
    assert doc_table("## Arrays") == fmt.ARRAYS


def test_stats_fields_match():
    assert doc_table("group's attributes, written when") == fmt.STATS_FIELDS


def test_patch_label_fields_match():
    assert doc_table("The group's attributes:") == fmt.PATCH_LABEL_FIELDS


def _generic_arrays(st) -> set[str]:
    arrays = set()
    for name, _ in st._root.arrays():
        arrays.add(name)
    for name, grp in st._root.groups():
        for sub, _ in grp.members(max_depth=None):
            if hasattr(_, "shape"):
                arrays.add(f"{name}/{sub}")
    return {a.replace("acts/h", "acts/<hook>").replace("stats/h/patches", "stats/<hook>/<sel>")
            .replace("stats/h/cls", "stats/<hook>/<sel>").replace("stats/h/all", "stats/<hook>/<sel>")
            .replace("stats/h/", "stats/<hook>/").replace("patch_labels/2x2/", "patch_labels/<grid>/") for a in arrays}


def test_documented_fields_are_what_a_store_holds(tmp_path):
    """The tables describe real stores: every root field and hook field is written, nothing else; a
    store without patch labels holds every array but the optional ones."""
    st = make_store(tmp_path / "s.zarr", {"h": np.zeros((3, 5, 2), np.float32)})
    assert set(st.attrs) == set(fmt.ROOT_FIELDS)
    assert set(st.attrs["hooks"]["h"]) == set(fmt.HOOK_FIELDS)
    assert set(st.attrs["hooks"]["h"]["layout"]) == set(fmt.LAYOUT_FIELDS)
    assert set(fmt.OPTIONAL_ARRAYS) <= set(fmt.ARRAYS)
    assert _generic_arrays(st) == set(fmt.ARRAYS) - set(fmt.OPTIONAL_ARRAYS)


def test_patch_label_sets_hold_the_documented_arrays_and_fields(tmp_path):
    st = make_store(tmp_path / "s.zarr", {"h": np.zeros((3, 5, 2), np.float32)})
    attrs = {"grid": [2, 2], "image_size": [8, 8], "rule": "majority", "background": 0, "ignore_index": -1,
             "class_names": ["a", "b"], "source": {"kind": "folder"}}
    st = open_store(st.path, mode="r+")
    st.create_patch_labels("2x2", attrs)
    assert set(st.patch_label_sets()["2x2"]) == set(fmt.PATCH_LABEL_FIELDS)
    assert _generic_arrays(st) == set(fmt.ARRAYS)
