"""search/artifacts.py: the store location as a study attr, per-trial uploads at the trial's end."""

import io

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from regsweep.models.config import ConfigError, TrainConfig
from regsweep.search.artifacts import (
    ARTIFACTS_ATTR,
    AnyStore,
    normalize,
    open_store,
    resolve,
    trial_artifacts,
    upload_trial,
)


def _png_ok(data: bytes) -> bool:
    from PIL import Image

    Image.open(io.BytesIO(data)).verify()
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def test_normalize_accepts_dirs_buckets_and_off(tmp_path):
    assert normalize(str(tmp_path / "new")) == str((tmp_path / "new").resolve())
    assert normalize("s3://bucket/") == "s3://bucket"
    assert normalize("gs://b") == "gs://b"
    assert normalize("off") == "off"


@pytest.mark.parametrize("bad, says", [("ftp://host/x", "s3://BUCKET"), ("s3://bucket/prefix", "s3://BUCKET"),
                                       ("s3://", "s3://BUCKET")])
def test_normalize_refuses_other_urls(bad, says):
    with pytest.raises(ConfigError, match=says) as e:
        normalize(bad)
    assert "--artifacts" in str(e.value) and "\n" not in str(e.value)


def test_normalize_refuses_a_file_and_a_missing_parent(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        normalize(str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="does not exist"):
        normalize(str(tmp_path / "no" / "such"))


def test_every_trial_of_a_sweep_has_its_curves_and_config(swept_study):
    spec, url, art_dir = swept_study
    study = optuna.load_study(study_name="swept", storage=url)
    assert study.user_attrs[ARTIFACTS_ATTR] == str(art_dir.resolve())
    store = open_store(study.user_attrs[ARTIFACTS_ATTR])
    states = set()
    best = study.best_trial.number
    for t in study.trials:
        metas = {m["filename"]: m for m in trial_artifacts(study, t)}
        # keep_weights: best (the default): the best trial's weights too; the coordinator removed the others'
        weights = {f"trial-{t.number}-weights.pt"} if t.number == best else set()
        assert set(metas) == {f"trial-{t.number}-curves.png", f"trial-{t.number}-config.yaml"} | weights
        assert metas[f"trial-{t.number}-curves.png"]["mimetype"] == "image/png"
        assert _png_ok(store.open_reader(metas[f"trial-{t.number}-curves.png"]["artifact_id"]).read())
        text = store.open_reader(metas[f"trial-{t.number}-config.yaml"]["artifact_id"]).read().decode()
        cfg = TrainConfig.from_yaml(text)
        assert cfg.to_dict() == {**t.user_attrs["config"], "train": {**t.user_attrs["config"]["train"],
                                                                     "num_threads": t.user_attrs["num_threads"]}}
        prov = yaml.safe_load("\n".join(line[2:] for line in text.splitlines()
                                        if line.startswith("# ") and "regsweep export" not in line))["provenance"]
        assert prov["state"] == t.state.name and prov["trial"] == t.number  # the FINAL state, not RUNNING
        if t.state == TrialState.COMPLETE:
            assert prov["value"] == t.value
        states.add(t.state)
    assert TrialState.COMPLETE in states


def test_location_is_a_study_attr_shared_by_workers(storage_url, tmp_path):
    url, name = storage_url
    study = optuna.create_study(study_name=name, storage=url)
    if url.startswith("sqlite"):  # default: beside the database file, recorded for the others
        assert resolve(study, url, None, coordinator=False) == str(tmp_path / "db-artifacts")
    else:
        assert resolve(study, url, None, coordinator=False) is None
        assert ARTIFACTS_ATTR not in optuna.load_study(study_name=name, storage=url).user_attrs
    shared = str(tmp_path / "shared")
    assert resolve(study, url, shared, coordinator=True) == shared  # run --artifacts: the study's store
    worker_view = optuna.load_study(study_name=name, storage=url)
    assert resolve(worker_view, url, None, coordinator=False) == shared
    mount = str(tmp_path / "mounted-elsewhere")
    assert resolve(worker_view, url, mount, coordinator=False) == mount  # a worker's own path to the share
    assert optuna.load_study(study_name=name, storage=url).user_attrs[ARTIFACTS_ATTR] == shared
    assert resolve(worker_view, url, "off", coordinator=True) is None
    assert resolve(optuna.load_study(study_name=name, storage=url), url, None, coordinator=False) is None


def test_upload_and_read_back_on_every_storage(storage_url, tmp_path):
    url, name = storage_url
    study = optuna.create_study(study_name=name, storage=url)
    trial = study.ask()
    trial.set_user_attr("config", {})
    store = open_store(str(tmp_path / "art"))
    history = [{"epoch": i, "train_loss": 1.0 / (i + 1), "train_eval_loss": 0.9 / (i + 1), "val_loss": 1.0,
                "train_acc": 0.5, "val_acc": 0.4} for i in range(3)]
    ids = upload_trial(store, trial, history, 1, "t", "a: 1\n")
    study.tell(trial, 1.0)
    metas = trial_artifacts(study, study.trials[0])
    assert sorted(m["artifact_id"] for m in metas) == sorted(ids) and len(ids) == 2
    by_name = {m["filename"]: m["artifact_id"] for m in metas}
    assert store.open_reader(by_name["trial-0-config.yaml"]).read() == b"a: 1\n"
    assert _png_ok(store.open_reader(by_name["trial-0-curves.png"]).read())


def test_a_failing_store_warns_and_never_fails_the_trial(tmp_path, capsys):
    study = optuna.create_study()
    trial = study.ask()
    (tmp_path / "file").write_text("not a directory")
    from optuna.artifacts import FileSystemArtifactStore

    ids = upload_trial(FileSystemArtifactStore(tmp_path / "file"), trial, [], None, "t", "a: 1\n")
    assert ids == []
    assert "artifact upload failed" in capsys.readouterr().err
    study.tell(trial, 0.5)
    assert study.trials[0].state == TrialState.COMPLETE


def test_any_store_reads_from_whichever_holds_the_artifact(tmp_path):
    a, b = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    b.write("0000-aaaa", io.BytesIO(b"in b"))
    both = AnyStore([a, b])
    assert both.open_reader("0000-aaaa").read() == b"in b"
    from optuna.artifacts.exceptions import ArtifactNotFound

    with pytest.raises(ArtifactNotFound):
        both.open_reader("1111-bbbb")
