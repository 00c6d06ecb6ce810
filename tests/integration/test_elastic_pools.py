"""Elastic actor pools: a node that joins a Ray cluster while a per-item step runs gets work.

The corpus's own ingest UDF (``ingest.IngestChunks``) runs over small chunks of a real
h5ad file through ``filemap.run_per_item`` on a ``ray.cluster_utils.Cluster`` whose head
has one CPU; once the first chunk is done, a node with two CPUs is added. The pool must
grow onto it (a pool sized from the CPUs present at the start would stay at one actor on
the head), and the outputs must equal the same UDF run chunk by chunk without Ray.

Ray Data sees a new node within its autoscaling coordinator's tick (20 s in Ray 2.60), so
chunks processed on the head node are slowed (``HEAD_DELAY_S`` each) and chunks elsewhere
are not: a pool that never grows takes ``n_chunks * HEAD_DELAY_S`` (~70 s), a pool that
grows finishes soon after Ray Data notices the node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import polars as pl

ROWS_PER_CHUNK = 20  # 906 cells -> 46 chunks
HEAD_DELAY_S = 1.5

ELASTIC = textwrap.dedent(
    """
    import json
    import sys
    import threading
    import time
    from pathlib import Path

    from cellfoundry import runtime  # before ray: every Ray socket on 127.0.0.1

    runtime.ensure_cluster_token()  # the token of the test session when it has one
    import ray
    from ray.cluster_utils import Cluster

    from cellfoundry.corpus import catalog, filemap, ingest
    from cellfoundry.genes import GeneTable

    uri, out, rows_per_chunk, head_delay = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


    class RecordNode(ingest.IngestChunks):
        # The corpus's ingest UDF, slowed on the node named by the item and recording the
        # node each chunk ran on.
        def process(self, item):
            node = ray.get_runtime_context().get_node_id()
            if node == item["slow_node"]:
                time.sleep(float(item["delay"]))
            return {**super().process(item), "node": node}


    entry = catalog.DatasetEntry(id="pbmc1k_v3", uri=uri)
    table = GeneTable.load(None)
    genes = ingest.GeneIndex.from_table(table)
    probed = ingest.probe_dataset(entry, 0, genes, table, rows_per_chunk, "elastic")
    plan = {entry.id: {
        "entry": entry, "index": 0, "col_map": probed.col_map, "n_genes": len(genes),
        "flags": genes.flags, "format": probed.gene_report["format"], "metadata_columns": [],
    }}


    def items(name, slow_node=""):
        return [{"dataset_id": entry.id, "start": s, "stop": t, "part_dir": str(out / name),
                 "slow_node": slow_node, "delay": head_delay} for s, t in probed.chunks]


    # The run without the added node: the same UDF, chunk by chunk, in this process.
    reference = ingest.IngestChunks(plan)
    expected = [reference.process(i) for i in items("reference")]

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 1024**2, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    runtime.configure_data_context()
    head = ray.get_runtime_context().get_node_id()
    results = []
    step = threading.Thread(target=lambda: results.extend(
        filemap.run_per_item(items("elastic", head), RecordNode, plan=plan)))
    step.start()
    first = out / "elastic" / f"part-{probed.chunks[0][0]:012d}.json"
    while not first.exists() and step.is_alive():  # the step has started on the head
        time.sleep(0.1)
    added = cluster.add_node(num_cpus=2, object_store_memory=100 * 1024**2)
    running_when_added = step.is_alive()
    step.join()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({
        "head": head, "added": added.node_id, "running_when_added": running_when_added,
        "nodes": [r.pop("node") for r in results], "results": results, "expected": expected,
    }))
    """
)


def test_node_added_mid_step_gets_items(real_h5ad: list[Path], tmp_path: Path) -> None:
    source = next(p for p in real_h5ad if p.name == "scwg_1k_PBMC_v3_filt.h5ad")
    # A short temp dir: Ray's socket paths must stay under 107 bytes.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="cfray-")}
    args = [str(source), str(tmp_path), str(ROWS_PER_CHUNK), str(HEAD_DELAY_S)]
    proc = subprocess.run(
        [sys.executable, "-c", ELASTIC, *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    nodes = run["nodes"]
    assert len(nodes) == len(run["expected"]) == -(-906 // ROWS_PER_CHUNK)
    assert run["running_when_added"], "the step ended before the node joined"
    assert nodes[0] == run["head"]
    on_added = nodes.count(run["added"])
    assert on_added > 0, f"all {len(nodes)} chunks ran on the head; none on the added node"
    assert nodes.count(run["head"]) + on_added == len(nodes)
    # The same results, and the same cell parts, as without the added node.
    assert run["results"] == run["expected"]
    parts = sorted(p.name for p in (tmp_path / "reference").glob("part-*.parquet"))
    assert parts == sorted(p.name for p in (tmp_path / "elastic").glob("part-*.parquet"))
    assert len(parts) == len(nodes)
    for name in parts:
        ref = pl.read_parquet(tmp_path / "reference" / name)
        assert ref.equals(pl.read_parquet(tmp_path / "elastic" / name)), name
