"""The shipped unit under a real systemd 252: installed as the README says, it prunes.

A Debian 12 root (built once by mmdebstrap, cached in /var/cache/ckptd-tests) boots with
`systemd-nspawn -b`. In it: ckptd installed from wheels into /opt/ckptd/venv, the config in
/etc/ckptd/config.yaml, `systemd/ckptd.service` as shipped plus the README's `systemctl edit`
drop-in (ReadWritePaths=) and one of the test's own (WatchdogSec=5, to be quick). A user
`trainer` owns the run (group `training`, group-writable, setgid; ckptd is in the group) and
holds a file open in one old checkpoint that the plan deletes.

Checked: READY and STATUS; the start-up prune deletes exactly what `ckptd plan` says but the
held checkpoint (vetoed, `in-use:pid …` in the history); journal priorities; a reload applies
a new policy; a bad reload keeps the old config (file and line in the log, and the old policy
still prunes a new checkpoint); SIGSTOP -> the watchdog restarts it; a clean stop; a config
error at start exits 2 and is not restarted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.field.nspawn import (
    CACHE,
    REPOSITORY,
    booted_container,
    build_wheels,
    cached_root,
    require_tools,
)

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = "/srv/runs/model-a"
HELD = "checkpoint-300"
CONFIG = "/etc/ckptd/config.yaml"
HISTORY = "/var/log/ckptd/history.jsonl"
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19

CONFIG_TEXT = f"""\
timezone: UTC
history_file: {HISTORY}
log: {{level: info, format: auto}}
defaults:
  policy: {{keep_last: KEEP_LAST, tier2_count: 0, tier3_interval: null}}
  settle_seconds: 2s
  min_keep: 3
  max_delete_fraction: 0.9
  trash: {{grace: 0s}}
roots:
  - path: {ROOT}
    layout: hf
snapshots: {{enabled: false}}
"""

# Hugging-Face-style checkpoints, written as the trainer writes them: the weights, then
# trainer_state.json last (the marker that makes a checkpoint complete). `--old` backdates them.
WRITER = """\
import json, os, sys, time
root, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
old = "--old" in sys.argv
for step in range(first, last + 1, 100):
    folder = os.path.join(root, f"checkpoint-{step}")
    os.mkdir(folder)
    # A well-formed safetensors file (ckptd checks every new checkpoint's headers).
    header = json.dumps({"w": {"dtype": "U8", "shape": [8192], "data_offsets": [0, 8192]}})
    with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header.encode() + os.urandom(8192))
    with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
        json.dump({"global_step": step, "log_history": []}, handle)
    if old:
        for name in ("model.safetensors", "trainer_state.json", ""):
            path = os.path.join(folder, name)
            os.utime(path, (time.time() - 3600, time.time() - 3600))
