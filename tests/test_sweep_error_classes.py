"""The sweep and the CLI refuse with the narrowest error class (still KacqError underneath, so ``except
KacqError`` keeps working): CheckpointError for models and tokenizers, ConfigError for options and an --out
holding another sweep, CorpusError for data, SweepError for an engine that cannot be reached."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from kacq_hooks import cli
from kacq_hooks.errors import CheckpointError, ConfigError, KacqError, SweepError
from kacq_hooks.sweep import Checkpoint, entropy_sweep, expand_checkpoints, load_checkpoint, load_tokenizer


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"text": "Zorgon was founded in 1842."}) + "\n")
    return path


@pytest.fixture
def model_dir(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_sweep_error_is_a_kacq_error():
    assert issubclass(SweepError, KacqError)


def test_model_and_tokenizer_faults_are_checkpoint_errors(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json and no checkpoint subfolders"):
        expand_checkpoints([str(tmp_path / "empty")])
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(Checkpoint("x", str(tmp_path / "empty")), "float32", "cpu")
    with pytest.raises(CheckpointError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"), "ckpt")
    # a --tokenizer that holds none is a bad option, not a bad checkpoint
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"), "ckpt", given=True)
    with pytest.raises(CheckpointError, match="not a saved model directory"):
        cli.load_model_and_tokenizer(str(tmp_path / "empty"), "cpu")


def test_an_out_folder_from_another_sweep_is_a_config_error(tmp_path, model_dir, data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "entropy.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable sweep"):
        entropy_sweep([str(model_dir)], str(data), out=out)
    (out / "entropy.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not a kacq entropy sweep"):
        entropy_sweep([str(model_dir)], str(data), out=out)
    (out / "entropy.json").write_text(json.dumps({"format": "kacq_hooks.entropy_sweep", "version": 2,
                                                  "settings": {"data": "elsewhere"}, "checkpoints": []}))
    with pytest.raises(ConfigError, match="other settings"):
        entropy_sweep([str(model_dir)], str(data), out=out)
    with pytest.raises(ConfigError, match="no models given"):
        entropy_sweep([], str(data), out=tmp_path / "fresh")


def test_cli_option_faults_are_config_errors():
    with pytest.raises(ConfigError, match="either MODEL"):
        cli.run_bench_command(argparse.Namespace(model=None, config=None))
    with pytest.raises(ConfigError, match="at least 1"):
        cli.run_resuscitate(argparse.Namespace(batch_size=0, seq_len=None))
    assert cli.main(["bench"]) == 2  # the CLI still turns every KacqError into exit code 2


def test_an_unreachable_ray_cluster_is_a_sweep_error():
    pytest.importorskip("ray")
    from kacq_hooks.sweep_exec import check_engine

    with pytest.raises(SweepError, match="cannot reach the Ray cluster"):
        check_engine("ray", "127.0.0.1:1")
