"""A client whose local FM differs from the server's downloads the server's FM before learning anything."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.fm import FoundationModel, files_digest
from fcl_client.connection import Connection
from fcl_client.runner import ClientConfig, ClientRunner
from tests.servers import inprocess_server


def test_client_with_other_fm_downloads_the_servers(
    tmp_path: Path, fm: FoundationModel, small_split: Path
) -> None:
    other = tmp_path / "other-fm"
    shutil.copytree(fm.path, other)
    config = other / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # same weights, different files: a different FM
    assert files_digest(other) != fm.files_digest

    server = inprocess_server(tmp_path, fm, public_corpus=small_split / "public.txt")
    try:
        server.state.add_token("tok-1", "client-0", False)
        client_cfg = ClientConfig(
            server=f"127.0.0.1:{server.port}",
            client_id="client-0",
            token="tok-1",
            stream=small_split / "clients" / "client-0",
            work_dir=tmp_path / "work",
            fm=str(other),
            device="cpu",
        )
        lines: list[str] = []
        with Connection(client_cfg.server, client_cfg.token) as conn:
            resolved = ClientRunner(client_cfg, conn, say=lines.append).resolve_fm()
    finally:
        server.stop(grace=1)
    assert resolved.digest == fm.digest and resolved.path != other
    assert resolved.path.is_relative_to(tmp_path / "work" / "fm")
    assert any("downloading the server's FM" in line for line in lines)
