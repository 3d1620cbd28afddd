"""DeepSpeed: the shard set of a `global_step<N>/` folder is complete for the world size it names.

`DeepSpeedEngine.save_checkpoint` writes, per model-parallel rank `m` (two digits):

- `mp_rank_<m>_model_states.pt` (ZeRO stages 0-2: data-parallel rank 0 of each model-parallel
  rank), or with ZeRO-3 one `zero_pp_rank_<d>_mp_rank_<m>_model_states.pt` per data-parallel
  rank `d`;
- with a ZeRO (or bf16) optimizer, one `[bf16_]zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt`
  per data-parallel rank `d`.

The model-states file records `dp_world_size` and `mp_world_size` (read here through the
stand-in unpickler, no torch): every `(d, m)` below them must have its files. Where no model
states file could be read, the ranks the names show must at least form a full grid from 0 (a
missing last rank is then invisible). Every file is also checked as a torch.save file.
"""

from __future__ import annotations

import re
from typing import Any, Final

from daemon.integrity.files import Context
from daemon.integrity.torchzip import world_sizes

MODEL_STATES: Final = re.compile(r"mp_rank_(\d+)_model_states\.pt")
ZERO_FILE: Final = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt")


def is_shard_folder(names: list[str]) -> bool:
    """Given the file names of a folder, return whether it holds DeepSpeed states."""
    return any(MODEL_STATES.fullmatch(name) or ZERO_FILE.fullmatch(name) for name in names)


def check_shard_set(
    context: Context, folder: str, names: list[str], objects: dict[str, Any]
) -> None:
    """Given a folder of the checkpoint, its file names and the unpickled objects of the
    torch files checked in it (by name), report every shard missing from the set."""
    prefix = f"{folder}/" if folder else ""
    families: dict[tuple[str, str], set[tuple[int, int]]] = {}
    model_ranks: set[int] = set()
    for name in names:
        if found := MODEL_STATES.fullmatch(name):
            model_ranks.add(int(found.group(1)))
        elif found := ZERO_FILE.fullmatch(name):
            family = (found.group(1) or "", found.group(4))
            families.setdefault(family, set()).add((int(found.group(2)), int(found.group(3))))
    sizes = _declared_sizes(objects)
    if not model_ranks and not any(kind == "model" for _, kind in families):
        context.findings.problem(folder or ".", "no model states file (mp_rank_*_model_states.pt)")
    mp_size = sizes.get("mp_world_size")
    dp_size = sizes.get("dp_world_size")
    if model_ranks:
        expected_mp = range(mp_size if mp_size else max(model_ranks) + 1)
        for rank in expected_mp:
            if rank not in model_ranks:
                context.findings.problem(
                    f"{prefix}mp_rank_{rank:02d}_model_states.pt",
                    f"missing (model-parallel rank {rank} of {len(expected_mp)})",
                )
    for (bf16, kind), ranks in sorted(families.items()):
        dp_range = range(dp_size if dp_size else max(d for d, _ in ranks) + 1)
        mp_range = range(mp_size if mp_size else max(m for _, m in ranks) + 1)
        for dp in dp_range:
            for mp in mp_range:
                if (dp, mp) not in ranks:
                    context.findings.problem(
                        f"{prefix}{bf16}zero_pp_rank_{dp}_mp_rank_{mp:02d}_{kind}_states.pt",
                        f"missing (data-parallel rank {dp} of {len(dp_range)},"
                        f" model-parallel rank {mp} of {len(mp_range)})",
                    )


def _declared_sizes(objects: dict[str, Any]) -> dict[str, int]:
    for name in sorted(objects):
        if name.endswith("model_states.pt"):
            sizes = world_sizes(objects[name])
            if sizes:
                return sizes
    return {}
