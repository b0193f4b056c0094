"""Fuzzed inputs (issue 9): every reader and every CLI argument that takes a path or an ID.

Hypothesis draws the damage (see :mod:`fuzzkit` for the datasets, mutations and oracles):
every broken input must end in a PrivsegError naming the file or argument and the problem;
through the CLI: exit code 2, no traceback, nothing written. Each case tried is counted in
:mod:`reliability_log` (``benchmarks/reliability.py`` reports the totals).

Examples per test: small by default (the suite runs on 2 CPU cores);
``PRIVSEG_FUZZ_SCALE=10`` multiplies them, ``PRIVSEG_FUZZ_RANDOM=1`` draws new examples
instead of the fixed (derandomised) ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzkit as fk
import reliability_log as rlog
from privseg.utils import check_id

SCALE = float(os.environ.get("PRIVSEG_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("PRIVSEG_FUZZ_RANDOM", "") not in ("", "0")


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def count(name: str, outcome: fk.Outcome) -> None:
    rlog.record("fuzz", name, outcome.ok, outcome.detail)
    assert outcome.ok, outcome.detail


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """Templates (built once) and a scratch folder reused by every example."""
    root = tmp_path_factory.mktemp("fuzz")
    return root / "templates", root / "work"


def scratch(space) -> Path:
    work = space[1]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


# -- readers: every layout x every mutation ----------------------------------------------------------

READER_CASES = [(fmt, name) for fmt in fk.FORMATS for name in fk.mutation_names(fmt)]


@pytest.mark.parametrize(("fmt", "name"), READER_CASES, ids=[f"{f}-{n}" for f, n in READER_CASES])
def test_readers_refuse_broken_files(space, fmt, name):
    fn = fk.MUTATIONS[name][1]

    @fuzz(3)
    @given(data=st.data())
    def run(data):
        ds = fk.fresh_dataset(fmt, scratch(space), space[0])
        expect = fn(data.draw, ds, st)
        count(f"reader:{fmt}:{name}", fk.check_reader(lambda: fk.read_and_load(ds.root), expect))

    run()


@pytest.mark.parametrize(("fmt", "doc"), [("manifest", "cohort.json"), ("msd", "dataset.json"),
                                          ("nnunet", "dataset.json")])
def test_json_documents_with_any_field_replaced(space, fmt, doc):
    """A field replaced by (or deleted for) an arbitrary JSON value: a valid cohort, or a
    PrivsegError naming the document -- never another exception."""

    @fuzz(40)
    @given(data=st.data())
    def run(data):
        ds = fk.fresh_dataset(fmt, scratch(space), space[0])
        content = json.loads((ds.root / doc).read_text())
        path = data.draw(st.sampled_from(fk.json_paths(content)))
        delete = data.draw(st.booleans())
        fk.set_path(content, path, None if delete else data.draw(fk.json_values(st)), delete=delete)
        (ds.root / doc).write_text(json.dumps(content))
        expect = fk.Expect({doc, ds.root.name}, ("",))
        count(f"json:{fmt}:{path[0]}", fk.check_reader(lambda: fk.read_and_load(ds.root), expect, may_succeed=True))

    run()


def test_path_traversal_in_documents(space):
    """Paths in dataset.json that leave the dataset folder, and unsafe IDs in a manifest."""
    cases = [("msd", ["training", 0, "image"], "../../../etc/passwd"),
             ("msd", ["training", 0, "label"], "/etc/hostname"),
             ("msd", ["training", 1, "image"], "./imagesTr/../../outside.nii.gz"),
             ("msd", ["training", 0, "site"], "../H1"),
             ("manifest", ["subjects", 0, "id"], "../../case000"),
             ("manifest", ["subjects", 1, "id"], "a/b"),
             ("manifest", ["subjects", 0, "site"], "..\\H2"),
             ("manifest", ["subjects", 1, "id"], "x" * 200),
             ("manifest", ["subjects", 0, "id"], "case\u0000zero")]
    for fmt, path, value in cases:
        ds = fk.fresh_dataset(fmt, scratch(space), space[0])
        doc = "cohort.json" if fmt == "manifest" else "dataset.json"
        content = json.loads((ds.root / doc).read_text())
        fk.set_path(content, tuple(path), value)
        (ds.root / doc).write_text(json.dumps(content))
        expect = fk.Expect({doc}, ("outside", "not safe"))
        count(f"traversal:{fmt}:{path[-1]}", fk.check_reader(lambda ds=ds: fk.read_and_load(ds.root), expect))


# -- the CLI ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A valid manifest cohort and a checkpoint trained on it for one step."""
    root = tmp_path_factory.mktemp("fuzzcli")
    ds = fk.build_dataset("manifest", root / "cohort")
    code, _, err = fk.run_cli(["train", "--cohort", str(ds.root), "--out", str(root / "run"), "--model", "unet_tiny",
                               "--steps", "1", "--patch", "16", "-q", "--device", "cpu"])
    assert code == 0, err
    return ds, root / "run" / "last.pt"


def _ids(ds, split):
    return [k for k, s in enumerate(ds.subjects) if s.split == split]


