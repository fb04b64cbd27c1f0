"""Fuzzing (hypothesis) of what users hand us: manifests, class folders, image bytes, names.

Each property states what must hold for *any* input: every row or file is accounted for
(a sample, or ignored with a reason), bad ones are reported rather than raised, and the
only errors are the documented, clear ones raised before any model work."""

from __future__ import annotations

import hashlib
import itertools
import posixpath
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridistill.stages import StoreSpec, stage_folder
from gridistill.storage import RunStore
from gridistill.tasks.index import IndexParams, index_dataset
from gridistill.tasks.ingest import IMAGE_EXTENSIONS, decode_image, resolve_classes, scan_samples
from gridistill.tasks.load import LoadParams, load_class

from .conftest import encode, hostile_files, noise_image

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNSAFE = ("/", "\\", "..", "\x00")
# Printable text, unicode and whitespace included; no NUL or line breaks in file names.
NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\x00\r\n",
                           exclude_categories=("Cs",))


def is_safe_key(name: str) -> bool:
    return bool(name.strip()) and name != "." and not any(u in name for u in UNSAFE)


@pytest.fixture(scope="module")
def workdir() -> Path:
    with tempfile.TemporaryDirectory(prefix="gridistill-fuzz-") as name:
        root = Path(name)
        (root / "img").mkdir()
        for i in range(3):
            noise_image(i).save(root / "img" / f"{i}.png")
        yield root


_counter = itertools.count()


@settings(FUZZ, max_examples=300)
@given(rows=st.lists(st.tuples(
    st.sampled_from(["img/0.png", "img/1.png", "img/2.png", "missing.png", "", " ",
                     "../img/0.png", "/abs/none.png", "s3://bucket/x.jpg"]) | st.text(
        NAME_CHARS, max_size=12),
    st.sampled_from(["a", "NA", "null", "None", "nan", "é x", "..", "a/b", "", " ", "."]) |
    st.text(NAME_CHARS, max_size=6)), max_size=12),
    parquet=st.booleans())
def test_manifest_ingestion_accounts_for_every_row(workdir, rows, parquet):
    path = workdir / f"m{next(_counter)}.{'parquet' if parquet else 'csv'}"
    frame = pd.DataFrame(rows, columns=["path", "label"], dtype=str)
    if parquet:
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    complete = [(p, lab) for p, lab in rows if p.strip() and lab.strip()]
    labels_of: dict[str, set[str]] = {}
    for p, lab in complete:
        labels_of.setdefault(p, set()).add(lab)
    if any(len(labels) > 1 for labels in labels_of.values()):
        with pytest.raises(ValueError, match="listed under different labels"):
            scan_samples(str(path))
        return
    listing = scan_samples(str(path))
    assert len(listing.samples) + len(listing.ignored) == len(rows)
    assert len(listing.samples) == len(labels_of)  # one sample per distinct path
    assert listing.samples["path"].is_unique
    assert listing.samples["class_name"].tolist() == [
        lab for p, lab in dict.fromkeys(complete)]  # first occurrence order, labels verbatim
    assert {reason for _, reason in listing.ignored} <= {"missing path or label",
                                                         "duplicate manifest row"}
    names = set(listing.samples["class_name"])
    if all(is_safe_key(n) for n in names):
        assert [c.name for c in resolve_classes(names)] == sorted(names)
    else:
        with pytest.raises(ValueError, match="invalid name for a storage key"):
            resolve_classes(names)


KINDS = {"good": encode(noise_image(1, (20, 12)), "PNG"),
         "jpeg": encode(noise_image(2, (16, 16)), "JPEG"),
         **{name: data for name, (data, _) in hostile_files().items()
            if name not in ("huge_ok.jpg", "bomb_72mp.png")}}
EXTENSIONS = [".png", ".jpg", ".JPEG", ".gif", ".txt", "", ".csv", ".webp"]


