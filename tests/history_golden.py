"""The history file's format, one golden line per kind of record and per shape it comes in.

The history is a contract: people `tail -F` it and scripts parse it. These lines were captured
from what ckptd wrote before its history events became typed (issue 8): every writer in
`daemon/` ran under the integration tests with its records recorded, one sample per event and
set of fields kept here (paths, PIDs and timings replaced by fixed values; `time` fixed at the
epoch). Key order is part of the format (the writer keeps it), so the lines are compared whole.

Issue 10 appended one field to `delete`, `prune_run` and `trash_purge`: `bytes_logical`, the
files' lengths, since `bytes_freed` became the allocated bytes the filesystem got back (a sparse
file's length is not what its deletion frees). Every earlier field keeps its name and place.

Shapes not written in-process by any test (a failed escalation step, `trash_restore` from the
CLI, two `snapshot_skipped` variants) were transcribed from their call sites in that version.
"""

from __future__ import annotations

import json
from typing import Any

EPOCH = "1970-01-01T00:00:00.000+00:00"

# name of the shape -> the whole line (without its newline)
GOLDEN: dict[str, str] = {
    "delete": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"delete","root":"/data/run",'
        '"checkpoint":"checkpoint-100","step":100,"series":"default","bytes_freed":12000,'
        '"bytes_in_trash":0,"trash_grace":0.0,"partial":false,"errors":[],'
        '"why":["tier3:every-1000: 1000 represents the bucket"],"tier":3,'
        '"policy":{"keep_last":20,"tier2_count":20,"tier3_interval":1000,"cadence":null,'
        '"keep_best":null},"bytes_logical":12000}'
    ),
    "delete_partial_in_trash": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"delete","root":"/data/run",'
        '"checkpoint":"checkpoint-200","step":200,"series":"default","bytes_freed":0,'
        '"bytes_in_trash":0,"trash_grace":3600.0,"partial":true,'
        '"errors":["/data/run/.ckptd-trash/checkpoint-200@1800000000/x.bin: Permission denied"],'
        '"why":["tier2:every-200"],"tier":2,"policy":{},"bytes_logical":0}'
    ),
    "slim": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"slim","root":"/data/run",'
        '"checkpoint":"checkpoint-13200","step":13200,"series":"default",'
        '"files":["optimizer.pt","rng_state.pth","scheduler.pt"],"bytes_freed":2400002048,'
        '"bytes_in_trash":0,"trash_grace":0.0,"partial":false,"errors":[],'
        '"why":["tier2:every-200","slim:after-tier1"],"tier":2,'
        '"policy":{"keep_last":20,"tier2_count":20,"tier3_interval":1000,"cadence":null,'
        '"keep_best":null,"slim":{"after":"tier1","keep_best_full":false,"drop":null}}}'
    ),
    "veto_by_guard": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"veto","root":"/data/run",'
        '"checkpoint":"checkpoint-800","step":800,"reason":"min_keep:3"}'
    ),
    "veto_in_use": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"veto","root":"/data/run",'
        '"checkpoint":"checkpoint-100","step":100,'
        '"reason":"in-use:pid 4242 (python -c import sys, time; h ...)","pid":4242,'
        '"cmdline":"python -c import sys, time; h = open(sys.argv[1]); time.sleep(60)"}'
    ),
    "prune_refused": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"prune_refused","root":"/data/run",'
        '"reason":"the trainer pid 4242 (python train.py) holds the newest checkpoint '
        'checkpoint-1000 (cwd /data/run/checkpoint-1000)","pids":[4242],'
        '"cmdlines":["python train.py"],"dry_run":false}'
    ),
    "prune_refused_busy": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"prune_refused","root":"/data/run",'
        '"reason":"another prune of this root is running (the daemon, or ckptd prune)",'
        '"pids":[],"cmdlines":[]}'
    ),
    "prune_run": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"prune_run","root":"/data/run",'
        '"dry_run":false,"checkpoints":10,"kept":4,"deleted":6,"would_delete":0,"vetoed":0,'
        '"failed":0,"trashed":0,"bytes_freed":12000,"bytes_in_trash":0,"seconds":0.029,'
        '"force":false,"policy":{"keep_last":20,"tier2_count":20,"tier3_interval":1000,'
        '"cadence":null,"keep_best":null},"bytes_logical":12000}'
    ),
    "prune_run_after_quiet_runs": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"prune_run","root":"/data/run",'
        '"dry_run":false,"checkpoints":11,"kept":10,"deleted":1,"would_delete":0,"vetoed":0,'
        '"failed":0,"trashed":0,"bytes_freed":2000,"bytes_in_trash":0,"seconds":0.004,'
        '"force":false,"policy":{"keep_last":20,"tier2_count":20,"tier3_interval":1000,'
        '"cadence":null,"keep_best":null},"quiet_runs":3,"bytes_logical":2000}'
    ),
    "prune_run_slims": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"prune_run","root":"/data/run",'
        '"dry_run":false,"checkpoints":10,"kept":5,"deleted":5,"would_delete":0,"vetoed":0,'
        '"failed":0,"trashed":0,"bytes_freed":6000,"bytes_in_trash":0,"seconds":0.031,'
        '"force":false,"policy":{"keep_last":3,"tier2_count":4,"tier3_interval":1000,'
        '"cadence":100,"keep_best":null,"slim":{"after":"tier1","keep_best_full":false,'
        '"drop":null}},"bytes_logical":6000,"slimmed":2,"bytes_slimmed":8192}'
    ),
    "trash_purge": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"trash_purge","root":"/data/run",'
        '"checkpoint":"checkpoint-200","bytes_freed":2000,"deleted_at":1800000000.0,'
        '"partial":false,"errors":[],"bytes_logical":2000}'
    ),
    "trash_restore": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"trash_restore","root":"/data/run",'
        '"checkpoint":"checkpoint-100"}'
    ),
    "snapshot": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot","date":"2026-06-01",'
        '"path":"/data/snaps/2026-06-01","method":"copy","checkpoints":["run-a/checkpoint-300"],'
        '"files":4,"bytes":132116,"bytes_written":132116,"by_method":{"copy":4},'
        '"seconds":0.029}'
    ),
    "snapshot_removed": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_removed",'
        '"date":"2026-06-01","removed":"2026-05-28","keep":3}'
    ),
    "snapshot_skipped": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_skipped",'
        '"date":"2026-06-01","reason":"snapshots.dir is not set"}'
    ),
    "snapshot_skipped_nothing": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_skipped",'
        '"date":"2026-06-01","reason":"no complete checkpoint to snapshot",'
        '"errors":["/data/run: no such folder"]}'
    ),
    "snapshot_skipped_too_big": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_skipped",'
        '"date":"2026-06-01","reason":"would write 132116 B and bring /data/snaps to 27.0% '
        'used (critical: 0.001%)","bytes_to_write":132116,"checkpoints":["run-a/checkpoint-300"]}'
    ),
    "snapshot_failed": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_failed",'
        '"date":"2026-06-01","reason":"stopped (shutting down)"}'
    ),
    "snapshot_failed_planning": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_failed",'
        '"date":"2026-06-01","reason":"snapshots.method is hardlink, but /data/snaps is on '
        "another filesystem than /data/run-a/checkpoint-300/shard-0.safetensors; use method "
        'auto or copy","method":"hardlink"}'
    ),
    "snapshot_failed_copying": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"snapshot_failed",'
        '"date":"2026-06-01","reason":"source vanished (pruned away?): [Errno 2] No such file '
        "or directory: '/data/run-a/checkpoint-300/shard-0.safetensors'\","
        '"method":"copy","checkpoints":["run-a/checkpoint-300"]}'
    ),
    "disk_warn": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"disk_warn","mount":"/data",'
        '"roots":["/data/run"],"used_percent":62.5,"free_bytes":6291456,"warn_percent":50.0}'
    ),
    "disk_critical": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"disk_critical","mount":"/data",'
        '"roots":["/data/run"],"used_percent":81.2,"free_bytes":3145728,'
        '"critical_percent":60.0,"min_free":null}'
    ),
    "disk_trash_emptied": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"disk_trash_emptied","mount":"/data",'
        '"root":"/data/run","trash_bytes_freed":1048576,"used_percent":75.0,'
        '"free_bytes":4194304}'
    ),
    "disk_prune": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"disk_prune","mount":"/data",'
        '"root":"/data/run","deleted":2,"bytes_freed":0,"trash_bytes_freed":0,"refused":null,'
        '"vetoed":0,"used_percent":62.5,"free_bytes":6291456}'
    ),
    "disk_prune_failed": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"disk_prune","mount":"/data",'
        '"root":"/data/run","error":"OSError: [Errno 5] Input/output error",'
        '"used_percent":97.5,"free_bytes":1048576}'
    ),
    "emergency_prune": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"emergency_prune","mount":"/data",'
        '"root":"/data/run","deleted":6,"bytes_freed":0,"trash_bytes_freed":0,'
        '"refused":"the trainer holds the newest checkpoint","vetoed":1,"used_percent":25.0,'
        '"free_bytes":12582912}'
    ),
    "disk_recovered": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"disk_recovered","mount":"/data",'
        '"used_percent":25.0,"free_bytes":12582912}'
    ),
    "alert": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"alert","mount":"/data",'
        '"command":"python /data/alert.py /data/alert.json","level":"ok","exit_code":0,'
        '"stderr":""}'
    ),
    "alert_failed": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"alert","mount":"/data",'
        '"command":"/nonexistent/alert-command --now","level":"critical",'
        '"error":"[Errno 2] No such file or directory: \'/nonexistent/alert-command\'"}'
    ),
    "integrity_corrupt": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"integrity_corrupt","root":"/data/run",'
        '"checkpoint":"checkpoint-300","problems":["model.safetensors: the header says 4000 '
        'bytes of tensor data, the file holds 1000"],"deep":false}'
    ),
    "user_test": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"user_test","root":"/data/run",'
        '"checkpoint":"checkpoint-300","command":["python3","test_model.py","--model",'
        '"/data/run/checkpoint-300"],"verdict":"failed","exit_code":3,"seconds":1.5,'
        '"last_lines":["loading /data/run/checkpoint-300","accuracy 0.12 < 0.5"],"error":null}'
    ),
    "user_test_timed_out": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"user_test","root":"/data/run",'
        '"checkpoint":"checkpoint-300","command":["python3","test_model.py","--model",'
        '"/data/run/checkpoint-300"],"verdict":"failed","exit_code":null,"seconds":3600.0,'
        '"last_lines":["epoch 1/100"],"error":"timed out after 3600 s"}'
    ),
    "hold_expired": (
        '{"time":"1970-01-01T00:00:00.000+00:00","event":"hold_expired","root":"/data/run",'
        '"checkpoint":"checkpoint-300","holder":"eval-sweep","until":"2026-12-24T00:00:00+01:00",'
        '"reason":"eval sweep v3"}'
    ),
}

