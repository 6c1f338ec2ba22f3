"""Bounds a hostile client meets, unit by unit: image pixels and formats, labels, the text-head
cache, versions held by a classifier replica, batch sizes in images, upload bodies and slots."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from gnsp_core.zeroshot import TextHeadCache
from service.api.schemas import classify_body
from service.api.uploads import (MAX_PART_HEADER_BYTES, MAX_PART_HEADERS, UploadGate, check_image, check_labels, form_body_limit,
                                 paced, receive_form)
from service.errors import (BadRequestError, BusyError, InvalidImageError, RequestTimeoutError, UnknownVersionError,
                            UploadTooLargeError)
from service.serving.classifier import images_in
from service.serving.version_cache import VersionCache
from service.serving.version_pool import VersionPool
from service.serving.served_model import ServedModel, decode_image
from service.settings import ServiceSettings


def encoded(size: tuple[int, int], fmt: str, colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds 8 bytes of pixel data: only its header can be read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------ images


def test_declared_pixels_over_the_limit_are_refused_before_decoding():
    header = png_header_only(10_000, 10_000)  # 100 Mpx declared, no data: decoding it would fail otherwise
    with pytest.raises(InvalidImageError, match="10000x10000, over the 16777216-pixel limit"):
        decode_image(header, 224, 4096 * 4096)
    with pytest.raises(InvalidImageError, match=r"images\[2\] is 10000x10000, over the 1000000-pixel limit"):
        check_image(header, 2, 1_000_000)
    with pytest.raises(InvalidImageError, match="more pixels than the 1000000-pixel limit"):
        check_image(png_header_only(20_000, 20_000), 0, 1_000_000)  # past Pillow's own bomb guard


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_near_the_model_size():
    image = decode_image(encoded((2000, 1600), "JPEG"), size=224)
    assert image.size == (500, 400)  # 1/4 scale: 1/8 would leave the short side under 224
    assert decode_image(encoded((6000, 6000), "JPEG"), size=224).size == (750, 750)
    assert decode_image(encoded((2000, 1600), "PNG"), size=224).size == (2000, 1600)  # no draft for PNG


def test_image_formats_are_an_allow_list():
    tiff = encoded((8, 8), "TIFF")
    with pytest.raises(InvalidImageError, match="PNG/JPEG/WEBP/BMP/GIF"):
        check_image(tiff, 0, 1_000_000)
    with pytest.raises(InvalidImageError, match="PNG/JPEG/WEBP/BMP/GIF"):
        decode_image(tiff, 224, 1_000_000)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        check_image(encoded((8, 8), fmt), 0, 1_000_000)
        assert decode_image(encoded((8, 8), fmt), 224, 1_000_000).size == (8, 8)


def test_labels_are_bounded_in_count_and_length():
    # Kept as sent: the schema's uniqueItems and pattern judge the labels a client sends.
    assert check_labels([" cat ", "cat"], 2, 5) == [" cat ", "cat"]
    for bad in (["  "], ["a\tb"], ["a\x85"]):
        with pytest.raises(BadRequestError, match="not all blank, without control characters"):
            check_labels(bad, 2, 5)
    with pytest.raises(BadRequestError, match=r"too many labels \(3\); the limit is 2 \(max_labels\)"):
        check_labels(["a", "b", "c"], 2, 5)
    with pytest.raises(BadRequestError, match=r"1 to 5 characters \(max_label_chars\), not all blank"):
        check_labels(["a", "abcdef"], 2, 5)


# ------------------------------------------------------------------------------- text heads


def test_text_head_cache_is_bounded_by_rows_too(tiny):
    cache = TextHeadCache(maxsize=10, max_rows=5)
    three, two, one = ["a", "b", "c"], ["d", "e"], ["f"]
    for labels in (three, two):
        cache.get(tiny.model, tiny.tokenizer, labels, ["{}"], key=1)
    assert len(cache) == 2 and cache.lookup(1, three, ["{}"]) is not None
    cache.get(tiny.model, tiny.tokenizer, one, ["{}"], key=1)  # 6 rows: the least recently used goes
    assert cache.lookup(1, two, ["{}"]) is None and cache.lookup(1, three, ["{}"]) is not None
    assert cache.lookup(2, three, ["{}"]) is None  # keyed by version too


# --------------------------------------------------------------------- versions and batches


def test_the_active_version_stays_resident_and_pinned_loads_are_capped(tiny):
    loads: list[int] = []
    release = asyncio.Event()

    async def loader(version: int) -> ServedModel:
        loads.append(version)
        if version != 1:
            await release.wait()  # an old version that takes a while to load
        return ServedModel(version, tiny)

    async def scenario():
        pool = VersionPool(loader, capacity=3, max_waiting=2, min_load_interval_s=0.0)
        active = await pool.get(1, pinned=False)
        waiting = [asyncio.create_task(pool.get(2, pinned=True)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(BusyError, match="2 requests are waiting for model versions to load"):
            await pool.get(2, pinned=True)
        assert await pool.get(1, pinned=False) is active  # answered while an old load waits
        release.set()
        assert {served.version for served in await asyncio.gather(*waiting)} == {2}
        assert pool.resident is active and pool.waiting == 0

    asyncio.run(scenario())
    assert loads == [1, 2]  # the active version was loaded once, version 2 once for both requests


def test_pinned_requests_across_more_versions_than_the_pool_holds_load_one_per_interval(tiny):
    loads: list[int] = []
    now = [0.0]

    async def loader(version: int) -> ServedModel:
        loads.append(version)
        return ServedModel(version, tiny)

    async def scenario():
        pool = VersionPool(loader, capacity=2, max_waiting=8, min_load_interval_s=1.0, clock=lambda: now[0])
        active = await pool.get(1, pinned=False)
        now[0] = 5.0
        answers = await asyncio.gather(*(pool.get(2 + i % 4, pinned=True) for i in range(12)),
                                       return_exceptions=True)
        refused = [a for a in answers if isinstance(a, BusyError)]
        assert refused and all("loads at most one every 1 s" in str(a) for a in refused)
        assert {a.version for a in answers if not isinstance(a, BusyError)} == {2}  # one load: the first asked
        with pytest.raises(BusyError):
            await pool.get(3, pinned=True)  # within the interval of the last load
        now[0] = 6.5
        assert (await pool.get(3, pinned=True)).version == 3
        # The active version, and a load check before an activation, are never refused.
        assert (await pool.get(4, pinned=True, urgent=True)).version == 4
        assert (await pool.get(5, pinned=False)).version == 5 and pool.resident.version == 5
        assert pool.loaded() == [5, 4, 1]  # the LRU (capacity 2) dropped the oldest, 2 and 3
        assert active.version == 1

    asyncio.run(scenario())
    assert loads == [1, 2, 3, 4, 5]


def test_versions_resolve_from_memory_and_survive_a_store_hiccup():
    reads = {"active": 0, "versions": 0}
    now = [0.0]
    store = {"active": 1, "versions": [1, 2], "down": False}

    def active() -> int:
        reads["active"] += 1
        if store["down"]:
            raise OSError("object store unreachable")
        return store["active"]

    def versions() -> list[int]:
        reads["versions"] += 1
        return store["versions"]

    async def scenario():
        cache = VersionCache(active, versions, ttl_s=1.0, clock=lambda: now[0])
        assert [await cache.resolve(None) for _ in range(20)] == [1] * 20
        assert reads["active"] == 1  # one read per interval
        store["active"] = 2
        assert await cache.resolve(None) == 1  # a swap reaches requests within the interval...
        now[0] = 1.5
        assert await cache.resolve(None) == 2  # ...not later
        store["down"] = True
        now[0] = 3.0
        assert await cache.resolve(None) == 2  # the store failing does not fail the request
        assert await cache.resolve(2) == 2
        now[0] = 4.5
        for version in range(1000, 1050):
            with pytest.raises(UnknownVersionError):
                await cache.resolve(version)
        assert reads["versions"] == 2  # 50 unknown pins cost one listing (after the one for version 2)

    asyncio.run(scenario())


def test_a_batch_counts_images_and_a_large_request_fills_one_alone():
    assert images_in([{"size": 3}, {"size": 1}]) == 4
    settings = ServiceSettings(max_batch_size=16)
    assert min(64, settings.max_batch_size) == 16  # what `classify` records for a 64-image request


# --------------------------------------------------------------------------------- uploads


async def chunks(*parts: bytes, pause_s: float = 0.0):
    for part in parts:
        await asyncio.sleep(pause_s)
        yield part


def test_a_body_that_pauses_too_long_is_refused():
    async def read(pause_s: float, total_s: float | None) -> bytes:
        return b"".join([c async for c in paced(chunks(b"a", b"b", pause_s=pause_s), 0.2, total_s)])

    assert asyncio.run(read(0.01, None)) == b"ab"
    with pytest.raises(RequestTimeoutError, match="too slowly"):
        asyncio.run(read(0.5, None))
    with pytest.raises(RequestTimeoutError):
        asyncio.run(read(0.15, 0.2))  # each pause is short, the whole body too long


def form(*parts: bytes) -> tuple[str, bytes]:
    boundary = "b0undary"
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return f"multipart/form-data; boundary={boundary}", body + b"--" + boundary.encode() + b"--\r\n"


def test_part_headers_and_the_whole_body_are_bounded(tmp_path: Path):
    name = b'Content-Disposition: form-data; name="name"\r\n\r\nx'
    padded = b'Content-Disposition: form-data; name="name"\r\nX-Pad: ' + b"p" * MAX_PART_HEADER_BYTES + b"\r\n\r\nx"
    many = b'Content-Disposition: form-data; name="name"\r\n' + b"X-A: b\r\n" * MAX_PART_HEADERS + b"\r\nx"
    kind, body = form(name)
    received = asyncio.run(receive_form(kind, None, chunks(body), "dataset", tmp_path / "f", 1000))
    assert received.fields == {"name": "x"}
    kind, body = form(padded)
    with pytest.raises(BadRequestError, match=f"headers of at most {MAX_PART_HEADER_BYTES} bytes"):
        asyncio.run(receive_form(kind, None, chunks(body), "dataset", tmp_path / "g", 1000))
    kind, body = form(many)
    with pytest.raises(BadRequestError, match=f"each part may have {MAX_PART_HEADERS} headers"):
        asyncio.run(receive_form(kind, None, chunks(body), "dataset", tmp_path / "g", 1000))
    # Within every part's own bounds, but more bytes in all than a form may have (chunked, no length).
    epilogue = b"e" * (form_body_limit(1000) + 1)
    kind, body = form(name)
    with pytest.raises(UploadTooLargeError, match="upload body is larger than"):
        asyncio.run(receive_form(kind, None, chunks(body, epilogue), "dataset", tmp_path / "h", 1000))


def test_upload_gate_bounds_concurrent_uploads_and_runs_checks_off_the_loop():
    async def scenario():
        gate = UploadGate(slots=1, wait_s=0.1)
        async with gate.slot():
            started = time.perf_counter()
            with pytest.raises(BusyError, match="1 dataset uploads are already being received"):
                async with gate.slot():
                    pass
            assert time.perf_counter() - started < 1
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.create_task(tick())
            await gate.run(time.sleep, 0.3)  # a blocking check: the loop keeps running meanwhile
            ticker.cancel()
            assert ticks >= 10
        async with gate.slot():  # the slot was given back
            pass

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------- OpenAPI


def test_the_classify_body_states_the_limits_of_the_settings():
    settings = ServiceSettings(max_classify_images=5, max_labels=7, max_label_chars=9, max_classify_pixels=1000)
    body = classify_body(settings)["content"]
    for kind in ("application/json", "multipart/form-data"):
        properties = body[kind]["schema"]["properties"]
        assert properties["images"]["maxItems"] == 5 and properties["labels"]["maxItems"] == 7
        assert properties["labels"]["items"]["maxLength"] == 9
        assert "1000 pixels" in properties["images"]["description"]
