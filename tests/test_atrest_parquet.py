"""Parquet intermediates at rest: encrypted pages and footer, key id recorded, rotation."""

from __future__ import annotations

import base64
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.ops.cli import main
from pipeline.records import atrest
from pipeline.records.atrest import DecryptionError, load_keyring, parse_keys
from pipeline.records.atrest_parquet import key_id_of, open_reader, open_writer, read_table, rekey

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
RING_A = parse_keys(f"a1:{KEY_A}", source="test")
ROTATED = parse_keys(f"b1:{KEY_B},a1:{KEY_A}", source="test")
ONLY_B = parse_keys(f"b1:{KEY_B}", source="test")
MEMBERS = pa.table(
    {
        "member_id": [f"M{n:06d}" for n in range(3000)],
        "email": [f"ana.perez{n}@example.com" for n in range(3000)],
        "last_name": ["Pérez-Villanueva"] * 3000,
        "_row": pa.array(range(2, 3002), pa.int64()),
    }
)
# First occurrences: a compressed page keeps those as literal bytes (later ones may be
# back-references), so a plain file shows them and the check below can fail.
PHI = [b"M000000", b"ana.perez0@example.com", "Pérez-Villanueva".encode()]


def write_members(path: Path, keyring: atrest.Keyring = RING_A) -> None:
    # Two batches, as the streaming stages write them.
    with open_writer(path, MEMBERS.schema, keyring) as writer:
        for batch in MEMBERS.to_batches(max_chunksize=1000):
            writer.write_batch(batch)


def test_file_bytes_hide_values_a_plain_parquet_shows(tmp_path: Path) -> None:
    plain, sealed = tmp_path / "plain.parquet", tmp_path / "accepted.parquet"
    pq.write_table(MEMBERS, plain)
    write_members(sealed)
    # The control: the same table written plainly carries these values as bytes.
    assert all(value in plain.read_bytes() for value in PHI)
    blob = sealed.read_bytes()
    assert blob.startswith(b"PARE") and blob.endswith(b"PARE")
    assert not [value for value in PHI if value in blob]
    assert b"member_id" not in blob  # the footer (schema) is encrypted too


def test_reads_back_identically_with_projection_filters_and_batches(tmp_path: Path) -> None:
    path = tmp_path / "accepted.parquet"
    write_members(path)
    assert read_table(path, RING_A).equals(MEMBERS)
    assert read_table(path, RING_A, columns=["email"]).equals(MEMBERS.select(["email"]))
    picked = read_table(path, RING_A, filters=pc.field("_row") < 5)
    assert picked["member_id"].to_pylist() == ["M000000", "M000001", "M000002"]
    reader = open_reader(path, RING_A)
    assert reader.metadata.num_rows == 3000
    batches = list(reader.iter_batches(batch_size=700))
    assert len(batches) == 5 and pa.Table.from_batches(batches).equals(MEMBERS)


def test_without_the_key_nothing_reads_and_errors_name_the_file_only(tmp_path: Path) -> None:
    path = tmp_path / "accepted.parquet"
    write_members(path)
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(path)
    with pytest.raises(DecryptionError) as missing:
        read_table(path, ONLY_B)
    assert str(missing.value) == (
        "accepted.parquet: data key: encrypted with key 'a1', not in the keyring"
    )
    wrong_key_same_id = parse_keys(f"a1:{KEY_B}", source="test")
    with pytest.raises(DecryptionError) as wrong:
        open_reader(path, wrong_key_same_id)
    assert str(wrong.value) == (
        "accepted.parquet: data key: authentication failed (altered or moved)"
    )


def test_an_altered_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "accepted.parquet"
    write_members(path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # inside the encrypted pages
    path.write_bytes(bytes(blob))
    with pytest.raises((OSError, DecryptionError)):
        read_table(path, RING_A)


def test_a_plaintext_intermediate_is_refused_and_rekey_encrypts_it(tmp_path: Path) -> None:
    path = tmp_path / "parsed.parquet"
    pq.write_table(MEMBERS, path)
    with pytest.raises(DecryptionError, match=r"parsed.parquet: not encrypted .*eob rekey"):
        open_reader(path, RING_A)
    assert rekey(path, RING_A) is True
    assert not [value for value in PHI if value in path.read_bytes()]
    assert read_table(path, RING_A).equals(MEMBERS)


def test_rotation_rewrites_under_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "accepted.parquet"
    write_members(path)
    assert key_id_of(path, ROTATED) == "a1"
    assert read_table(path, ROTATED).equals(MEMBERS)  # old key still decrypts after rotation

    assert rekey(path, ROTATED) is True
    assert rekey(path, ROTATED) is False
    assert key_id_of(path, ROTATED) == "b1"
    assert read_table(path, ONLY_B).equals(MEMBERS)
    with pytest.raises(DecryptionError, match="key 'b1', not in the keyring"):
        read_table(path, RING_A)


def test_rekey_command_rewrites_run_intermediates_and_rosters(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    old = load_keyring(data_dir, {})
    intermediate = data_dir / "runs" / "r1" / "files" / "7" / "accepted.parquet"
    roster = data_dir / "rosters" / "acme.parquet"
    for path in (intermediate, roster):
        path.parent.mkdir(parents=True)
        write_members(path, old)

    environment = {"EOB_DATA_DIR": str(data_dir), atrest.ENV_VAR: ""}
    result = CliRunner().invoke(main, ["rekey", "--new-dev-key"], env=environment)

    assert result.exit_code == 0, result.output
    new = load_keyring(data_dir, {})
    only_new = atrest.Keyring({new.active_id: new.keys[new.active_id]}, new.active_id)
    for path in (intermediate, roster):
        assert key_id_of(path, only_new) == new.active_id != old.active_id
        assert read_table(path, only_new).equals(MEMBERS)
