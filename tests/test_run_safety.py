"""The run folder's safety rules and the config checks of `contrastkit train`, without
loading a model: --overwrite replaces only run folders (never the data), --resume keeps
the saved config, string fields take --set text as given, bad device / objective names
fail when the config is read, and a run that stops before its first checkpoint leaves
nothing behind."""

import pytest
import torch
import yaml

import contrastkit.recipes as recipes
from contrastkit.cli import build_parser, main
from contrastkit.cli.train import resolve
from contrastkit.training.config import ConfigError, _field_type, _text_type, describe_fields, dump_config, load_config
from contrastkit.training.run_folder import MARKER, RunFolder, RunFolderError, is_run_folder


def _beir(folder):
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a document"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. --overwrite replaces only run folders -----------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    data = _beir(tmp_path / "mydata")
    before = _snapshot(data)
    with pytest.raises(RunFolderError, match="not a contrastkit run folder.*replaces only run folders"):
        RunFolder.create(data, overwrite=True)
    # a config.yaml + metrics.jsonl that are not a run's (no run configuration) are refused too
    (data / "config.yaml").write_text("lr: 3\n")
    (data / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match="not a contrastkit run folder"):
        RunFolder.create(data, overwrite=True)
    assert {k: v for k, v in _snapshot(data).items() if k in before} == before
    # without --overwrite: named as not a run folder, still mentioning the flag's limit
    with pytest.raises(RunFolderError, match="not a contrastkit run folder.*--overwrite"):
        RunFolder.create(data)


def test_overwrite_replaces_run_folders_new_and_old(tmp_path):
    run = RunFolder.create(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).is_file() and is_run_folder(tmp_path / "new")
    run.log({"phase": "x"})
    with pytest.raises(RunFolderError, match="already holds a run; pass --overwrite"):
        RunFolder.create(tmp_path / "new")
    RunFolder.create(tmp_path / "new", overwrite=True)
    assert not (tmp_path / "new" / "metrics.jsonl").exists() and (tmp_path / "new" / MARKER).is_file()
    # a run folder written before the marker: its config.yaml and metrics.jsonl
    old = tmp_path / "old"
    old.mkdir()
    dump_config(load_config(overrides=[f"output.dir={old}"]), old / "config.yaml")
    (old / "metrics.jsonl").write_text('{"phase": "dev"}\n')
    (old / "model").mkdir()
    assert is_run_folder(old)
    RunFolder.create(old, overwrite=True)
    assert not (old / "model").exists()
    # an empty folder needs no --overwrite; a folder holding only the marker is a new run's
    (tmp_path / "empty").mkdir()
    RunFolder.create(tmp_path / "empty")
    RunFolder.create(tmp_path / "empty", is_main=False)


def test_overwrite_refuses_a_run_folder_holding_the_data_or_the_model(tmp_path):
    RunFolder.create(tmp_path / "run").log({"phase": "x"})
    data = _beir(tmp_path / "run" / "data")
    with pytest.raises(RunFolderError, match=r"data.source \(.*data\) lies inside it"):
        RunFolder.create(tmp_path / "run", overwrite=True, protect={"data.source": str(data), "model.name": "m"})
    assert (data / "corpus.jsonl").is_file()
    with pytest.raises(RunFolderError, match="model.name"):
        RunFolder.create(tmp_path / "run", overwrite=True, protect={"model.name": str(tmp_path / "run")})
    # a bundled name that is no path here protects nothing
    RunFolder.create(tmp_path / "run2")
    RunFolder.create(tmp_path / "run2", overwrite=True, protect={"data.source": "scifact"})


