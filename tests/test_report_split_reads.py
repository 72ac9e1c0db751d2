"""Nothing reads the report split before selection is final: its captions join their caption
clusters only when the test split is evaluated, and its head/middle/tail metrics are unchanged."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaptalign.cli import main
from adaptalign.datamodules import builder
from adaptalign.datamodules.builder import cluster_training_captions, feature_cache
from adaptalign.datamodules.clusters import ClusterConfig
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.records import Record
from adaptalign.experiments.stress import without_subcommand_keys
from adaptalign.lightning_cli.cli import build_cli
from adaptalign.lightning_modules.metric_names import GROUPS

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
# Train and dev only: 40 train, 8 dev images; 8 train images are carved as the selection split.
TRAIN_DEV = GeneratedConfig(num_train=40, num_val=8, num_test=0, image_size=32)


def captions(records: Sequence[Record]) -> int:
    return sum(len(r.captions) for r in records)


def ids(records: Sequence[Record]) -> set[int]:
    return {r.image_id for r in records}


@pytest.fixture()
def cluster_work(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every caption-cluster computation on evaluation captions, in order: ``("setup", n)`` for
    the clustering at setup with ``n`` evaluation captions assigned, ``("later", n)`` for ``n``
    captions assigned when a split's loader is built."""
    work: list[tuple[str, int]] = []
    clustered, assigned = builder.cluster_captions, builder.assign_captions

    def at_setup(*args: Any, assign: Sequence[str] = (), **kwargs: Any) -> Any:
        work.append(("setup", len(assign)))
        return clustered(*args, assign=assign, **kwargs)

    def later(captions: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        work.append(("later", len(captions)))
        return assigned(captions, *args, **kwargs)

    monkeypatch.setattr(builder, "cluster_captions", at_setup)
    monkeypatch.setattr(builder, "assign_captions", later)
    return work


def eager_clusters(module: AlignmentDataModule, evaluated: list[Record]) -> Any:
    """What setup made of the clusters when it assigned ``evaluated`` at once."""
    assert module.clusters is not None
    return cluster_training_captions(
        module.splits["train"],
        module.records,
        evaluated,
        module.clusters,
        feature_cache(module.cache_dir),
        summarise=False,
    )


def test_the_report_split_joins_its_clusters_when_its_loader_is_built(
    tmp_path: Path, tiny_text_model: str, cluster_work: list[tuple[str, int]]
) -> None:
    module = AlignmentDataModule(
        generated=TRAIN_DEV,
        cache_dir=str(tmp_path),
        selection_images=8,
        clusters=ClusterConfig(num_clusters=4, text_model=tiny_text_model),
        batch_size=4,
    )
    module.setup()
    val, test = module.splits["val"], module.splits["test"]
    clusters = module.caption_clusters
    assert clusters is not None
    # setup assigns the selection split's captions only
    assert cluster_work == [("setup", captions(val))]
    assert set(clusters.eval_labels) == ids(val) == set(clusters.eval_buckets)
    next(iter(module.val_dataloader()))
    assert cluster_work == [("setup", captions(val))]  # nothing new for val

    batch = next(iter(module.test_dataloader()))
    assert cluster_work[1:] == [("later", captions(test))]
    assigned = module.caption_clusters
    assert assigned is not None
    assert set(assigned.eval_labels) == ids(val) | ids(test) == set(assigned.eval_buckets)
    assert "text_bucket" in batch and "image_bucket" in batch
    module.test_dataloader()
    assert len(cluster_work) == 2  # a second loader of the split embeds nothing again
    # the same clusters and buckets as assigning val and test at once, as setup used to
    eager = eager_clusters(module, val + test)
    for image_id in ids(val) | ids(test):
        assert np.array_equal(assigned.eval_labels[image_id], eager.eval_labels[image_id])
        assert np.array_equal(assigned.eval_buckets[image_id], eager.eval_buckets[image_id])
    np.testing.assert_array_equal(assigned.sizes, clusters.sizes)


@pytest.mark.slow
def test_fit_assigns_the_report_split_only_for_its_evaluation_after_fit(
    tmp_path: Path,
    cache_dir: Path,
    tiny_text_model: str,
    cluster_work: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through fit, the report split's captions are not clustered; the report after fit still
    carries head/middle/tail metrics, from the clusters an eager assignment gives."""
    loaders: list[tuple[str, str, list[tuple[str, int]], set[int]]] = []
    modules: list[AlignmentDataModule] = []
    built = AlignmentDataModule._evaluation_clusters

    def recorded(self: AlignmentDataModule, split: str) -> Any:
        """Each loader built: its split, the trainer's stage, the cluster work and the images
        with evaluation clusters so far."""
        known = set(self.caption_clusters.eval_labels) if self.caption_clusters else set()
        loaders.append((split, self.trainer.state.fn.value, list(cluster_work), known))
        modules.append(self)
        return built(self, split)

    monkeypatch.setattr(AlignmentDataModule, "_evaluation_clusters", recorded)
    summary = tmp_path / "summary.json"
    main(
        [
            "fit",
            "--config",
            TINY,
            "--model.text_tower.model_name",
            tiny_text_model,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_epochs=2",
            "--data.generated.num_test=0",
            "--data.selection_images=16",
            "--data.clusters.num_clusters=4",
            f"--data.clusters.text_model={tiny_text_model}",
            "--trainer.callbacks+=adaptalign.callbacks.run_summary.RunSummary",
            f"--trainer.callbacks.output_path={summary}",
        ]
    )
    module = modules[-1]
    val, test = module.splits["val"], module.splits["test"]
    # every loader of fit (sanity check, validations) finds val assigned and test untouched
    fitting = [entry for entry in loaders if entry[1] == "fit"]
    assert fitting and {entry[0] for entry in fitting} == {"val"}
    for _, _, work, known in fitting:
        assert work == [("setup", captions(val))]
        assert known == ids(val)
    # the report evaluation after fit assigns the report split's captions, once
    (report_loader,) = [entry for entry in loaders if entry[0] == "test"]
    assert report_loader[1] == "test" and report_loader[3] == ids(val)
    assert cluster_work == [("setup", captions(val)), ("later", captions(test))]

    report = json.loads(summary.read_text())["report"]
    grouped = {key: value for key, value in report.items() if key.split("/")[0] in GROUPS}
    assert report["split"] == "test" and grouped
    # the report split's buckets are those an assignment at setup gives, and so are its metrics
    assigned = module.caption_clusters
    assert assigned is not None
    eager = eager_clusters(module, val + test)
    for image_id in ids(test):
        assert np.array_equal(assigned.eval_buckets[image_id], eager.eval_buckets[image_id])
    (version,) = tmp_path.glob("lightning_logs/version_*")
    config = without_subcommand_keys(["--config", str(version / "config.yaml")], tmp_path)
    cli = build_cli([*config, "--trainer.logger=false"], run=False)
    cli.datamodule.setup()
    cli.datamodule.caption_clusters = eager_clusters(cli.datamodule, val + test)
    before = len(cluster_work)
    tested = cli.trainer.test(
        cli.model, datamodule=cli.datamodule, ckpt_path=report["checkpoint"], verbose=False
    )[0]
    assert len(cluster_work) == before  # the eager clusters are all this evaluation used
    expected = {key.removeprefix("test/"): float(value) for key, value in tested.items()}
    assert grouped == pytest.approx({key: expected[key] for key in grouped}, abs=1e-4)
    assert grouped.keys() == {key for key in expected if key.split("/")[0] in GROUPS}
