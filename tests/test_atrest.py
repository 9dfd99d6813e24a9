"""Encryption at rest: AES-256-GCM files that name their key, bind their context, and rotate."""

from __future__ import annotations

import base64
import io
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.records import atrest
from pipeline.records.atrest import (
    DecryptionError,
    Keyring,
    add_dev_key,
    decrypt_stream,
    encrypt_stream,
    load_keyring,
    parse_keys,
    read_decrypted,
    reencrypt,
    write_encrypted,
)

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
RING_A = parse_keys(f"a1:{KEY_A}", source="test")
PDF = b"%PDF-1.4 Ana Maria Perez M000123 ..."


@given(data=st.binary(max_size=4096), context=st.text(max_size=40))
def test_round_trip_and_ciphertext_hides_the_plaintext(data: bytes, context: str) -> None:
    blob = RING_A.encrypt(data, context)
    assert RING_A.decrypt(blob, context) == data
    assert RING_A.key_id_of(blob) == "a1"
    if len(data) >= 8:
        assert data not in blob


@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_altered_byte_fails_to_decrypt(position: int, bit: int) -> None:
    blob = bytearray(RING_A.encrypt(PDF, "s1"))
    blob[position % len(blob)] ^= 1 << bit
    with pytest.raises(DecryptionError):
        RING_A.decrypt(bytes(blob), "s1")


def test_a_file_moved_to_another_statement_does_not_decrypt(tmp_path: Path) -> None:
    path = tmp_path / "s1.pdf"
    write_encrypted(path, PDF, RING_A, "s1")
    assert not path.read_bytes().startswith(b"%PDF")
    assert read_decrypted(path, RING_A, "s1") == PDF
    with pytest.raises(DecryptionError, match="s1.pdf: authentication failed"):
        read_decrypted(path, RING_A, "s2")


def test_plain_file_and_unknown_key_are_named_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pdf"
    plain.write_bytes(PDF)
    with pytest.raises(DecryptionError, match="plain.pdf: not an encrypted"):
        read_decrypted(plain, RING_A, "s1")
    other = parse_keys(f"b1:{KEY_B}", source="test")
    with pytest.raises(DecryptionError, match="key 'a1', not in the keyring"):
        other.decrypt(RING_A.encrypt(PDF, "s1"), "s1")


