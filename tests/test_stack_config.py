"""docker/compose.yaml's settings, without Docker (the stack itself: tests/test_stack.py)."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_every_compose_setting_is_in_the_env_example() -> None:
    text = (REPO / "docker" / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", text)) - {"COMPOSE_PROJECT_NAME"}
    example = {line.split("=")[0] for line in (REPO / "docker" / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert len(used) > 10 and used <= example, sorted(used - example)


def test_published_ports_bind_loopback_by_default() -> None:
    ports = re.findall(r"^\s+- (\S+):\$\{\w+:-\d+\}:\d+$", (REPO / "docker" / "compose.yaml").read_text(), re.M)
    assert len(ports) == 3 and set(ports) == {"${CXR_BIND_ADDRESS:-127.0.0.1}"}
