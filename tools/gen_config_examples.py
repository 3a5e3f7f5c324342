"""Write deploy/{server,client,agent}.example.toml from the option models (run after adding an option)."""

from __future__ import annotations

import sys
from pathlib import Path

from common.settings import example_toml
from fcl_client.settings import AgentSettings, RunSettings
from fcl_server.settings import ServeSettings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    ROOT / "deploy" / "server.example.toml": lambda: example_toml(
        ServeSettings, "fcl-server serve --config server.example.toml"
    ),
    ROOT / "deploy" / "client.example.toml": lambda: example_toml(
        RunSettings, "fcl-client run --config client.example.toml", set_keys=["token_file"]
    ),
    ROOT / "deploy" / "agent.example.toml": lambda: example_toml(
        AgentSettings, "fcl-client agent --config agent.example.toml", set_keys=["token_file"]
    ),
}


def main() -> int:
    for path, render in EXAMPLES.items():
        path.write_text(render())
        print(path.relative_to(ROOT), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
