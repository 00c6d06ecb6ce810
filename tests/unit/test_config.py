from __future__ import annotations

from pathlib import Path

import pytest

from cellfoundry.config import (
    ConfigError,
    CorpusJobConfig,
    config_to_dict,
    load_config,
    parse_config,
)

BASE = {"corpus": {"catalog": "c.yaml", "output_dir": "out"}}


def test_defaults_and_overrides() -> None:
    cfg = parse_config(
        CorpusJobConfig, BASE, ["corpus.qc.n_sd=2.5", "ray.num_cpus=2", "corpus.tokenize.mode=v1"]
    )
    assert cfg.corpus.qc.n_sd == 2.5
    assert cfg.ray.num_cpus == 2
    assert cfg.corpus.tokenize.model_input_size == 2048
    assert cfg.corpus.tokenize.max_genes == 2048
    assert parse_config(CorpusJobConfig, BASE).corpus.tokenize.max_genes == 4094
    compute = parse_config(CorpusJobConfig, BASE).corpus.compute  # per-file actor pools
    assert (compute.min_actors, compute.max_actors) == (1, None)  # grow with the cluster


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({**BASE, "bogus": 1}, [], "unknown key(s) bogus"),
        ({"corpus": {**BASE["corpus"], "qc": {"nsd": 3}}}, [], "corpus.qc: unknown key(s) nsd"),
        (BASE, ["corpus.medians.method=median"], "corpus.medians.method: 'median' is not one of"),
        (BASE, ["corpus.rows_per_chunk=many"], "corpus.rows_per_chunk: expected an integer"),
        (BASE, ["corpus.qc.n_sd=-1"], "qc.n_sd must be > 0"),
        (BASE, ["corpus.qc.n_sd"], "expected KEY=VALUE"),
        (BASE, ["corpus.compute.min_actors=0"], "compute.min_actors must be >= 1"),
        (BASE, ["corpus.compute.max_actors=0"], "max_actors (0) must be >= compute.min_actors"),
        ({"corpus": {"catalog": "c.yaml"}}, [], "missing required key(s) output_dir"),
    ],
)
def test_errors_name_the_key(data: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(CorpusJobConfig, data, overrides)


def test_yaml_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  catalog: c.yaml\n  output_dir: out\n  medians: {method: sketch}\n")
    cfg = load_config(CorpusJobConfig, path)
    assert cfg.corpus.medians.method == "sketch"
    resolved = config_to_dict(cfg)
    assert resolved["corpus"]["medians"]["bins"] == 2048
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CorpusJobConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(CorpusJobConfig, tmp_path / "bad.yaml")


def test_shared_placeholder_expands() -> None:
    cfg = parse_config(
        CorpusJobConfig, BASE, ["corpus.tokenize.dictionaries={shared}/geneformer/v2"]
    )
    assert "{shared}" not in str(cfg.corpus.tokenize.dictionaries)
    assert str(cfg.corpus.tokenize.dictionaries).endswith("geneformer/v2")


def test_exponent_without_dot_is_a_number() -> None:
    """YAML 1.1 reads ``3e-3`` as a string; a float field still takes it."""
    cfg = parse_config(CorpusJobConfig, BASE, ["corpus.qc.n_sd=25e-1"])
    assert cfg.corpus.qc.n_sd == 2.5
    with pytest.raises(ValueError, match="expected a number"):
        parse_config(CorpusJobConfig, BASE, ["corpus.qc.n_sd=abc"])


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  catalog: c.yaml\n  output_dir: [out\n  qc: {n_sd: 3}\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 4, column 5: not valid YAML") as err:
        load_config(CorpusJobConfig, path)
    assert "line 3" in str(err.value)  # where the unclosed '[' starts
    path.write_text("corpus:\n\tcatalog: c.yaml\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 2, column 1: .*'\\t'"):
        load_config(CorpusJobConfig, path)