@settings(FUZZ, max_examples=120)
@given(tree=st.dictionaries(
    st.text(NAME_CHARS, min_size=1, max_size=8).filter(lambda n: n not in (".", "..")),
    st.dictionaries(st.text(NAME_CHARS, min_size=1, max_size=6).filter(
        lambda n: n not in (".", "..")), st.tuples(st.sampled_from(EXTENSIONS),
                                                   st.sampled_from(sorted(KINDS))),
        max_size=5), min_size=1, max_size=3))
def test_class_folder_ingestion_reports_every_file_and_loads_or_fails_clearly(workdir, tree):
    root = workdir / f"tree{next(_counter)}"
    files = []
    for class_name, members in tree.items():
        (root / class_name).mkdir(parents=True)
        for stem, (extension, kind) in members.items():
            (root / class_name / (stem + extension)).write_bytes(KINDS[kind])
            files.append((class_name, stem + extension, kind))
    # Every name ending in a listed extension counts, ".TIF" (a stem "." + "TIF") included.
    images = [f for f in files if f[1].lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        with pytest.raises(ValueError, match="no images found"):
            scan_samples(str(root))
        return
    listing = scan_samples(str(root))
    empty_classes = {c for c in tree if not any(f[0] == c for f in images)}
    assert len(listing.samples) == len(images)
    assert len(listing.ignored) == len(files) - len(images) + len(empty_classes)
    classes = set(listing.samples["class_name"])
    assert classes == {f[0] for f in images}
    store = StoreSpec(root=str(workdir / f"run{next(_counter)}"))
    params = IndexParams(data=str(root), holdout_share=0.0)
    if not all(is_safe_key(c) for c in classes):
        with pytest.raises(ValueError, match="invalid name for a storage key"):
            index_dataset.fn(store, params)
        return
    dataset = index_dataset.fn(store, params)
    for class_name in sorted(classes):
        expected = [f for f in images if f[0] == class_name]
        try:
            ref = load_class.fn(store, class_name, LoadParams(), [dataset])
        except ValueError as exc:  # the one documented failure, raised before any model work
            assert f"class {class_name!r} has no usable images" in str(exc)
            continue
        assert ref.meta["images"] + ref.meta["skipped"] == len(expected)
        kept = RunStore(store.root).read_parquet(f"{ref.folder}/images.parquet")
        assert kept["sha256"].is_unique and (kept[["width", "height"]] >= 8).all().all()


def _mutations() -> st.SearchStrategy[bytes]:
    bases = [encode(noise_image(3, (12, 9), mode), fmt) for mode, fmt in [
        ("RGB", "PNG"), ("RGB", "JPEG"), ("P", "GIF"), ("RGB", "WEBP"), ("RGB", "BMP"),
        ("RGBA", "TIFF"), ("CMYK", "JPEG")]]

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(bases)))
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data) - 1))
            operation = draw(st.sampled_from(["flip", "cut", "insert"]))
            if operation == "flip":
                data[position] ^= draw(st.integers(1, 255))
            elif operation == "cut":
                del data[position:]
                if not data:
                    break
            else:
                data[position:position] = draw(st.binary(min_size=1, max_size=16))
        return bytes(data)

    return mutate()


@settings(FUZZ, max_examples=300)
@given(data=_mutations())
def test_decode_never_raises_on_corrupted_images(data):
    decoded = decode_image(data)
    assert (decoded.image is None) != (decoded.error is None)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    if decoded.image is not None:
        assert decoded.image.mode == "RGB"


@settings(FUZZ, max_examples=300)
@given(name=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10))
def test_a_storage_key_part_never_escapes_its_folder(name):
    try:
        folder = stage_folder("load", name, "0123abcd")
    except ValueError:
        assert not is_safe_key(name)
        return
    assert is_safe_key(name)
    normal = posixpath.normpath(f"/root/{folder}")
    assert normal == f"/root/load/{name}/0123abcd" and normal.split("/")[3] == name