def test_cli_overwrite_of_the_data_folder_is_refused_and_keeps_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipes, "get_recipe", lambda name: pytest.fail("the recipe must not run"))
    data = _beir(tmp_path / "mydata")
    before = _snapshot(data)
    assert main(["train", "--data", str(data), "--output", str(data), "--overwrite", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"refusing to overwrite {data}: data.source" in err and "Traceback" not in err
    assert _snapshot(data) == before
    # the data inside a run folder asked to be overwritten
    RunFolder.create(tmp_path / "runs").log({"phase": "x"})
    inner = _beir(tmp_path / "runs" / "beir")
    assert main(["train", "--data", str(inner), "--output", str(tmp_path / "runs"), "--overwrite",
                 "--device", "cpu"]) == 2
    assert "data.source" in capsys.readouterr().err and (inner / "corpus.jsonl").is_file()


# -- 2. --resume continues the run as it was configured -----------------------------------------

def _saved_run(tmp_path, *overrides):
    """A run folder that got as far as its first checkpoint (config.yaml as the recipes write it)."""
    out = tmp_path / "run"
    run = RunFolder.create(out)
    cfg = load_config(overrides=[f"output.dir={out}", "optim.lr=2e-5", "optim.max_steps=7",
                                 "data.query_prefix=query: ", *overrides])
    dump_config(cfg, run.file("config.yaml"))
    run.log({"phase": "train", "step": 1})
    (out / "checkpoint").mkdir()
    return out


def _resolve(*argv):
    return resolve(build_parser().parse_args(["train", *argv]))


def test_resume_without_config_uses_the_saved_one(tmp_path):
    out = _saved_run(tmp_path, "output.overwrite=true")  # the first run's --overwrite is recorded
    cfg = _resolve("--output", str(out), "--resume")
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.data.query_prefix) == (2e-5, 7, "query: ")
    assert cfg.output.resume and not cfg.output.overwrite
    # the same values given again are fine
    assert _resolve("--output", str(out), "--resume", "--lr", "2e-5", "--max-steps", "7").optim.lr == 2e-5


def test_resume_with_other_settings_names_every_difference(tmp_path, capsys):
    out = _saved_run(tmp_path)
    with pytest.raises(ConfigError) as info:
        _resolve("--output", str(out), "--resume", "--lr", "1e-3", "--max-steps", "9")
    msg = str(info.value)
    assert f"cannot resume {out} with settings other than its run's (config.yaml)" in msg
    assert "optim.max_steps: saved 7, given 9" in msg and "optim.lr: saved 2e-05, given 0.001" in msg
    # a --config that is not the run's: every field it changes is named
    (tmp_path / "other.yaml").write_text("batching:\n  batch_size: 64\n")
    with pytest.raises(ConfigError, match="batching.batch_size: saved 32, given 64.*optim.lr: saved 2e-05, given "
                                          "0.00012"):
        _resolve("--config", str(tmp_path / "other.yaml"), "--output", str(out), "--resume")
    # through the command: a one-line error before anything runs, config.yaml untouched
    saved = (out / "config.yaml").read_bytes()
    assert main(["train", "--output", str(out), "--resume", "--set", "optim.lr=1e-3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("contrastkit train: config error: cannot resume") and "optim.lr" in err
    assert (out / "config.yaml").read_bytes() == saved


def test_resume_needs_the_saved_config_next_to_the_checkpoint(tmp_path):
    out = _saved_run(tmp_path)
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="has checkpoint/ but no config.yaml"):
        _resolve("--output", str(out), "--resume")
    with pytest.raises(ConfigError, match="--resume needs --output"):
        resolve(build_parser().parse_args(["train", "--resume"]))


def test_config_yaml_of_a_run_with_a_checkpoint_is_never_rewritten(tmp_path):
    out = _saved_run(tmp_path)
    saved = (out / "config.yaml").read_bytes()
    same = load_config(out / "config.yaml", overrides=["output.resume=true", "output.overwrite=false"])
    dump_config(same, out / "config.yaml")                     # the resumed run: left as it is
    assert (out / "config.yaml").read_bytes() == saved
    other = load_config(out / "config.yaml", overrides=["optim.lr=1e-3", "output.resume=true"])
    with pytest.raises(ConfigError, match="optim.lr: saved 2e-05, given 0.001"):
        dump_config(other, out / "config.yaml")
    assert (out / "config.yaml").read_bytes() == saved
    # any other file is written as before
    dump_config(other, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").optim.lr == 1e-3


def test_cli_resume_runs_the_saved_config_and_keeps_config_yaml(tmp_path, monkeypatch, capsys):
    seen = []

    def fake(cfg, run):  # what the recipes do first
        seen.append(cfg)
        dump_config(cfg, run.file("config.yaml"))
        return {}

    monkeypatch.setattr(recipes, "get_recipe", lambda name: fake)
    out = _saved_run(tmp_path, "output.report=false")
    saved = (out / "config.yaml").read_bytes()
    assert main(["train", "--output", str(out), "--resume"]) == 0
    capsys.readouterr()
    # the fake's cfg is the saved run's, and config.yaml is byte for byte the one of before
    assert seen and seen[-1].optim.lr == 2e-5 and seen[-1].output.resume
    assert (out / "config.yaml").read_bytes() == saved


# -- 3. string fields take --set text as given -------------------------------------------------

@pytest.mark.parametrize("field, text, want", [
    ("data.query_prefix", "query: ", "query: "),
    ("data.document_prefix", "passage: ", "passage: "),
    ("data.query_prefix", "'query: '", "query: "),
    ("data.query_prefix", '"query: "', "query: "),
    ("data.query_prefix", "", ""),
    ("model.name", "123", "123"),
    ("data.test_split", "null", None),
    ("data.test_split", "dev: 2", "dev: 2"),
])
def test_set_gives_string_fields_the_text_as_written(field, text, want):
    section, name = field.split(".")
    assert getattr(getattr(load_config(overrides=[f"{field}={text}"]), section), name) == want


def test_every_string_field_takes_text_with_a_colon():
    text_fields = [name for name, *_ in describe_fields() if _text_type(_field_type(name.split("."))) is not None]
    assert "data.query_prefix" in text_fields and "output.dir" in text_fields and len(text_fields) >= 10
    for name in text_fields:
        try:
            cfg = load_config(overrides=[f"{name}=a: b"])
        except ConfigError as err:  # a field with allowed values says so, never "expected a string"
            assert "expected a string" not in str(err), name
        else:
            section, _, leaf = name.rpartition(".")
            assert getattr(getattr(cfg, section) if section else cfg, leaf) == "a: b", name


def test_cli_prefix_flags_of_the_docs(capsys):
    assert main(["train", "--set", "data.query_prefix=query: ", "--set", "data.document_prefix=passage: ",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["data"]["query_prefix"], printed["data"]["document_prefix"]) == ("query: ", "passage: ")


def test_bad_yaml_in_set_is_a_config_error():
    with pytest.raises(ConfigError, match=r"negatives.rank_window: '\[0, 3' is not a valid value"):
        load_config(overrides=["negatives.rank_window=[0, 3"])


# -- 4. device and objective are checked when the config is read ---------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.device=banana", "train.device: 'banana' is not allowed; allowed values: auto, cpu, cuda, cuda:N"),
    ("train.device=cuda:x", "train.device: 'cuda:x' is not allowed"),
    ("objective.name=Foo", "objective.name: 'Foo' is not a loss of contrastkit.losses; allowed values: "
                           "AlignUniform, Alignment, CWCL"),
    ("objective.name=Temperature", "objective.name: 'Temperature' is not a loss"),
])
def test_device_and_objective_fail_at_load(override, message, capsys):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=[override])
    assert main(["train", "--set", override, "--print-config"]) == 2
    assert capsys.readouterr().err.startswith(f"contrastkit train: config error: {message}")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_load(device):
    assert load_config(overrides=[f"train.device={device}"]).train.device == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_this_machine_lacks_is_named_before_the_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipes, "get_recipe", lambda name: pytest.fail("the recipe must not run"))
    assert main(["train", "--device", "cuda:0", "--output", str(tmp_path / "run")]) == 2
    assert "train.device: 'cuda:0', but no CUDA GPU is visible here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- 5. a run that stops before its first checkpoint leaves nothing behind ----------------------------

