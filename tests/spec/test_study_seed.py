"""The study seed: in the spec and `study run --seed`, in the hash and the manifest, and the one rule
every random source derives its seed by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from study.spec import SpecError, parse_spec, spec_hash, with_seed
from study.sweep.runner import RunError, check_out_dir, prepare_out_dir
from study.trial.config import DATA_STREAM, SAMPLER_STREAM, TRAIN_STREAM, TrialConfig, derive_seed

STUDY_BIN = str(Path(sys.executable).with_name("study"))
SPEC = """\
name: seeded
models: [mlp]
regularizers: [ce]
"""


def test_seed_defaults_to_0_and_enters_the_hash_only_when_set():
    plain = parse_spec(SPEC)
    assert plain.seed == 0
    assert spec_hash(parse_spec(SPEC + "seed: 0\n")) == spec_hash(plain)  # old studies still resume
    hashes = {spec_hash(parse_spec(SPEC + f"seed: {s}\n")) for s in (1, 2, 3)}
    assert len(hashes) == 3 and spec_hash(plain) not in hashes


@pytest.mark.parametrize("bad", ["-1", "4294967296", "1.5", "'x'"])
def test_bad_seed_is_one_line_naming_the_field(bad):
    with pytest.raises(SpecError, match=r"seed") as err:
        parse_spec(SPEC + f"seed: {bad}\n")
    assert "\n" not in str(err.value)


def test_with_seed_sets_or_adds_the_top_level_seed_only():
    nested = SPEC + "search: {seed: 5}\n"
    added = with_seed(nested, 7)
    assert parse_spec(added).seed == 7 and parse_spec(added).search.seed == 5
    replaced = with_seed(SPEC + "seed: 3  # mine\n", 9)
    assert parse_spec(replaced).seed == 9 and replaced.count("seed:") == 1


def test_derive_seed_keeps_the_old_streams_at_0_and_splits_them_otherwise():
    assert [derive_seed(0, s, k) for s in (TRAIN_STREAM, DATA_STREAM) for k in (0, 1, 7)] == [0, 1, 7] * 2
    drawn = {derive_seed(study, stream, key) for study in (1, 2) for stream in (1, 2, 3) for key in (0, 1)}
    assert len(drawn) == 12  # no two (study seed, stream, key) share a seed
    expected = int(np.random.SeedSequence([5, SAMPLER_STREAM, 11, 0]).generate_state(1)[0])
    assert derive_seed(0, DATA_STREAM, 3, replica=1) not in (3, derive_seed(0, DATA_STREAM, 3, replica=2))
    assert derive_seed(5, SAMPLER_STREAM, 11) == expected == derive_seed(5, SAMPLER_STREAM, 11)
    cfg = TrialConfig(seed=2, noise_seed=3, study_seed=5)
    assert cfg.train_seed == derive_seed(5, TRAIN_STREAM, 2) and cfg.data_seed == derive_seed(
        5, DATA_STREAM, 3
    )
    assert TrialConfig(seed=2, noise_seed=3).train_seed == 2


def test_manifest_records_the_seed_and_a_resume_with_another_seed_is_refused(tmp_path):
    spec = parse_spec(SPEC + "seed: 4\n")
    manifest = prepare_out_dir(spec, SPEC + "seed: 4\n", tmp_path / "out", resume=False)
    assert manifest["seed"] == 4
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seed"] == 4
    with pytest.raises(RunError, match="it ran with study seed 4, this run has 0"):
        check_out_dir(parse_spec(SPEC), tmp_path / "out", resume=True)
    check_out_dir(spec, tmp_path / "out", resume=True)  # the same seed resumes


def test_cli_seed_out_of_range_is_bad_input(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    res = subprocess.run(
        [STUDY_BIN, "run", str(spec), "--out", str(tmp_path / "o"), "--seed", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--seed" in res.stderr
    assert not (tmp_path / "o").exists()


def test_margins_are_checked_kept_out_of_the_hash_and_read_by_the_report(tmp_path):
    """`margins: {metric: value}` in the metric's units; an unknown metric or a non-positive value is one
    line naming the field; margins change how verdicts read results, not the results: not in the hash."""
    from reports.build import Study
    from study.spec import spec_hash

    base = parse_spec(SPEC)
    wide = parse_spec(SPEC + "margins: {accuracy: 0.05, ece: 0.02}\n")
    assert wide.margins == {"accuracy": 0.05, "ece": 0.02} and spec_hash(wide) == spec_hash(base)
    for bad, needle in (("{acc: 0.05}", "unknown metric 'acc'"), ("{accuracy: 0}", "greater than 0"),
                        ("{accuracy: .nan}", "finite")):  # fmt: skip
        with pytest.raises(SpecError, match=r"margins") as err:
            parse_spec(SPEC + f"margins: {bad}\n")
        assert needle in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "spec.yaml").write_text(SPEC + "margins: {accuracy: 0.05}\n")
    study = Study(tmp_path, "s", {}, *(None,) * 4, False)
    assert study.margins == {"accuracy": 0.05}
