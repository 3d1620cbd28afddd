"""Integrity checks of checkpoints without the frameworks: headers and indexes, or every checksum.

Entry points:

- `check.check_checkpoint(root, name, layout, *, deep=False, stop=None, progress=None)` ->
  `result.IntegrityResult` (`ok` | `corrupt` | `unknown`, problems, the size signature it is
  valid for);
- `cache.IntegrityCache` and `cache.check_cached(...)`: each checkpoint checked once while its
  signature (every entry's path, kind, size, mtime) holds, remembered in `state_dir`;
- `background.BackgroundVerifier`: the deep pass of new checkpoints in one thread at idle I/O
  priority, stoppable within a chunk;
- `trackers.check_root_trackers(root)`: a root's `latest`, `latest_checkpointed_iteration.txt`
  and TF `checkpoint` name checkpoints that exist.

One module per format (`safetensors`, `torchzip`, `dcp`, `deepspeed`, `orbax`, `tfindex`,
`trackers`), all reading through `files` (dir-fd relative, `O_NOFOLLOW|O_NONBLOCK`, regular
files only, bounded reads). Standard library only: torch's pickles are read with stand-ins
(`pickles`), CRC-32C is pure Python (`crc`).
"""