def _failing(exc, *, checkpoint=False):
    def fake(cfg, run):
        dump_config(cfg, run.file("config.yaml"))
        run.log({"phase": "timing", "name": "load", "seconds": 1.0})
        if checkpoint:
            (run.path / "checkpoint").mkdir()
        raise exc
    return fake


def test_a_run_failing_before_its_checkpoint_can_simply_be_run_again(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--device", "cpu", "--set", "output.report=false"]
    monkeypatch.setattr(recipes, "get_recipe", lambda name: _failing(ValueError("pairs.jsonl:6: not JSON")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "contrastkit train: error: pairs.jsonl:6: not JSON" in err and "Traceback" not in err
    assert not out.exists()
    # the same command again, no --overwrite needed
    monkeypatch.setattr(recipes, "get_recipe", lambda name: lambda cfg, run: {})
    assert main(argv) == 0
    assert (out / MARKER).is_file()


def test_a_failed_run_keeps_its_checkpoint_and_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(recipes, "get_recipe", lambda name: _failing(ValueError("late"), checkpoint=True))
    assert main(["train", "--output", str(out), "--device", "cpu"]) == 2
    assert (out / "checkpoint").is_dir() and (out / "config.yaml").is_file()
    # an empty folder the user made: the run's files go, the folder stays
    (tmp_path / "mine").mkdir()
    monkeypatch.setattr(recipes, "get_recipe", lambda name: _failing(ValueError("early")))
    assert main(["train", "--output", str(tmp_path / "mine"), "--device", "cpu"]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    capsys.readouterr()


def test_bugs_keep_their_traceback_and_debug_shows_every_one(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "get_recipe", lambda name: _failing(KeyError("bug")))
    with pytest.raises(KeyError):
        main(["train", "--output", str(tmp_path / "a"), "--device", "cpu"])
    assert not (tmp_path / "a").exists()       # nothing was trained: cleaned up all the same
    monkeypatch.setenv("CONTRASTKIT_DEBUG", "1")
    monkeypatch.setattr(recipes, "get_recipe", lambda name: _failing(ValueError("bad input")))
    with pytest.raises(ValueError, match="bad input"):
        main(["train", "--output", str(tmp_path / "b"), "--device", "cpu"])


def test_discard_never_removes_what_the_run_did_not_write(tmp_path):
    run = RunFolder.create(tmp_path / "run")
    (run.path / "notes.txt").write_text("mine")
    assert not run.discard_if_unstarted() and (run.path / "notes.txt").is_file()
    # a resumed run is never discarded
    (run.path / "notes.txt").unlink()
    (run.path / "checkpoint").mkdir()
    resumed = RunFolder.create(run.path, resume=True)
    (run.path / "checkpoint").rmdir()
    assert not resumed.discard_if_unstarted() and (run.path / MARKER).is_file()
