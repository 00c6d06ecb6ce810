"""An actor pool the cluster cannot place fails at once, with asked and available numbers."""

from __future__ import annotations

import pytest

from cellfoundry.config import EmbedJobConfig, parse_config
from cellfoundry.config.infer import InferComputeConfig
from cellfoundry.infer.common import check_placeable

LAPTOP = [{"CPU": 2.0, "memory": 4e9}]
GPU_CLUSTER = [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]


def _compute(**kw: object) -> InferComputeConfig:
    base = {"model": "m", "tokenized": "t", "output": "x.h5ad", "compute": kw}
    return parse_config(EmbedJobConfig, base).compute


@pytest.mark.parametrize(
    ("compute", "nodes", "reads", "message"),
    [
        # more CPUs per actor than any node has
        (
            {"num_cpus": 4},
            LAPTOP,
            False,
            r"asks for 4 CPUs and 0 GPUs .* at most 2 CPUs and 0 GPUs",
        ),
        # a GPU actor on a cluster without GPUs
        ({"num_gpus": 1}, LAPTOP, False, r"asks for 1 CPUs and 1 GPUs .* 0 GPUs in all"),
        # a GPU actor asking for more CPUs than the GPU nodes have
        ({"num_gpus": 1, "num_cpus": 32}, GPU_CLUSTER, False, r"at most 16 CPUs and 2 GPUs"),
        # a fixed pool larger than the cluster
        ({"concurrency": 5, "num_gpus": 1}, GPU_CLUSTER, False, r"at least 5 actors .* hold 4"),
        # ray.num_cpus equal to compute.num_cpus: the actor takes every CPU, reads never run
        ({"num_cpus": 2}, LAPTOP, True, r"take all 2 CPUs .* read tasks"),
    ],
)
def test_unplaceable_pools_fail_with_the_numbers(
    compute: dict, nodes: list, reads: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_placeable(_compute(**compute), nodes, reads=reads, stage="embed")


@pytest.mark.parametrize(
    ("compute", "nodes", "reads"),
    [
        ({}, LAPTOP, True),  # the smoke configs: 1 CPU per actor, 1 left for reads
        ({"num_cpus": 2}, LAPTOP, False),  # no read tasks (the screen's actors read themselves)
        ({"num_gpus": 1, "num_cpus": 4, "min_actors": 1, "max_actors": 8}, GPU_CLUSTER, True),
        ({"concurrency": 4, "num_gpus": 0.5}, [{"CPU": 8.0, "GPU": 2.0}], True),
    ],
)
def test_placeable_pools_pass(compute: dict, nodes: list, reads: bool) -> None:
    check_placeable(_compute(**compute), nodes, reads=reads)


def test_wait_for_nodes_warns_instead() -> None:
    with pytest.warns(UserWarning, match=r"no node has them.*waiting for the autoscaler"):
        check_placeable(_compute(num_gpus=1, wait_for_nodes=True), LAPTOP, stage="perturb")
