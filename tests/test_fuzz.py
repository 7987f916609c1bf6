"""Fuzzing input validation and image decoding with hypothesis: whatever the bytes, schema or reference, the only
exceptions are the typed ones the pipeline turns into error rows (RowError) or a refused shard (SchemaError).

Examples are bounded and derandomized (the same examples every run, no example database written), so the file runs in
seconds and a failure reproduces."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.schemas import ColumnMapping, SchemaError, check_input_schema

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# Small enough that a mutated header cannot make one example decode for long.
DECODE = DecodeConfig(max_pixels=2_000_000)


def encoded(fmt: str, **options) -> bytes:
    image = Image.new("RGB", (23, 17), (200, 40, 40))
    image.paste((20, 90, 220), (4, 3, 15, 12))
    buffer = io.BytesIO()
    if fmt == "GIF":  # two frames: the decoder must still take only the first
        image.save(buffer, fmt, save_all=True, append_images=[Image.new("RGB", (23, 17), (0, 255, 0))], **options)
    else:
        image.save(buffer, fmt, **options)
    return buffer.getvalue()


SEEDS = {
    "PNG": encoded("PNG"),
    "JPEG": encoded("JPEG", quality=80),
    "progressive JPEG": encoded("JPEG", progressive=True),
    "GIF": encoded("GIF"),
    "WEBP": encoded("WEBP"),
    "BMP": encoded("BMP"),
    "TIFF": encoded("TIFF", compression="tiff_lzw"),
}


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image of some format with a few bytes overwritten, a slice cut out or repeated, and/or truncated."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    edit = draw(st.sampled_from(["none", "cut", "repeat", "truncate"]))
    start = draw(st.integers(0, len(data) - 1))
    end = draw(st.integers(start, min(len(data), start + 64)))
    if edit == "cut":
        del data[start:end]
    elif edit == "repeat":
        data[start:start] = data[start:end]
    elif edit == "truncate":
        del data[start:]
    return bytes(data)


def test_seeds_decode():
    """The mutations start from images that decode."""
    for name, data in SEEDS.items():
        assert decode_image(data, DECODE).size == (23, 17), name


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_arbitrary_bytes_raises_only_row_error(data: bytes):
    try:
        image = decode_image(data, DECODE)
    except RowError:
        return
    assert image.mode == "RGB"


@FUZZ
@given(
    st.one_of(
        mutated_images(),
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from(sorted(SEEDS.values())).map(lambda d: d[:32]),
            st.binary(max_size=512),
        ),
    )
)
def test_decode_mutated_images_raises_only_row_error(data: bytes):
    try:
        image = decode_image(data, DECODE)
    except RowError:
        return
    assert image.mode == "RGB" and image.width * image.height <= DECODE.max_pixels


NAMES = st.sampled_from(["image_url", "key", "question", "lang", "x", "", "é", "a.b"])


def arrow_types() -> st.SearchStrategy[pa.DataType]:
    primitive = st.sampled_from(
        [
            pa.null(),
            pa.bool_(),
            pa.int8(),
            pa.int64(),
            pa.uint32(),
            pa.float16(),
            pa.float64(),
            pa.string(),
            pa.large_string(),
            pa.string_view(),
            pa.binary(),
            pa.large_binary(),
            pa.binary_view(),
            pa.binary(16),
            pa.date32(),
            pa.timestamp("ms", tz="UTC"),
            pa.time64("ns"),
            pa.duration("s"),
            pa.decimal128(10, 2),
            pa.dictionary(pa.int32(), pa.string()),
            pa.dictionary(pa.int8(), pa.binary()),
            pa.dictionary(pa.int16(), pa.int64()),
        ]
    )
    return st.recursive(
        primitive,
        lambda inner: st.one_of(
            inner.map(pa.list_),
            inner.map(pa.large_list),
            inner.map(lambda t: pa.list_(t, 2)),
            st.lists(st.tuples(NAMES, inner), max_size=3).map(pa.struct),
            st.tuples(primitive, inner).map(lambda kv: pa.map_(pa.string(), kv[1])),
        ),
        max_leaves=4,
    )


@FUZZ
@given(
    st.lists(st.tuples(NAMES, arrow_types(), st.booleans()), max_size=6),
    NAMES,
    st.one_of(st.none(), NAMES),
    st.one_of(st.none(), NAMES),
    st.lists(NAMES, max_size=3),
)
def test_check_input_schema_raises_only_schema_error(columns, image, id_column, instruction, passthrough):
    schema = pa.schema([pa.field(name, t, nullable or pa.types.is_null(t)) for name, t, nullable in columns])
    mapping = ColumnMapping(
        image_column=image, id_column=id_column, instruction_column=instruction, passthrough=tuple(passthrough)
    )
    try:
        check_input_schema("fuzz.parquet", schema, mapping)
    except SchemaError as err:
        assert str(err).startswith("fuzz.parquet: ") and err.problems
        return
    assert all(schema.get_field_index(name) >= 0 for name in mapping.input_columns())


@pytest.fixture(scope="module")
def data_only_fetcher():
    fetcher = Fetcher(FetchConfig(allowed_schemes=("data",), retries=0, max_bytes=4096))
    yield fetcher
    fetcher.close()


REFERENCE_PARTS = st.sampled_from(
    [
        "data:",
        "data:image/png;base64,",
        "DATA:text/plain,",
        "data:;base64,",
        "data:,",
        "http://",
        "https://",
        "s3://",
        "gs://",
        "file://",
        "ftp://",
        "::",
        "%",
        "%2",
        "%zz",
        ",",
        ";base64",
        "=",
        "==",
        "/",
        "..",
        "\\",
        " ",
        "\n",
        "\x00",
        "127.0.0.1",
        "[::1]",
        "localhost",
        "iVBORw0KGgo",
        "AAAA",
        "é",
        "\ud7ff",
        "?",
        "#",
        "@",
    ]
)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.one_of(REFERENCE_PARTS, st.text(max_size=12)), max_size=8).map("".join),
        st.binary(max_size=64).map(lambda b: "data:;base64," + b.hex()),
    )
)
def test_fetch_references_raise_only_row_error(data_only_fetcher, reference: str):
    try:
        data = data_only_fetcher.fetch(reference)
    except RowError as err:
        assert err.kind in ("invalid_input", "too_large", "blocked_address"), err
        return
    assert reference.strip()[:5].lower() == "data:" and isinstance(data, bytes)