# which subject each command reads, so the damage is where the command looks
CLI_DATA_COMMANDS = ("data-check", "train", "evaluate", "predict", "audit", "unlearn", "fl-run")
CLI_MUTATIONS = [n for n in fk.mutation_names("manifest") if n not in ("missing_channel",)]


@pytest.mark.parametrize("command", CLI_DATA_COMMANDS)
def test_cli_refuses_broken_data(space, trained, command):
    base, ckpt = trained

    @fuzz(10)
    @given(data=st.data())
    def run(data):
        work = scratch(space)
        ds = fk.fresh_dataset("manifest", work, space[0])
        split = {"train": "train", "unlearn": "train", "audit": "train", "evaluate": "test",
                 "fl-run": "train"}.get(command)
        ds.targets = _ids(ds, split) if split else None
        name = data.draw(st.sampled_from(CLI_MUTATIONS))
        expect = fk.MUTATIONS[name][1](data.draw, ds, st)
        out = work / "out"
        R, C = str(ds.root), str(ckpt)
        other_train = next(s.id for s in ds.subjects if s.split == "train" and s.id != expect.subject)
        test_id = next(s.id for s in ds.subjects if s.split == "test" and s.id != expect.subject)
        argv = {
            "data-check": ["data", "check", R, "-q"],
            "train": ["train", "--cohort", R, "--out", str(out), "--model", "unet_tiny", "--steps", "1", "--patch",
                      "16", "-q", "--device", "cpu"],
            "evaluate": ["evaluate", "--checkpoint", C, "--cohort", R, "--json", str(out), "-q"],
            "predict": ["predict", "--checkpoint", C, "--cohort", R, "--subject", expect.subject, "--out", str(out)],
            "audit": ["audit", "mia", "--checkpoint", C, "--cohort", R, "--members", expect.subject,
                      "--non-members", test_id, "--views", "1", "--out", str(out), "-q"],
            "unlearn": ["unlearn", "--checkpoint", C, "--cohort", R, "--forget", other_train, "--out", str(out),
                        "--epochs", "1", "--device", "cpu", "-q"],
            # the one site holding the damaged subject: its every round fails -> exit 2 naming the file
            # (the run folder itself is written: it records the failed rounds)
            "fl-run": ["fl", "run", "--cohort", R, "--only-site", next(s.site for s in ds.subjects
                                                                        if s.id == expect.subject),
                       "--in-process", "--runs", str(out), "--model", "unet_tiny", "--rounds", "1", "--local-steps",
                       "1", "--patch", "16", "--eval-every", "0", "-q"],
        }[command]
        outputs = () if command == "fl-run" else (out,)
        count(f"cli:{command}:{name}", fk.check_cli(argv, expect.files, expect.words, outputs))

    run()


def bad_ids(known: list[str]):
    fixed = ["", " ", ",", "..", "../etc", "a/b", "a\\b", "/abs", ".hidden", "a..b", "x" * 300, "S 01", "é",
             "case000/../case001", "..\\..\\x", "\n", "case999", "-", "*", "case000;rm", "$(id)", "`id`"]
    return st.one_of(
        st.sampled_from(fixed),
        # argv from a real process cannot hold NUL bytes (C strings): leave them out here
        st.text(st.characters(blacklist_characters="\x00,"), max_size=40),
        st.builds(lambda a, b: a + b + a, st.sampled_from(["", "..", "/"]), st.sampled_from(["/", "..", "\\"])),
    ).filter(lambda s: s.strip() not in known and not s.startswith("-"))


ID_COMMANDS = ("predict", "unlearn", "audit-members", "audit-non-members", "fl-only-site", "fl-site", "fl-name",
               "report-subject")


@pytest.mark.parametrize("command", ID_COMMANDS)
def test_cli_refuses_unsafe_or_unknown_ids(space, trained, command):
    ds, ckpt = trained
    known = [s.id for s in ds.subjects] + ["H1", "H2"]
    train_id = next(s.id for s in ds.subjects if s.split == "train")
    test_id = next(s.id for s in ds.subjects if s.split == "test")

    @fuzz(12)
    @given(bad=bad_ids(known))
    def run(bad):
        if command in ("fl-site", "fl-name"):  # any safe name is a valid new site / run name
            try:
                check_id(bad)
                return
            except Exception:  # noqa: BLE001 - unsafe: the case we want
                pass
        out = scratch(space) / "out"
        R, C = str(ds.root), str(ckpt)
        fl = ["--in-process", "--runs", str(out), "--model", "unet_tiny", "--rounds", "1", "--local-steps", "1",
              "--patch", "16", "-q"]
        argv, option = {
            "predict": (["predict", "--checkpoint", C, "--cohort", R, "--subject", bad, "--out", str(out)],
                        "--subject"),
            "unlearn": (["unlearn", "--checkpoint", C, "--cohort", R, "--forget", bad, "--out", str(out), "-q"],
                        "--forget"),
            "audit-members": (["audit", "mia", "--checkpoint", C, "--cohort", R, "--members", bad, "--non-members",
                               test_id, "--out", str(out), "-q"], "--members"),
            "audit-non-members": (["audit", "mia", "--checkpoint", C, "--cohort", R, "--members", train_id,
                                   "--non-members", bad, "--out", str(out), "-q"], "--non-members"),
            "fl-only-site": (["fl", "run", "--cohort", R, "--only-site", bad, *fl], "--only-site"),
            "fl-site": (["fl", "run", "--site", f"{bad}={R}", *fl], "--site"),
            "fl-name": (["fl", "run", "--cohort", R, "--name", bad, *fl], "--name"),
            "report-subject": (["report", str(ckpt.parent), "--cohort", R, "--subject", bad, "--out", str(out),
                                "--no-evaluate", "-q"], "--subject"),
        }[command]
        names = {bad.strip(), repr(bad), repr(bad.strip()), option} - {""}
        count(f"cli-id:{command}", fk.check_cli(argv, names, (), (out,)))

    run()


