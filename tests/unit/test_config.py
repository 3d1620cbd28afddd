"""Loading the config: YAML traps, duplicate keys, file:line messages, semantic checks."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from daemon.config import (
    Config,
    PolicyConfig,
    RootConfig,
    RootSettings,
    SeriesConfig,
    StrictYamlLoader,
    load_config,
    load_config_with_warnings,
    policy_for,
    settings_for,
    validate_text,
)
from daemon.errors import ConfigError
from policies.model import PolicySpec

SNAPSHOTS = "snapshots: {dir: /data/snapshots}\n"


def config_of(text: str) -> Config:
    """Given YAML text that must be valid, return its Config."""
    return validate_text(textwrap.dedent(text), "config.yaml")[0]


def warnings_of(text: str) -> list[str]:
    return validate_text(textwrap.dedent(text), "config.yaml")[1]


def problems_of(text: str) -> list[str]:
    """Given YAML text that must be invalid, return its problems as printed."""
    with pytest.raises(ConfigError) as caught:
        validate_text(textwrap.dedent(text), "config.yaml")
    return caught.value.problems


def one_root(path: str = "/data/training/run1", extra: str = "") -> str:
    """Given a root path and more root keys, return a valid config text around them."""
    lines = [SNAPSHOTS, "roots:\n", f"  - path: {path}\n"]
    lines += [f"    {line}\n" for line in textwrap.dedent(extra).splitlines() if line]
    return "".join(lines)


# --- YAML 1.1 traps ----------------------------------------------------------------------------


def test_only_true_and_false_are_booleans() -> None:
    data = yaml.load(
        "a: no\nb: yes\nc: on\nd: off\ne: true\nf: False\ng: y\nh: ~\n", Loader=StrictYamlLoader
    )
    assert data == {
        "a": "no",
        "b": "yes",
        "c": "on",
        "d": "off",
        "e": True,
        "f": False,
        "g": "y",
        "h": None,
    }


def test_numbers_are_decimal_and_clock_times_and_dates_stay_text() -> None:
    data = yaml.load(
        "a: 3:00\nb: 03:00\nc: 0755\nd: 1_000\ne: 1e3\nf: 2.5\ng: 2024-01-01\nh: -7\ni: .5\n",
        Loader=StrictYamlLoader,
    )
    assert data == {
        "a": "3:00",
        "b": "03:00",
        "c": 755,
        "d": 1000,
        "e": 1000.0,
        "f": 2.5,
        "g": "2024-01-01",
        "h": -7,
        "i": 0.5,
    }


@pytest.mark.parametrize("written", ["3:00", "03:00", '"3:00"', "'03:00'"])
def test_snapshot_time_three_oclock_in_any_spelling(written: str) -> None:
    assert config_of(f"snapshots: {{at: {written}}}\n").snapshots.at == "03:00"


def test_a_pattern_or_glob_of_no_stays_text() -> None:
    config = config_of(one_root(extra="protect: [no, on]\ntrainer: {cmdline: yes}"))
    assert config.roots[0].protect == ["no", "on"]
    assert config.roots[0].trainer.cmdline == "yes"


def test_yes_for_a_boolean_is_an_error_that_says_why() -> None:
    assert problems_of("snapshots:\n  enabled: yes\n") == [
        "config.yaml:2 snapshots.enabled: expected true or false "
        "(got 'yes': yes/no/on/off are text in ckptd's YAML)"
    ]


def test_a_leading_zero_is_not_octal() -> None:
    assert config_of(one_root(extra="policy: {keep_last: 020}")).roots[0].policy == PolicyConfig(
        keep_last=20
    )


# --- duplicate keys, anchors -------------------------------------------------------------------


def test_duplicate_key_names_both_lines() -> None:
    text = """\
        roots:
          - path: /data/training/run1
            policy:
              keep_last: 10
              tier2_count: 5
              keep_last: 30
        """
    assert "config.yaml:6 roots[0].policy.keep_last: duplicate key (first at line 4)" in (
        problems_of(text)
    )


def test_duplicate_top_level_section() -> None:
    problems = problems_of("disk: {interval: 5m}\nlog: {level: info}\ndisk: {interval: 1m}\n")
    assert problems == ["config.yaml:3 disk: duplicate key (first at line 1)"]


def test_merge_keys_override_without_being_duplicates() -> None:
    config = config_of(
        """\
        snapshots: {dir: /data/training/snapshots}
        defaults:
          policy: &base {keep_last: 30, tier2_count: 10}
        roots:
          - path: /data/training/run1
            policy: {<<: *base, keep_last: 5}
        """
    )
    assert config.roots[0].policy == PolicyConfig(keep_last=5, tier2_count=10)


def test_an_alias_that_contains_itself_is_a_problem_not_a_crash() -> None:
    problems = problems_of("roots: &loop\n  - *loop\n")
    assert any("alias refers to itself" in problem for problem in problems)


# --- malformed YAML ----------------------------------------------------------------------------


def test_malformed_yaml_gives_line_and_column() -> None:
    problems = problems_of("roots:\n  - path: /data/x\n   layout: hf\n")
    assert len(problems) == 1
    assert problems[0].startswith("config.yaml:3:")
    assert "invalid YAML" in problems[0]


def test_a_tab_gets_a_hint() -> None:
    (problem,) = problems_of("roots:\n\t- path: /data/x\n")
    assert problem.startswith("config.yaml:2:1 invalid YAML")
    assert "spaces, not tabs" in problem


def test_an_unquoted_cron_star_gets_a_hint() -> None:
    (problem,) = problems_of("prune:\n  schedule: * 4 * * sun\n")
    assert problem.startswith("config.yaml:2:")
    assert 'quote values that start with * or &, e.g. schedule: "0 4 * * sun"' in problem


def test_two_documents_are_refused() -> None:
    (problem,) = problems_of("log: {level: info}\n---\nlog: {level: debug}\n")
    assert problem.startswith("config.yaml:2:1 ") and "single document" in problem


def test_a_list_at_the_top_is_refused() -> None:
    assert problems_of("- path: /data\n") == [
        "config.yaml:1 (top level): expected a mapping of keys such as roots:, defaults:, "
        "snapshots:"
    ]


def test_an_unknown_tag_is_refused() -> None:
    (problem,) = problems_of("state_dir: !!python/object:os.system x\n")
    assert problem.startswith("config.yaml:1:")


# --- field errors as short messages ------------------------------------------------------------


def test_keep_last_zero_is_reported_with_line_and_path() -> None:
    text = one_root(extra="policy:\n  keep_last: 0")
    assert problems_of(text) == ["config.yaml:5 roots[0].policy.keep_last: must be >= 1 (got 0)"]


def test_unknown_key_suggests_the_closest_name() -> None:
    assert problems_of(one_root(extra="policy: {keep_lst: 5}")) == [
        "config.yaml:4 roots[0].policy.keep_lst: unknown key (did you mean 'keep_last'?)"
    ]


def test_unknown_key_that_belongs_one_level_down_says_where() -> None:
    assert problems_of(one_root(extra="keep_last: 5")) == [
        "config.yaml:4 roots[0].keep_last: unknown key here (keep_last belongs under 'policy:')"
    ]


def test_unknown_key_without_a_close_match_lists_the_keys() -> None:
    (problem,) = problems_of("log:\n  colour: red\n")
    assert problem == "config.yaml:2 log.colour: unknown key (expected one of: level, format)"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("disk: {warn_percent: lots}", "disk.warn_percent: expected a number (got 'lots')"),
        ("disk: {warn_percent: 120}", "disk.warn_percent: must be <= 100 (got 120)"),
        ("disk: {interval: 0}", "disk.interval: must be > 0 (got 0)"),
        (
            "disk: {interval: 1:30}",
            "disk.interval: '1:30' is not a duration such as 30s, 5m, 1h or 2d",
        ),
        (
            "disk: {min_free: 50 gigs}",
            "disk.min_free: '50 gigs' is not a size such as 50GB or 2GiB",
        ),
        ("defaults: {min_keep: 2.5}", "defaults.min_keep: expected a whole number (got 2.5)"),
        ("defaults: {policy: {tier2_count: -1}}", "defaults.policy.tier2_count: must be >= 0"),
        ("defaults: {policy: {tier3_interval: 0}}", "defaults.policy.tier3_interval: must be > 0"),
        ("defaults: {policy: {keep_best: {count: 0}}}", "keep_best.count: must be >= 1"),
        ("defaults: {policy: {preset: sensible}}", "must be one of balanced, conservative"),
        ("defaults: {max_delete_fraction: 1.5}", "defaults.max_delete_fraction: must be <= 1"),
        ("defaults: {trash: 1h}", "defaults.trash: expected a mapping of keys (got '1h')"),
        (
            "log: {level: loud}",
            "log.level: must be one of debug, info, warning or error (got 'loud')",
        ),
        ("timezone: Mars/Olympus", "timezone: unknown timezone 'Mars/Olympus'"),
        ("state_dir: 5", "state_dir: expected text (got 5: put quotes around it)"),
        ("snapshots: {at: '25:00'}", "snapshots.at: '25:00' is not a time of day"),
        ("snapshots: {at: 300}", "snapshots.at: expected text"),
        ("snapshots: {mutable: last.pt}", "snapshots.mutable: expected a list (got 'last.pt')"),
        ("prune: {schedule: every sunday}", "prune.schedule: 'every sunday' is not a cron"),
        ("prune: {on_new_checkpoint: 1}", "prune.on_new_checkpoint: expected true or false"),
        ("roots: [{layout: hf}]", "roots[0].path: required, but missing"),
        ("roots:", "roots: expected a list (got nothing)"),
    ],
)
def test_field_errors_read_like_a_person_wrote_them(section: str, message: str) -> None:
    problems = problems_of(section + "\n")
    assert any(message in problem for problem in problems), problems
    assert all(problem.startswith("config.yaml:1 ") for problem in problems), problems


def test_a_bad_trainer_regex_is_refused() -> None:
    (problem,) = problems_of(one_root(extra="trainer: {cmdline: 'train(.py'}"))
    assert problem.startswith("config.yaml:4 roots[0].trainer.cmdline: not a valid regular")


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = """\
        timezone: Europe/Berlin
        roots:
          - path: /
            polcy: {preset: balanced}
          - path: /data/training/run1
            policy:
              keep_last: 0
              tier3_interval: -5
        snapshots:
          dir: /data/training/snapshots
          at: "3:61"
        disk:
          interval: soon
          warn_percent: 90
          critical_percent: 80
        """
    assert problems_of(text) == [
        "config.yaml:3 roots[0].path: refused as a root: / is a system folder; point the root "
        "at the training output folder",
        "config.yaml:4 roots[0].polcy: unknown key (did you mean 'policy'?)",
        "config.yaml:7 roots[1].policy.keep_last: must be >= 1 (got 0)",
        "config.yaml:8 roots[1].policy.tier3_interval: must be > 0 (got -5)",
        "config.yaml:11 snapshots.at: '3:61' is not a time of day such as \"03:00\"",
        "config.yaml:13 disk.interval: 'soon' is not a duration such as 30s, 5m, 1h or 2d",
        "config.yaml:15 disk.critical_percent: critical_percent (80) must be above "
        "warn_percent (90)",
    ]


# --- roots -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/", "/etc", "/var", "/var/lib", "/var/log", "/usr", "/usr/local", "/home", "/root", "/boot",
     "/proc/1", "/sys/fs/cgroup", "/dev/shm", "/tmp", "/data/training/../.."],
)  # fmt: skip
def test_system_folders_are_refused_as_roots(path: str) -> None:
    (problem,) = problems_of(one_root(path))
    assert problem.startswith("config.yaml:3 roots[0].path: refused as a root: ")


@pytest.mark.parametrize(
    "path",
    [
        "/var/lib/training/run1",
        "/usr/local/share/ckpts",
        "/data/training/run1",
        "/mnt/x",
        "/dev/shm/run1",
    ],
)
def test_deeper_folders_are_fine(path: str) -> None:
    assert config_of(one_root(path)).roots[0].path == path


def test_the_home_folder_itself_is_refused_but_a_folder_in_it_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "alice"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (problem,) = problems_of(one_root(str(home)))
    assert "is a home folder" in problem
    assert config_of(one_root(f"{home}/runs/llama")).roots[0].path == f"{home}/runs/llama"


def test_a_symlink_to_the_filesystem_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to("/")
    (problem,) = problems_of(one_root(str(tmp_path / "data")))
    assert "refused as a root: / is a system folder" in problem


def test_a_relative_root_is_refused() -> None:
    assert problems_of(one_root("runs/llama")) == [
        "config.yaml:3 roots[0].path: a root must be an absolute path (got 'runs/llama')"
    ]
    (problem,) = problems_of(one_root("~/runs"))
    assert "(~ is not expanded)" in problem


def test_a_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "checkpoint.pt"
    file.write_bytes(b"\0" * 16)
    assert problems_of(one_root(str(file))) == [
        f"config.yaml:3 roots[0].path: {file} is a file, not a folder"
    ]


def test_a_root_that_does_not_exist_yet_is_fine(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    assert config_of(one_root(str(missing))).roots[0].path == str(missing)
    assert not missing.exists()


def test_the_same_root_twice_is_refused() -> None:
    text = SNAPSHOTS + "roots:\n  - path: /data/training/a\n  - path: /data/training/a/\n"
    assert problems_of(text) == [
        "config.yaml:4 roots[1].path: the same folder as roots[0] /data/training/a (line 3)"
    ]


@pytest.mark.parametrize(
    ("first", "second", "word"),
    [
        ("/data/training", "/data/training/a", "inside"),
        ("/data/training/a", "/data/training", "contains"),
    ],
)
def test_nested_roots_are_refused(first: str, second: str, word: str) -> None:
    text = SNAPSHOTS + f"roots:\n  - path: {first}\n  - path: {second}\n"
    assert problems_of(text) == [
        f"config.yaml:4 roots[1].path: {word} roots[0] {first} (line 3): "
        "a folder belongs to one root"
    ]


def test_sibling_roots_with_a_common_prefix_are_fine() -> None:
    text = SNAPSHOTS + "roots:\n  - path: /data/training/a\n  - path: /data/training/ab\n"
    assert len(config_of(text).roots) == 2


# --- patterns, series, globs, trainer ----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("ckpt", "needs {step} or {epoch}: checkpoints are ordered by them"),
        ("ckpt-{stpe}", "unknown placeholder {stpe} (did you mean {step}?)"),
        ("ckpt-{step}-{rank}", "unknown placeholder {rank} (use {step} or {epoch})"),
        ("ckpt-{step", "unbalanced { or }"),
        ("ckpt-{step}-{step}", "{step} appears more than once"),
        ("runs/ckpt-{step}", "cannot contain '/'"),
        ("''", "an empty pattern matches nothing"),
    ],
)
def test_bad_patterns_are_refused(pattern: str, message: str) -> None:
    problems = problems_of(one_root(extra=f"pattern: {pattern}"))
    assert [problem for problem in problems if message in problem], problems
    assert all(problem.startswith("config.yaml:4 roots[0].pattern: ") for problem in problems)


@pytest.mark.parametrize(
    "pattern", ["ckpt-{step}", "epoch={epoch}-step={step}.ckpt", "checkpoint_epoch_{epoch}.pt"]
)
def test_good_patterns_are_fine(pattern: str) -> None:
    assert config_of(one_root(extra=f"pattern: '{pattern}'")).roots[0].pattern == pattern


def test_a_series_pattern_needs_a_placeholder() -> None:
    text = one_root(
        extra="series:\n  - {pattern: 'mid_epoch_{epoch}_{step}.pt'}\n  - {pattern: best.pt}"
    )
    assert problems_of(text) == [
        "config.yaml:6 roots[0].series[1].pattern: needs {step} or {epoch}: checkpoints are "
        "ordered by them"
    ]


def test_pattern_and_series_in_one_root_are_refused() -> None:
    text = one_root(extra="pattern: 'ckpt-{step}'\nseries:\n  - {pattern: 'other-{step}'}")
    (problem,) = problems_of(text)
    assert problem.startswith("config.yaml:5 roots[0].series: set either pattern")


def test_the_same_series_pattern_twice_is_refused() -> None:
    text = one_root(extra="series:\n  - {pattern: 'a-{step}'}\n  - {pattern: 'a-{step}'}")
    assert problems_of(text) == [
        "config.yaml:6 roots[0].series[1].pattern: same pattern as series[0]"
    ]


def test_an_empty_protect_glob_is_refused() -> None:
    assert problems_of(one_root(extra="protect: [best.pt, '']")) == [
        "config.yaml:4 roots[0].protect[1]: an empty glob matches nothing"
    ]


def test_a_relative_pid_file_is_refused() -> None:
    assert problems_of(one_root(extra="trainer: {pid_file: train.pid}")) == [
        "config.yaml:4 roots[0].trainer.pid_file: pid_file must be an absolute path "
        "(got 'train.pid')"
    ]


def test_relative_state_dir_and_history_file_are_refused() -> None:
    problems = problems_of("state_dir: state\nhistory_file: logs/history.jsonl\n")
    assert problems == [
        "config.yaml:1 state_dir: state_dir must be an absolute path (got 'state')",
        "config.yaml:2 history_file: history_file must be an absolute path "
        "(got 'logs/history.jsonl')",
    ]


# --- snapshots ---------------------------------------------------------------------------------


def test_snapshots_need_a_dir_when_there_are_roots() -> None:
    (problem,) = problems_of("roots:\n  - path: /data/training/run1\n")
    assert problem.startswith("config.yaml:1 roots: snapshots are enabled (the default)")
    (problem,) = problems_of("snapshots: {keep: 3}\nroots:\n  - path: /data/training/run1\n")
    assert problem.startswith("config.yaml:1 snapshots: snapshots are enabled")


def test_snapshots_switched_off_need_no_dir() -> None:
    config = config_of("snapshots: {enabled: false}\nroots:\n  - path: /data/training/run1\n")
    assert config.snapshots.enabled is False and config.snapshots.dir is None


def test_snapshots_inside_a_root_are_refused() -> None:
    text = (
        "snapshots:\n  dir: /data/training/run1/snapshots\nroots:\n  - path: /data/training/run1\n"
    )
    assert problems_of(text) == [
        "config.yaml:2 snapshots.dir: inside roots[0] /data/training/run1 (line 4): "
        "snapshots there would be pruned"
    ]


def test_snapshots_containing_a_root_are_refused() -> None:
    text = "snapshots:\n  dir: /data/training\nroots:\n  - path: /data/training/run1\n"
    (problem,) = problems_of(text)
    assert problem.startswith("config.yaml:2 snapshots.dir: contains roots[0]")


def test_critical_percent_must_be_above_warn_percent() -> None:
    assert problems_of("disk:\n  warn_percent: 96\n") == [
        "config.yaml:2 disk.warn_percent: critical_percent (95) must be above warn_percent (96)"
    ]
    assert problems_of("disk:\n  warn_percent: 90\n  critical_percent: 90\n") == [
        "config.yaml:3 disk.critical_percent: critical_percent (90) must be above warn_percent (90)"
    ]


# --- warnings ----------------------------------------------------------------------------------


def test_tier3_denser_than_tier2_is_a_warning_not_an_error() -> None:
    text = one_root(extra="policy:\n  cadence: 500\n  tier3_interval: 600")
    config, warnings = validate_text(text, "config.yaml")
    assert config.roots[0].policy == PolicyConfig(cadence=500, tier3_interval=600)
    assert warnings == [
        "config.yaml:6 roots[0].policy.tier3_interval: tier 3 keeps one per 600 steps, denser "
        "than tier 2's one per 1000 (2 x cadence 500); use tier3_interval >= 1000"
    ]


def test_a_cadence_that_makes_the_preset_interval_too_dense_is_warned_about() -> None:
    warnings = warnings_of("defaults:\n  policy: {preset: balanced, cadence: 1000}\n")
    (warning,) = [warning for warning in warnings if "tier 3" in warning]
    assert warning.startswith("config.yaml:2 defaults.policy: tier 3 keeps one per 1000 steps")


def test_a_numeric_cron_weekday_is_warned_about() -> None:
    (warning,) = [w for w in warnings_of("prune: {schedule: '0 4 * * 0'}\n") if "cron" in w]
    assert warning.startswith("config.yaml:1 prune.schedule: a numeric day of week")


def test_no_roots_is_a_warning() -> None:
    assert warnings_of("log: {level: info}\n") == [
        "config.yaml:1 roots: no roots: `ckptd run` has nothing to look after"
    ]


# --- files -------------------------------------------------------------------------------------


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("# nothing yet\n")
    config, warnings = load_config_with_warnings(file)
    assert config == Config()
    assert len(warnings) == 1 and "no roots" in warnings[0]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")
    assert caught.value.problems == [f"{tmp_path}/nope.yaml: no such config file"]


def test_a_folder_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)


def test_a_binary_file_is_not_a_config(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_bytes(b"roots: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(file)


def test_problems_name_the_file_as_given(tmp_path: Path) -> None:
    file = tmp_path / "ckptd.yaml"
    file.write_text("log:\n  level: loud\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(file))
    assert caught.value.problems[0].startswith(f"{file}:2 log.level: must be one of")


def test_loading_is_pure_so_a_reload_can_keep_the_old_config(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    state = tmp_path / "state"
    file.write_text(f"state_dir: {state}\n" + one_root(extra="policy: {keep_last: 7}"))
    first = load_config(file)
    file.write_text(f"state_dir: {state}\n" + one_root(extra="policy: {keep_last: 0}"))
    with pytest.raises(ConfigError):
        load_config(file)
    # The failed reload changed nothing: the old value is intact, nothing was created on disk.
    assert first.roots[0].policy == PolicyConfig(keep_last=7)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    file.write_text(f"state_dir: {state}\n" + one_root(extra="policy: {keep_last: 9}"))
    assert load_config(file).roots[0].policy == PolicyConfig(keep_last=9)
    assert load_config(file) == load_config(file)


# --- resolution --------------------------------------------------------------------------------


def test_presets_and_knobs_resolve_to_numbers() -> None:
    assert PolicyConfig().to_spec() == PolicySpec(20, 20, 1000)
    assert PolicyConfig(preset="conservative").to_spec() == PolicySpec(50, 30, 500)
    assert PolicyConfig(preset="aggressive", keep_last=4).to_spec() == PolicySpec(4, 10, 5000)


def test_an_explicit_null_interval_keeps_nothing_past_tier2_but_absent_takes_the_preset() -> None:
    config = config_of(
        one_root(
            extra="series:\n"
            "  - {pattern: 'mid_epoch_{epoch}_{step}.pt', "
            "policy: {keep_last: 5, tier2_count: 0, tier3_interval: null}}\n"
            "  - {pattern: 'checkpoint_epoch_{epoch}.pt', policy: {keep_last: 5}}"
        )
    )
    root = config.roots[0]
    assert policy_for(config, root, root.series[0]) == PolicySpec(5, 0, None)
    assert policy_for(config, root, root.series[1]) == PolicySpec(5, 20, 1000)


def test_the_most_specific_policy_and_setting_wins() -> None:
    config = Config(
        defaults={"policy": {"preset": "conservative"}, "min_keep": 4},  # type: ignore[arg-type]
        roots=[
            RootConfig(path="/data/a", policy=PolicyConfig(keep_last=8), min_keep=1),
            RootConfig(path="/data/b", series=[SeriesConfig(pattern="x-{step}")]),
        ],
    )
    first, second = config.roots
    assert policy_for(config, first) == PolicySpec(8, 20, 1000)
    assert policy_for(config, second, second.series[0]) == PolicySpec(50, 30, 500)
    assert settings_for(config, first).min_keep == 1
    assert settings_for(config, second) == RootSettings(
        settle_seconds=60.0,
        min_keep=4,
        max_delete_fraction=0.9,
        trash_grace=3600.0,
    )


def test_a_control_character_is_a_syntax_problem_with_its_place() -> None:
    (problem,) = problems_of("log:\n  level: in\x00fo\n")
    assert problem == "config.yaml:2:12 invalid YAML: character U+0000 is not allowed"


def test_an_escaped_nul_in_a_path_is_refused_not_a_crash() -> None:
    problems = problems_of('roots:\n  - path: "/data/a\\0b"\nsnapshots: {enabled: false}\n')
    assert problems == ["config.yaml:2 roots[0].path: a root contains a NUL character"]


def test_an_explicit_tag_that_does_not_fit_is_one_problem() -> None:
    assert problems_of("disk:\n  warn_percent: !!float lots\n") == [
        "config.yaml:2 disk.warn_percent: 'lots' is not a valid float"
    ]


def test_absurd_nesting_is_a_problem_not_a_crash() -> None:
    assert problems_of("[" * 5000) == ["config.yaml: invalid YAML: nested too deeply"]


def test_exponential_aliases_are_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]" for n in range(1, 9)]
    assert problems_of("\n".join(lines) + "\n") == [
        "config.yaml: expands to more than 200000 values"
    ]


def test_keep_last_one_without_a_cadence_warns(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("snapshots: {enabled: false}\ndefaults:\n  policy: {keep_last: 1}\n")
    _, warnings = load_config_with_warnings(str(path))
    assert any("keep_last: 1" in warning and ":3 " in warning for warning in warnings), warnings
    path.write_text(
        "snapshots: {enabled: false}\ndefaults:\n  policy: {keep_last: 1, cadence: 100}\n"
    )
    _, warnings = load_config_with_warnings(str(path))
    assert not any("keep_last: 1" in warning for warning in warnings), warnings