"""


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f} s: {what}")
        time.sleep(0.25)


def now_usec() -> int:
    return int(time.time() * 1_000_000)


def test_the_unit_as_the_readme_installs_it(timing: Callable[[str], None]) -> None:
    started = time.monotonic()
    require_tools()
    root = cached_root()
    timing(f"cached Debian root ready in {time.monotonic() - started:.1f} s ({root})")
    with_root = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    try:
        _scenario(work, root, timing)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timing(
        f"total {time.monotonic() - started:.1f} s, "
        f"{time.monotonic() - with_root:.1f} s after the cached root"
    )


def _scenario(work: Path, root: Path, timing: Callable[[str], None]) -> None:
    step_started = time.monotonic()

    def step(name: str) -> None:
        nonlocal step_started
        timing(f"{name}: {time.monotonic() - step_started:.1f} s")
        step_started = time.monotonic()

    build_wheels(work / "wheels")
    step("wheels of this checkout and its dependencies")
    with booted_container(work, root, f"ckptd-test-{os.getpid()}") as box:
        step("copy and boot the container")
        # --- the README's install, with the wheels instead of a checkout and no network ---
        shutil.copytree(work / "wheels", box.directory / "root" / "wheels")
        shutil.copytree(REPOSITORY / "systemd", box.directory / "root" / "ckptd-systemd")
        box.write("/root/config.yaml", CONFIG_TEXT.replace("KEEP_LAST", "5"))
        box.write("/usr/local/bin/write-checkpoints", WRITER, 0o755)
        box.sh(
            """
            groupadd training
            useradd --create-home --groups training trainer
            install -d -o trainer -g training -m 2775 /srv/runs /srv/runs/model-a
            useradd --system --home-dir /var/lib/ckptd --shell /usr/sbin/nologin ckptd
            usermod -aG training ckptd
            python3 -m venv /opt/ckptd/venv
            /opt/ckptd/venv/bin/pip install -q --no-index --find-links /root/wheels ckptd
            install -D -m 0644 /root/config.yaml /etc/ckptd/config.yaml
            /opt/ckptd/venv/bin/ckptd check-config /etc/ckptd/config.yaml
            install -m 0644 /root/ckptd-systemd/ckptd.service /etc/systemd/system/ckptd.service
            # what `systemctl edit ckptd` writes, then the test's own: a quick watchdog
            mkdir -p /etc/systemd/system/ckptd.service.d
            printf '[Service]\\nReadWritePaths=/srv/runs\\n' \
                > /etc/systemd/system/ckptd.service.d/override.conf
            printf '[Service]\\nWatchdogSec=5\\n' \
                > /etc/systemd/system/ckptd.service.d/test-watchdog.conf
            install -m 0644 /root/ckptd-systemd/ckptd.logrotate /etc/logrotate.d/ckptd
            """,
            timeout=300,
        )
        step("install ckptd as the README says")

        # --- a run of 30 checkpoints by `trainer`, and the trainer holding an old one ---
        box.sh(
            f"runuser -u trainer -- sh -c 'umask 002; python3 "
            f"/usr/local/bin/write-checkpoints {ROOT} 100 3000 --old'"
        )
        plan = json.loads(
            box.sh(f"/opt/ckptd/venv/bin/ckptd plan {ROOT} --config {CONFIG} --json").stdout
        )
        plan = plan[0] if isinstance(plan, list) else plan
        planned = {c["name"] for c in plan["checkpoints"] if c["action"] == "delete"}
        everything = {c["name"] for c in plan["checkpoints"]}
        assert len(everything) == 30 and len(planned) == 25, plan["summary"]
        assert HELD in planned
        box.sh(
            "systemd-run --quiet --unit=trainer-hold --uid=trainer --gid=trainer "
            "-p SupplementaryGroups=training /usr/bin/python3 -c "
            f"\"import time; f = open('{ROOT}/{HELD}/model.safetensors', 'rb'); "
            'time.sleep(100000)"'
        )
        trainer_pid = int(box.show("trainer-hold", "MainPID")["MainPID"])
        wait_for(
            lambda: (
                f"{HELD}/model.safetensors"
                in box.sh(f"ls -l /proc/{trainer_pid}/fd", check=False).stdout
            ),
            10,
            "the trainer opens its file",
        )
        assert box.sh(f"stat -c %a {ROOT}/{HELD} {ROOT}").stdout.split() == ["2775", "2775"]
        step("30 checkpoints, the trainer holds one")

        # --- start: READY=1 after the start-up prune, STATUS= ---
        mark = now_usec()
        box.sh("systemctl daemon-reload && systemctl enable --now ckptd", timeout=120)
        state = box.show("ckptd", "ActiveState", "SubState", "StatusText", "MainPID", "User")
        assert state["ActiveState"] == "active" and state["SubState"] == "running", state
        assert state["StatusText"].startswith("watching 1/1 roots"), state
        main_pid = state["MainPID"]

        # --- the prune: exactly the plan, but the held checkpoint ---
        def history() -> list[dict[str, Any]]:
            text = box.sh(f"cat {HISTORY} 2>/dev/null || true").stdout
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        def present() -> set[str]:
            return set(box.sh(f"ls {ROOT}").stdout.split())

        expected = everything - (planned - {HELD})
        try:
            wait_for(lambda: present() == expected, 30, "the plan's deletions, but the held one")
        except AssertionError as error:
            reasons = {r["reason"][:300] for r in history() if r["event"] == "veto"}
            raise AssertionError(f"{error}; left {sorted(present())}; vetoes {reasons}") from None
        records = history()
        deleted = {r["checkpoint"] for r in records if r["event"] == "delete"}
        assert deleted == planned - {HELD}
        vetoes = [r for r in records if r["event"] == "veto"]
        assert [r["checkpoint"] for r in vetoes] == [HELD], vetoes
        assert vetoes[0]["reason"].startswith(f"in-use:pid {trainer_pid} "), vetoes
        in_trash = box.sh(f"ls {ROOT}/.ckptd-trash 2>/dev/null || true").stdout.split()
        assert in_trash == [], in_trash  # trash grace 0: removed at once
        assert box.sh(f"stat -c %U {ROOT}/{HELD}/model.safetensors").stdout.strip() == "trainer"
        entries = box.journal("ckptd", after_usec=mark)
        ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "ckptd"]
        ready = [e for e in ours if '"event": "ready"' in e["MESSAGE"]]
        assert ready and ready[0]["PRIORITY"] == "6", ready
        # journald took the <N> prefix off each line (SyslogLevelPrefix=yes, the default)
        assert not [e["MESSAGE"] for e in ours if re.match(r"<\d>", e["MESSAGE"])]
        status = box.sh(f"cat /proc/{main_pid}/status").stdout
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        capabilities = int(fields["CapEff"].strip(), 16)
        assert capabilities == (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_SYS_PTRACE), fields["CapEff"]
        assert fields["Uid"].split()[0] == box.sh("id -u ckptd").stdout.strip()
        timing(f"ckptd runs as ckptd with CapEff={fields['CapEff'].strip()}")
        step("start (READY, STATUS) and the start-up prune")

        # --- reload: a new policy applies at once ---
        mark = now_usec()
        box.write(CONFIG, CONFIG_TEXT.replace("KEEP_LAST", "4"))
        box.sh("systemctl reload ckptd")
        wait_for(
            lambda: any(
                '"config_reloaded"' in e["MESSAGE"] for e in box.journal("ckptd", after_usec=mark)
            ),
            20,
            "config_reloaded in the journal",
        )
        wait_for(lambda: "checkpoint-2600" not in present(), 20, "keep_last 4 deletes 2600")
        assert present() == {
            HELD,
            "checkpoint-2700",
            "checkpoint-2800",
            "checkpoint-2900",
            "checkpoint-3000",
        }
        step("reload with a new policy")

        # --- a bad reload: the old config stays in force ---
        mark = now_usec()
        bad = CONFIG_TEXT.replace("KEEP_LAST", "4").replace("min_keep:", "min_kep:")
        bad_line = bad.splitlines().index("  min_kep: 3") + 1
        box.write(CONFIG, bad)
        box.sh("systemctl reload ckptd")

        def config_errors() -> list[dict[str, Any]]:
            return [
                e
                for e in box.journal("ckptd", after_usec=mark, priority="warning")
                if '"config_invalid"' in e["MESSAGE"]
            ]

        errors = wait_for(config_errors, 20, "config_invalid at priority warning or higher")
        problem = json.loads(errors[0]["MESSAGE"])
        assert errors[0]["PRIORITY"] == "3" and problem["level"] == "error"
        assert f"{CONFIG}:{bad_line} defaults.min_kep: unknown key" in problem["problems"][0]
        state = box.show("ckptd", "ActiveState", "StatusText", "MainPID")
        assert state["ActiveState"] == "active" and state["MainPID"] == main_pid
        assert state["StatusText"].startswith("config error, previous config in force"), state
        shown = box.sh("journalctl -u ckptd -p warning --no-pager -o cat").stdout
        assert '"config_invalid"' in shown
        # The old policy (keep_last 4) still prunes: a new checkpoint pushes 2700 out.
        box.sh(
            f"runuser -u trainer -- sh -c 'umask 002; python3 "
            f"/usr/local/bin/write-checkpoints {ROOT} 3100 3100'"
        )
        wait_for(lambda: "checkpoint-2700" not in present(), 30, "the old policy prunes 2700")
        assert present() == {
            HELD,
            "checkpoint-2800",
            "checkpoint-2900",
            "checkpoint-3000",
            "checkpoint-3100",
        }
        box.write(CONFIG, CONFIG_TEXT.replace("KEEP_LAST", "4"))
        box.sh("systemctl reload ckptd")
        wait_for(
            lambda: not box.show("ckptd", "StatusText")["StatusText"].startswith("config error"),
            20,
            "the fixed config clears the STATUS error",
        )
        step("bad reload keeps the old config")

        # --- a hang: SIGSTOP, the watchdog kills, systemd restarts ---
        mark = now_usec()
        box.sh(f"kill -STOP {main_pid}")

        def restarted() -> dict[str, str] | None:
            state = box.show("ckptd", "ActiveState", "MainPID", "NRestarts")
            fresh = state["MainPID"] not in ("0", main_pid) and state["ActiveState"] == "active"
            return state if fresh else None

        state = wait_for(restarted, 60, "a restart after the watchdog timeout")
        assert state["NRestarts"] == "1", state
        messages = [e["MESSAGE"] for e in box.journal("ckptd", after_usec=mark)]
        assert any("Watchdog timeout" in m for m in messages), messages
        main_pid = state["MainPID"]
        step("SIGSTOP -> watchdog restart")

        # --- a clean stop ---
        mark = now_usec()
        box.sh("systemctl stop ckptd", timeout=90)
        state = box.show("ckptd", "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
        assert state == {
            "ActiveState": "inactive",
            "Result": "success",
            "ExecMainStatus": "0",
            "ExecMainCode": "1",  # CLD_EXITED: it exited, no signal killed it
        }, state
        events = [e["MESSAGE"] for e in box.journal("ckptd", after_usec=mark)]
        assert any('"stopped"' in m for m in events), events
        step("clean stop")

        # --- a config error at start: exit 2, failed, not restarted ---
        mark = now_usec()
        box.write(CONFIG, bad)
        started_bad = box.sh("systemctl start ckptd", check=False, timeout=90)
        assert started_bad.returncode != 0
        time.sleep(8)  # RestartSec=5s, and more
        state = box.show("ckptd", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert state == {
            "ActiveState": "failed",
            "Result": "exit-code",
            "ExecMainStatus": "2",
            "NRestarts": "0",
        }, state
        messages = [e["MESSAGE"] for e in box.journal("ckptd", after_usec=mark)]
        assert not any("Scheduled restart job" in m for m in messages), messages
        assert any('"config_invalid"' in m for m in messages), messages
        assert present() == {
            HELD,
            "checkpoint-2800",
            "checkpoint-2900",
            "checkpoint-3000",
            "checkpoint-3100",
        }
        step("config error at start: exit 2, not restarted")
    step("halt and remove the container")