CKPT_COMMANDS = ("evaluate", "predict", "unlearn", "audit", "report")


@pytest.mark.parametrize("command", CKPT_COMMANDS)
def test_cli_refuses_broken_checkpoints_without_unpickling(space, trained, command):
    ds, good = trained
    train_id = next(s.id for s in ds.subjects if s.split == "train")
    test_id = next(s.id for s in ds.subjects if s.split == "test")

    @fuzz(4 if command == "report" else 10)  # a report renders figures: seconds per case
    @given(data=st.data())
    def run(data):
        work = scratch(space)
        bad, out, marker = work / "model.pt", work / "out", work / "pwned"
        kind, words = fk.mutate_checkpoint(data.draw, st, good, bad, marker)
        if command == "report":  # a run folder whose last.pt is broken
            run_dir = work / "run"
            shutil.copytree(good.parent, run_dir, ignore=shutil.ignore_patterns("last.pt", "tb"))
            (run_dir / "last.pt").unlink(missing_ok=True)
            if bad.is_dir():
                (run_dir / "last.pt").mkdir()
            elif bad.exists():
                shutil.copy(bad, run_dir / "last.pt")
            bad = run_dir / "last.pt"
        R, B = str(ds.root), str(bad)
        argv = {
            "evaluate": ["evaluate", "--checkpoint", B, "--cohort", R, "--json", str(out), "-q"],
            "predict": ["predict", "--checkpoint", B, "--cohort", R, "--subject", test_id, "--out", str(out)],
            "unlearn": ["unlearn", "--checkpoint", B, "--cohort", R, "--forget", train_id, "--out", str(out),
                        "--epochs", "1", "--device", "cpu", "-q"],
            "audit": ["audit", "mia", "--checkpoint", B, "--cohort", R, "--members", train_id, "--non-members",
                      test_id, "--views", "1", "--out", str(out), "-q"],
            "report": ["report", str(bad.parent), "--cohort", R, "--out", str(out), "-q"],
        }[command]
        if command == "report" and kind in ("missing", "directory"):
            # a run folder without its checkpoint is still a run (curves, config): reported without evaluation
            code, _, err = fk.run_cli(argv)
            outcome = fk.Outcome(code == 0 and "Traceback" not in err, f"exit {code}: {err[-800:]}")
        else:
            outcome = fk.check_cli(argv, {bad.name}, words, (out,))
        if marker.exists():
            outcome = fk.Outcome(False, f"unpickling ran code: {marker} was created")
        count(f"cli-ckpt:{command}:{kind}", outcome)

    run()


def test_cli_refuses_paths_that_are_not_datasets(space, trained):
    _, ckpt = trained
    work = scratch(space)
    (work / "empty").mkdir()
    (work / "notes.txt").write_text("hello")
    (work / "list.json").write_text("[1, 2]")
    (work / "broken.json").write_text("{")
    (work / "ds").mkdir()
    (work / "ds" / "dataset.json").write_text("{}")
    fifo = work / "fifo"
    os.mkfifo(fifo)
    targets = [work / "missing", work / "empty", work / "notes.txt", work / "list.json", work / "broken.json",
               work / "ds", fifo]
    for t in targets:
        out = work / "out"
        for argv in (["data", "check", str(t), "-q"], ["data", "info", str(t)],
                     ["train", "--cohort", str(t), "--out", str(out), "-q"],
                     ["evaluate", "--checkpoint", str(ckpt), "--cohort", str(t), "--json", str(out), "-q"],
                     ["fl", "run", "--cohort", str(t), "--in-process", "--runs", str(out), "-q"],
                     ["fl", "run", "--sites-root", str(t), "--in-process", "--runs", str(out), "-q"]):
            count(f"cli-path:{argv[0]}", fk.check_cli(argv, {t.name}, (), (out,)))


def test_the_oracle_itself_catches_a_silent_reader():
    """Sanity check of the harness: a reader that accepts, or raises a foreign exception, fails."""
    assert not fk.check_reader(lambda: None, fk.Expect({"x"}, ("y",))).ok
    assert not fk.check_reader(lambda: 1 / 0, fk.Expect({"x"}, ("y",))).ok
    with tempfile.TemporaryDirectory() as d:
        assert fk.check_cli(["data", "info", str(Path(d) / "nope")], {"nope"}).ok