# Every event name written to the history, and the module that writes it.
EVENT_NAMES = (
    "delete",
    "slim",
    "veto",
    "prune_refused",
    "prune_run",
    "trash_purge",
    "trash_restore",
    "snapshot",
    "snapshot_removed",
    "snapshot_skipped",
    "snapshot_failed",
    "disk_warn",
    "disk_critical",
    "disk_trash_emptied",
    "disk_prune",
    "emergency_prune",
    "disk_recovered",
    "alert",
    "integrity_corrupt",
    "user_test",
    "hold_expired",
)


def golden_record(shape: str) -> dict[str, Any]:
    """Given a shape's name, return its golden line parsed."""
    record: dict[str, Any] = json.loads(GOLDEN[shape])
    return record


def signature(record: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Given a record, return its field names in order, each with its JSON type.

    Two records of the same shape written by the same code have the same signature, whatever
    their values; `null` matches any type (an optional figure may be unknown).
    """
    return tuple((key, _json_type(value)) for key, value in record.items())


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "object"


def matching_shape(record: dict[str, Any]) -> str | None:
    """Given a record, return the golden shape with the same fields in the same order and of
    the same JSON types (null matching anything), or None."""
    found = signature(record)
    for shape in GOLDEN:
        expected = signature(golden_record(shape))
        if len(expected) != len(found):
            continue
        if all(
            key == other_key and (kind == other_kind or "null" in (kind, other_kind))
            for (key, kind), (other_key, other_kind) in zip(expected, found, strict=True)
        ):
            return shape
    return None