def test_rotation_new_key_first_old_files_still_read_then_reencrypted(tmp_path: Path) -> None:
    path = tmp_path / "s1.pdf"
    write_encrypted(path, PDF, RING_A, "s1")
    rotated = parse_keys(f"b1:{KEY_B},a1:{KEY_A}", source="test")

    assert read_decrypted(path, rotated, "s1") == PDF
    assert reencrypt(path, rotated, "s1") is True
    assert reencrypt(path, rotated, "s1") is False

    only_new = parse_keys(f"b1:{KEY_B}", source="test")
    assert only_new.key_id_of(path.read_bytes()) == "b1"
    assert read_decrypted(path, only_new, "s1") == PDF


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no keys"),
        (f"bad id:{KEY_A}", "key 1: id must be"),
        ("a1:not base64!", r"key 1 \(a1\): not base64"),
        (f"a1:{base64.b64encode(b'short').decode()}", r"must be 32 bytes"),
        (f"a1:{KEY_A},a1:{KEY_B}", "key 2: id a1 listed twice"),
    ],
)
def test_bad_keys_are_refused_without_quoting_them(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_keys(text, source="environment variable EOB_AT_REST_KEYS")
    assert "EOB_AT_REST_KEYS" in str(caught.value)
    assert KEY_A not in str(caught.value) and KEY_B not in str(caught.value)


def test_environment_keys_win_over_the_development_keyring(tmp_path: Path) -> None:
    ring = load_keyring(tmp_path, {atrest.ENV_VAR: f"b1:{KEY_B}, a1:{KEY_A}"})
    assert ring.active_id == "b1" and set(ring.keys) == {"a1", "b1"}
    assert not atrest.dev_keyring_path(tmp_path).exists()


def test_development_keyring_is_made_once_private_and_rotates(tmp_path: Path) -> None:
    first = load_keyring(tmp_path, {})
    path = atrest.dev_keyring_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(tmp_path, {}) == first

    new_id = add_dev_key(tmp_path)
    rotated = load_keyring(tmp_path, {})
    assert rotated.active_id == new_id != first.active_id
    assert rotated.keys[first.active_id] == first.keys[first.active_id]


def test_rekey_command_moves_every_run_file_to_a_new_dev_key(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.ops.cli import main

    data_dir = tmp_path / "data"
    old = load_keyring(data_dir, {})
    run_dir = data_dir / "runs" / "r1"
    (run_dir / "pdf").mkdir(parents=True)
    (run_dir / "print").mkdir()
    write_encrypted(run_dir / "pdf" / "s1.pdf", PDF, old, "s1")
    write_encrypted(run_dir / "print" / "batch.pdf", PDF, old, "r1:print/batch.pdf")

    environment = {"EOB_DATA_DIR": str(data_dir), atrest.ENV_VAR: ""}
    result = CliRunner().invoke(main, ["rekey", "--new-dev-key"], env=environment)

    assert result.exit_code == 0, result.output
    assert "reencrypted" in result.output and "2" in result.output
    new = load_keyring(data_dir, {})
    only_new = atrest.Keyring({new.active_id: new.keys[new.active_id]}, new.active_id)
    assert read_decrypted(run_dir / "pdf" / "s1.pdf", only_new, "s1") == PDF
    assert read_decrypted(run_dir / "print" / "batch.pdf", only_new, "r1:print/batch.pdf") == PDF


def test_rekey_command_rotates_archived_drops_and_kept_reports_and_converts_old_ones(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner
    from cryptography.fernet import Fernet

    from pipeline.ops.cli import main
    from pipeline.returns.collect import Archive, Collected

    data_dir = tmp_path / "data"
    old = load_keyring(data_dir, {})
    drops = data_dir / "archive" / "acme" / "2026-11-22"
    drops.mkdir(parents=True)
    (drops / "a-claims.csv").write_bytes(PDF)  # archived before drops were encrypted
    with (drops / "b-claims.csv").open("wb") as target:
        encrypt_stream([PDF], target, old, "archive/acme/2026-11-22/b-claims.csv")
    (drops / "b-claims.csv.ready").write_bytes(b"")  # a marker: nothing to protect
    reports = Archive.in_data_dir(data_dir, old)
    current, legacy = Collected("1", b"To: ana@example.org"), Collected("2", b"To: bo@example.org")
    reports.keep(current)
    (data_dir / "archive.key").write_bytes(fernet_key := Fernet.generate_key())
    (reports.directory / f"{legacy.sha256}.eml.enc").write_bytes(
        Fernet(fernet_key).encrypt(legacy.raw)
    )

    environment = {"EOB_DATA_DIR": str(data_dir), atrest.ENV_VAR: "", "EOB_ARCHIVE_KEY": ""}
    result = CliRunner().invoke(main, ["rekey", "--new-dev-key"], env=environment)

    assert result.exit_code == 0, result.output
    assert re.search(r"reencrypted\W+4\W", result.output)
    assert re.search(r"already current\W+0\W", result.output)
    new = load_keyring(data_dir, {})
    only_new = atrest.Keyring({new.active_id: new.keys[new.active_id]}, new.active_id)
    for name in ("a-claims.csv", "b-claims.csv"):
        context = f"archive/acme/2026-11-22/{name}"
        assert b"".join(atrest.read_decrypted_stream(drops / name, only_new, context)) == PDF
    assert (drops / "b-claims.csv.ready").read_bytes() == b""
    moved = Archive.in_data_dir(data_dir, only_new)
    assert [moved.read(i.sha256) for i in (current, legacy)] == [current.raw, legacy.raw]


def test_decrypt_command_pipes_the_plaintext_and_refuses_other_files(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.ops.cli import main

    data_dir = tmp_path / "data"
    keyring = load_keyring(data_dir, {})
    (data_dir / "runs" / "r1" / "pdf").mkdir(parents=True)
    path = data_dir / "runs" / "r1" / "pdf" / "s1.pdf"
    write_encrypted(path, PDF, keyring, "s1")
    environment = {"EOB_DATA_DIR": str(data_dir), atrest.ENV_VAR: ""}

    result = CliRunner().invoke(main, ["decrypt", str(path)], env=environment)

    assert result.exit_code == 0 and result.stdout_bytes == PDF
    elsewhere = tmp_path / "s1.pdf"
    elsewhere.write_bytes(path.read_bytes())
    refused = CliRunner().invoke(main, ["decrypt", str(elsewhere)], env=environment)
    assert refused.exit_code == 1 and PDF not in refused.stdout_bytes
    assert "s1.pdf: not an encrypted file of the data directory" in refused.output


# Streams ---------------------------------------------------------------------------------------

CHUNK = 64
RING_B_FIRST = parse_keys(f"b1:{KEY_B},a1:{KEY_A}", source="test")


def _sealed(data: bytes, context: str = "archive/acme/claims.csv", *, pieces: int = 1) -> bytes:
    target = io.BytesIO()
    step = max(1, len(data) // pieces)
    split = [data[i : i + step] for i in range(0, len(data), step)]
    encrypt_stream(split, target, RING_A, context, chunk_size=CHUNK)
    return target.getvalue()


def _opened(blob: bytes, context: str = "archive/acme/claims.csv", ring: Keyring = RING_A) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(blob), ring, context, name="claims.csv"))


# Sizes cluster around chunk boundaries, where the last-chunk rule matters.
_SIZES = st.one_of(
    st.integers(0, 5 * CHUNK),
    st.sampled_from([n * CHUNK + d for n in range(4) for d in (-1, 0, 1)]).filter(lambda n: n >= 0),
)


@given(size=_SIZES, pieces=st.integers(1, 7), seed=st.binary(min_size=1, max_size=8))
def test_stream_round_trip_at_any_size_and_piece_split(size: int, pieces: int, seed: bytes) -> None:
    data = (seed * (size // len(seed) + 1))[:size]
    blob = _sealed(data, pieces=pieces)
    assert _opened(blob) == data
    chunks = max(1, -(-size // CHUNK))
    assert len(blob) == len(_sealed(b"")) - 16 + size + 16 * chunks  # header + data + a tag each


def _chunks_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    header_size = len(_sealed(b"")) - 16
    body = blob[header_size:]
    return blob[:header_size], [body[i : i + CHUNK + 16] for i in range(0, len(body), CHUNK + 16)]


DRAWN = bytes(range(256)) * 2  # 512 bytes: eight full chunks


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, c: h + b"".join(c[:-1]), id="last chunk removed"),
        pytest.param(lambda h, c: h + b"".join(c[:3]), id="cut at a chunk boundary"),
        pytest.param(lambda h, c: h + b"".join(c)[:-5], id="cut inside a chunk"),
        pytest.param(lambda h, c: h + b"".join([c[1], c[0], *c[2:]]), id="chunks reordered"),
        pytest.param(lambda h, c: h + b"".join([*c, c[-1]]), id="last chunk repeated"),
        pytest.param(lambda h, c: h, id="header only"),
    ],
)
def test_stream_truncation_reordering_and_last_chunk_removal_are_detected(
    tamper: Callable[[bytes, list[bytes]], bytes],
) -> None:
    header, chunks = _chunks_of(_sealed(DRAWN))
    assert len(chunks) == 8
    with pytest.raises(DecryptionError, match="claims.csv: authentication failed"):
        _opened(tamper(header, chunks))


def test_stream_chunks_from_another_file_and_another_context_are_refused() -> None:
    header, chunks = _chunks_of(_sealed(DRAWN))
    other_header, other_chunks = _chunks_of(_sealed(DRAWN))  # same plaintext, another nonce prefix
    with pytest.raises(DecryptionError, match="authentication failed"):
        _opened(header + b"".join([other_chunks[0], *chunks[1:]]))
    with pytest.raises(DecryptionError, match="authentication failed"):
        _opened(header + b"".join(chunks), context="archive/acme/other.csv")


def test_stream_header_names_a_missing_key_and_a_forged_chunk_size() -> None:
    blob = _sealed(DRAWN)
    only_b = parse_keys(f"b1:{KEY_B}", source="test")
    with pytest.raises(DecryptionError, match="claims.csv: encrypted with key 'a1', not in the"):
        _opened(blob, ring=only_b)
    size_at = len(atrest.STREAM_MAGIC) + 1 + len("a1")
    forged = blob[:size_at] + (1 << 30).to_bytes(4, "big") + blob[size_at + 4 :]
    with pytest.raises(DecryptionError, match="chunk size out of range"):
        _opened(forged)
    with pytest.raises(DecryptionError, match="not an encrypted"):
        _opened(DRAWN)


def test_rekey_stream_encrypts_plaintext_then_rotates_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "claims.csv"
    data = b"member_id,email\nM1,ana@example.org\n" * 100_000  # 3.4 MB: several default chunks
    path.write_bytes(data)
    assert atrest.rekey_stream(path, RING_A, "c") is True  # a plaintext archive from before
    assert b"ana@example.org" not in path.read_bytes()
    assert b"".join(atrest.read_decrypted_stream(path, RING_A, "c")) == data
    assert atrest.rekey_stream(path, RING_A, "c") is False
    assert atrest.rekey_stream(path, RING_B_FIRST, "c") is True
    only_b = parse_keys(f"b1:{KEY_B}", source="test")
    assert b"".join(atrest.read_decrypted_stream(path, only_b, "c")) == data
    assert [p.name for p in tmp_path.iterdir()] == ["claims.csv"]  # no temporary left behind


# The archive format's per-file key, its previous format, and durability ------------------------

V1_FILE = Path(__file__).parent / "data" / "atrest_stream_v1.bin"  # written by the old format
V1_CONTEXT = "archive/acme/2026-11-22/v1-claims.csv"


def test_each_stream_file_is_sealed_under_its_own_key_derived_from_a_salt_in_its_header() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    context = "archive/acme/claims.csv"
    first, second = _sealed(DRAWN, context), _sealed(DRAWN, context)
    # The format: magic, key id, chunk size, a 32-byte random salt; then the chunks, each under
    # HKDF-SHA256(keyring key, salt) with nonce = 11-byte counter || last-chunk flag.
    header_size = len(b"EOBS\x02") + 1 + len("a1") + 4 + 32
    assert first.startswith(b"EOBS\x02\x02a1" + CHUNK.to_bytes(4, "big"))
    salt = first[header_size - 32 : header_size]
    assert salt != second[header_size - 32 : header_size]
    file_key = HKDF(hashes.SHA256(), 32, salt, b"eob-delivery archive stream").derive(
        base64.b64decode(KEY_A)
    )
    chunk = first[header_size : header_size + CHUNK + 16]
    aad = first[:header_size] + context.encode()
    assert AESGCM(file_key).decrypt(bytes(11) + b"\x00", chunk, aad) == DRAWN[:CHUNK]


def test_the_previous_stream_format_still_reads_and_rekey_moves_it_to_the_current_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1-claims.csv"
    path.write_bytes(V1_FILE.read_bytes())
    assert path.read_bytes().startswith(b"EOBS\x01")
    assert b"".join(atrest.read_decrypted_stream(path, RING_A, V1_CONTEXT)) == DRAWN
    # Same key, old format: rekey converts it all the same.
    assert atrest.rekey_stream(path, RING_A, V1_CONTEXT) is True
    assert path.read_bytes().startswith(atrest.STREAM_MAGIC)
    assert b"".join(atrest.read_decrypted_stream(path, RING_A, V1_CONTEXT)) == DRAWN
    assert atrest.rekey_stream(path, RING_A, V1_CONTEXT) is False


def test_an_archived_copy_and_its_directory_are_on_disk_before_encrypt_file_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller deletes the insurer's original next: a crash must not lose both copies.
    import os

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(source: str, target: str) -> None:
        replace(source, target)
        events.append(("replace", str(target)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    source, archived = tmp_path / "claims.csv", tmp_path / "archive" / "claims.csv"
    archived.parent.mkdir()
    source.write_bytes(DRAWN)

    atrest.encrypt_file(source, archived, RING_A, "c")

    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).parent == archived.parent  # the sealed temporary, then renamed
    assert events[1][1] == str(archived)
    assert events[2][1] == str(archived.parent)
