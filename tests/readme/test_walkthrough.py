"""The README's walkthrough, run as written against a real ``aigen serve`` on a fresh data dir.

The fenced ``sh`` blocks of the section "Walk a generation through" are joined into one bash
script (``set -e``: a step that fails stops it, as it would a person), with a marker before
each commented step; the output of every step is then checked against what its comment
promises. Only the port is changed, so the test never collides with a running service.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Walk a generation through"
MARK = "@@STEP "


def walkthrough_blocks(readme: str) -> list[str]:
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end != -1 else None]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)


def steps_script(blocks: list[str], port: int) -> tuple[str, list[str]]:
    """One script; a comment at the start of a line opens a step, named by that comment."""
    names: list[str] = []
    lines = ["set -e"]
    for block in blocks:
        previous_was_comment = False
        for line in block.replace("127.0.0.1:8000", f"127.0.0.1:{port}").splitlines():
            if line.startswith("# ") and not previous_was_comment:
                names.append(line[2:])
                lines.append(f"echo '{MARK}{len(names) - 1}'")
            previous_was_comment = line.startswith("# ")
            lines.append(line)
    return "\n".join(lines) + "\n", names


def json_docs(text: str) -> list[Any]:
    """Every JSON document in a step's output (pretty-printed by the README's helper)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                doc, end = decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            docs.append(doc)
            i = end
        else:
            i += 1
    return docs


@pytest.fixture
def service(tmp_path: Path) -> Iterator[int]:
    if not shutil.which("curl") or not shutil.which("bash"):
        pytest.fail("the README walkthrough needs bash and curl")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGEN_")}
    env.update(AIGEN_DATA_DIR=str(tmp_path / "data"), AIGEN_DEMO_DELAY_S="0.1")
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "aigen.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"aigen serve exited: {log.read()[-2000:]}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "aigen serve did not become ready"
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_the_readme_walkthrough_runs_as_written(service: int, tmp_path: Path) -> None:
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3, "the walkthrough's shell blocks were not found"
    script, names = steps_script(blocks, service)
    (tmp_path / "walkthrough.sh").write_text(script)
    result = subprocess.run(["bash", str(tmp_path / "walkthrough.sh")], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr

    chunks = result.stdout.split(MARK)[1:]
    outputs = {names[int(c.split("\n", 1)[0])]: c.split("\n", 1)[1] for c in chunks}
    assert len(outputs) == len(names)

    def step(prefix: str) -> tuple[str, list[Any]]:
        (name,) = [n for n in names if n.startswith(prefix)]
        return outputs[name], json_docs(outputs[name])

    _, (account,) = step("Give user u-42 some credits")
    assert account["balance"] == "10.00" and account["plan"] == "free"

    text, (started,) = step("Start a generation")
    assert started["state"] == "processing_samples"
    assert started["credits"]["held"] == "0.25"
    gen_id = started["id"]
    assert f"GEN={gen_id}" in text

    _, (ready,) = step("Two seconds later")
    assert ready["state"] == "awaiting_selection" and len(ready["samples"]) == 4
    assert ready["credits"]["charged"] == "0.25"
    for sample in ready["samples"]:
        image = httpx.get(sample["url"], timeout=5)
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

    _, (regenerating, second) = step("Not happy with them?")
    assert regenerating["state"] == "processing_samples"
    assert second["state"] == "awaiting_selection"
    assert {s["url"] for s in second["samples"]}.isdisjoint(s["url"] for s in ready["samples"])
    assert second["credits"]["charged"] == "0.50"

    _, (selecting, done) = step("Pick s2 in high resolution")
    assert selecting["state"] == "processing_final" and selecting["credits"]["held"] == "2.00"
    assert done["state"] == "completed" and done["selected_sample_id"] == "s2"
    assert (done["final_asset"]["width"], done["final_asset"]["height"]) == (4096, 4096)
    assert done["credits"] == {"held": "0.00", "charged": "2.50", "released": "0.00"}

    _, (account, history) = step("The account")
    assert account["balance"] == "7.50" and account["available"] == "7.50"
    assert history["id"] == gen_id and history["state"] == "completed"
    assert [e["to_state"] for e in history["events"] if e["kind"] == "transition"][-1] == \
        "completed"

    _, (replayed,) = step("The same Idempotency-Key and body again")
    assert replayed["id"] == gen_id and replayed["state"] == "processing_samples"

    text, _ = step("The same key with another body")
    assert "refused, as it should be" in text
    assert "idempotency_key_reused" in result.stderr

    text, (started2, cancelled) = step("Cancel a generation")
    assert f"GEN2={started2['id']}" in text
    assert started2["credits"]["held"] == "0.25"
    assert cancelled["state"] == "cancelled" and cancelled["credits"]["held"] == "0.00"
    # charged if the samples arrived before the cancel, released if not; never both or neither
    assert {cancelled["credits"]["charged"], cancelled["credits"]["released"]} == {"0.25", "0.00"}

    _, (listing,) = step("Support lists")
    assert [g["id"] for g in listing["items"]] == [started2["id"], gen_id]

    _, (plan,) = step("Odoo sets the plan")
    assert plan["plan"] == "pro"
    assert plan["balance"] == ("7.25" if cancelled["credits"]["charged"] == "0.25" else "7.50")


def test_a_failed_start_stops_the_walkthrough_with_a_clear_message(tmp_path: Path) -> None:
    """Nothing listening: the start fails loudly, and GEN is never used empty (no 307)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])  # closed again: nothing listens there
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    script, _ = steps_script(blocks[:2], port)
    script = script.replace("set -e\n", "", 1)  # as pasted into an interactive shell
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert "Failed to connect" in result.stderr
    assert "no generation: the POST above failed" in result.stderr
    assert "GEN: parameter null or not set" in result.stderr
    assert "Traceback" not in result.stderr
    assert "307" not in result.stdout + result.stderr
