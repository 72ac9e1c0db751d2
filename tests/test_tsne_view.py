"""t-SNE views: the PNG, determinism, subsampling, the callback in a real fit, predictions files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib.colors
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from adaptalign.callbacks import tsne_view
from adaptalign.callbacks.embedding_writer import EmbeddingWriter
from adaptalign.callbacks.tsne_view import TSNEView, projector_metadata
from adaptalign.cli import main as cli_main
from adaptalign.common import tsne
from adaptalign.common.errors import ConfigurationError
from adaptalign.common.tsne import (
    first_caption_clusters,
    primary_objects,
    subsample,
    tsne_coordinates,
    tsne_figure,
    view_figure,
)
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.datamodules.records import Record
from adaptalign.experiments.tsne import tsne_from_predictions
from tests.helpers.builders import quiet_trainer, tiny_module

FAST = {"perplexity": 5.0, "max_iter": 250}


def embeddings(num_images: int = 12, per_image: int = 3, dim: int = 16, seed: int = 0):
    """Unit-length images and captions near their image; captions listed image by image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=g), dim=1)
    owner = torch.arange(num_images).repeat_interleave(per_image)
    noise = 0.3 * torch.randn(owner.numel(), dim, generator=g)
    texts = torch.nn.functional.normalize(images[owner] + noise, dim=1)
    return images, texts, owner


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0


@pytest.mark.parametrize("with_clusters", [True, False])
def test_figure_is_a_valid_png(tmp_path: Path, with_clusters: bool) -> None:
    images, texts, owner = embeddings()
    clusters = owner % 4 if with_clusters else None
    out = tsne_figure(images, texts, owner, clusters, tmp_path / "sub" / "view.png", **FAST)
    assert out == tmp_path / "sub" / "view.png"
    assert_png(out)


def test_coordinates_are_deterministic_for_a_seed() -> None:
    images, texts, owner = embeddings()
    first = tsne_coordinates(images, texts, owner, seed=3, max_points=8, **FAST)
    again = tsne_coordinates(images, texts, owner, seed=3, max_points=8, **FAST)
    other = tsne_coordinates(images, texts, owner, seed=4, max_points=8, **FAST)
    assert first.images.shape == (8, 2) and first.texts.shape == (24, 2)
    assert np.array_equal(first.images, again.images)
    assert np.array_equal(first.texts, again.texts)
    assert np.array_equal(first.image_rows, again.image_rows)
    assert not np.array_equal(first.image_rows, other.image_rows)
    assert np.isfinite(first.images).all() and np.isfinite(first.texts).all()


def test_subsampling_keeps_every_caption_of_kept_images() -> None:
    owner = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 9])
    rows, text_rows = subsample(10, owner, 4, seed=0)
    assert rows.size == 4 and np.all(np.diff(rows) > 0)
    assert text_rows.tolist() == [t for t, o in enumerate(owner) if o in set(rows.tolist())]
    again, _ = subsample(10, owner, 4, seed=0)
    assert np.array_equal(rows, again)
    everything, all_texts = subsample(10, owner, 10, seed=0)
    assert everything.tolist() == list(range(10)) and all_texts.tolist() == list(range(16))


def test_coordinates_link_each_kept_text_to_its_kept_image() -> None:
    images, texts, owner = embeddings(num_images=10, per_image=2)
    c = tsne_coordinates(images, texts, owner, seed=1, max_points=5, **FAST)
    assert c.text_rows.size == 10  # 5 images x 2 captions
    assert np.array_equal(c.image_rows[c.text_image], owner.numpy()[c.text_rows])


def test_perplexity_is_clamped_below_the_number_of_points() -> None:
    images, texts, owner = embeddings(num_images=3, per_image=1)
    c = tsne_coordinates(images, texts, owner, perplexity=30.0, max_iter=250)
    assert c.perplexity == pytest.approx(5 / 3)  # 6 points: (6 - 1) / 3
    assert c.images.shape == (3, 2)


def test_image_cluster_is_its_first_captions() -> None:
    text_image = np.array([1, 0, 1, 0, 2])
    clusters = np.array([7, 4, 9, 5, 3])
    assert first_caption_clusters(text_image, clusters, 4).tolist() == [4, 7, 3, -1]


def test_projector_metadata_rows() -> None:
    rows = projector_metadata(
        torch.tensor([10, 11]),
        torch.tensor([0, 0, 1]),
        ["a\tdog", "a cat\nsits", "two  birds"],
        torch.tensor([3, 1, 2]),
    )
    assert rows == [
        ["image", "3", "image 10"],
        ["image", "2", "image 11"],
        ["text", "3", "a dog"],
        ["text", "1", "a cat sits"],
        ["text", "2", "two birds"],
    ]
    plain = projector_metadata(torch.tensor([5]), torch.tensor([0]), ["x"], None)
    assert plain == [["image", "none", "image 5"], ["text", "none", "x"]]


def test_primary_object_is_the_first_recorded_one() -> None:
    records = [
        Record(Path("a.png"), ("c",), 7, "val", ("square", "circle")),
        Record(Path("b.png"), ("c",), 3, "val"),  # no objects recorded
        Record(Path("c.png"), ("c",), 5, "val", ("star",)),
    ]
    assert primary_objects(records, [5, 3, 7, 9]) == ["star", "", "square", ""]
    assert primary_objects(None, [1, 2]) == ["", ""]


def test_points_take_their_images_primary_object_with_a_legend_beside_them() -> None:
    """Known objects colour the second panel, not "image id mod 20"; captions like their image."""
    images, texts, owner = embeddings(num_images=6, per_image=2)
    coordinates = tsne_coordinates(images, texts, owner, **FAST)
    objects = ["circle", "square", "circle", "", "star", "square"]
    figure = view_figure(coordinates, image_objects=objects)
    panel = figure.axes[1]
    assert panel.get_title() == "by primary object (3 objects; caption: its image's)"
    legend = panel.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["circle", "square", "star"]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert not legend.get_window_extent(renderer).overlaps(panel.get_window_extent(renderer))
    texts_drawn, images_drawn = panel.collections
    image_colours = images_drawn.get_facecolors()
    legend_colours = {
        t.get_text(): matplotlib.colors.to_rgba(h.get_color())
        for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }
    assert len(set(legend_colours.values())) == 3
    for row, name in enumerate(objects):
        expected = (0.6, 0.6, 0.6, 1.0) if not name else legend_colours[name]
        assert tuple(image_colours[row]) == pytest.approx(expected)
    # each caption has its image's colour
    caption_colours = texts_drawn.get_facecolors()
    assert np.allclose(caption_colours, image_colours[owner.numpy()])
    # unknown everywhere: image ids, and the title says neither clusters nor objects are known
    fallback = view_figure(coordinates, image_objects=[""] * 6).axes[1]
    assert fallback.get_title() == "by image id mod 20 (no clusters or objects known)"
    assert fallback.get_legend() is None


# ------------------------------------------------------------------ the callback on its own


class Experiment:
    """Records what the callback logs."""

    def __init__(self) -> None:
        self.images: list[tuple] = []
        self.embeddings: list[dict] = []

    def add_image(self, tag: str, pixels: np.ndarray, global_step: int, dataformats: str) -> None:
        self.images.append((tag, pixels.shape, global_step, dataformats))

    def add_embedding(self, mat: torch.Tensor, **kwargs: object) -> None:
        self.embeddings.append({"mat": mat, **kwargs})


def fake_trainer(log_dir: Path | None, epoch: int = 0, logger: object = None) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        current_epoch=epoch,
        is_global_zero=True,
        log_dir=None if log_dir is None else str(log_dir),
        logger=logger,
        global_step=17,
    )


def eval_batches(with_clusters: bool) -> list[dict]:
    """Three batches of 4 images with 2 captions each, ids 0..11 (shaped like collate_eval)."""
    images, texts, owner = embeddings(num_images=12, per_image=2)
    batches = []
    for b in range(3):
        ids = torch.arange(4 * b, 4 * b + 4)
        rows = torch.arange(8 * b, 8 * b + 8)
        batch = {
            "images": images[ids],
            "image_id": ids,
            "text_embeddings": texts[rows],
            "text_image_id": owner[rows],
            "text_id": rows,
            "texts": [f"caption {int(r)}\tof image {int(owner[r])}" for r in rows],
        }
        if with_clusters:
            batch["text_cluster"] = rows % 3
        batches.append(batch)
    return batches


def step_outputs(batch: dict) -> dict:
    """What the system's validation step returns for the batch: its embeddings."""
    return {"image_embeddings": batch["images"], "text_embeddings": batch["text_embeddings"]}


def run_validation(view: TSNEView, trainer: SimpleNamespace, with_clusters: bool = True) -> None:
    view.on_validation_epoch_start(trainer, None)  # type: ignore[arg-type]
    for i, batch in enumerate(eval_batches(with_clusters)):
        outputs = step_outputs(batch)
        view.on_validation_batch_end(trainer, None, outputs, batch, i)  # type: ignore[arg-type]
    view.on_validation_epoch_end(trainer, None)  # type: ignore[arg-type]


def test_callback_stops_collecting_at_max_points(tmp_path: Path) -> None:
    experiment = Experiment()
    trainer = fake_trainer(tmp_path, epoch=2, logger=SimpleNamespace(experiment=experiment))
    view = TSNEView(max_points=6, **FAST)
    run_validation(view, trainer)
    assert view.last_path == tmp_path / "tsne" / "tsne_epoch002.png"
    assert_png(view.last_path)
    c = view.last_coordinates
    assert c is not None and c.images.shape == (6, 2) and c.texts.shape == (12, 2)
    assert len(experiment.images) == 1
    tag, shape, step, formats = experiment.images[0]
    assert (tag, step, formats) == ("val/tsne", 17, "HWC") and shape[2] == 3
    [logged] = experiment.embeddings
    assert logged["mat"].shape == (18, 16)  # 6 images then their 12 captions
    assert logged["metadata_header"] == ["modality", "cluster", "text"]
    assert logged["global_step"] == 2
    metadata = logged["metadata"]
    assert metadata[0] == ["image", "0", "image 0"]  # image 0's first caption is text 0: 0 % 3
    assert metadata[5] == ["image", "1", "image 5"]  # image 5's first caption is text 10
    assert metadata[6] == ["text", "0", "caption 0 of image 0"]
    assert metadata[-1] == ["text", "2", "caption 11 of image 5"]
    assert all("\t" not in cell and "\n" not in cell for row in metadata for cell in row)


def test_callback_without_clusters_and_without_projector(tmp_path: Path) -> None:
    experiment = Experiment()
    trainer = fake_trainer(tmp_path, logger=SimpleNamespace(experiment=experiment))
    view = TSNEView(max_points=100, projector=False, **FAST)
    run_validation(view, trainer, with_clusters=False)
    assert view.last_coordinates is not None and view.last_coordinates.images.shape == (12, 2)
    assert len(experiment.images) == 1 and experiment.embeddings == []


def test_callback_needs_the_steps_embeddings(tmp_path: Path) -> None:
    view = TSNEView(**FAST)
    trainer = fake_trainer(tmp_path)
    view.on_validation_epoch_start(trainer, None)  # type: ignore[arg-type]
    batch = eval_batches(with_clusters=False)[0]
    with pytest.raises(ConfigurationError, match=r"TSNEView needs the validation step's embed"):
        view.on_validation_batch_end(trainer, None, None, batch, 0)  # type: ignore[arg-type]


def test_callback_honours_every_n_epochs_and_sanity_checks(tmp_path: Path) -> None:
    view = TSNEView(every_n_epochs=2, **FAST)
    run_validation(view, fake_trainer(tmp_path, epoch=0))
    assert view.last_path is None and not (tmp_path / "tsne").exists()
    checking = fake_trainer(tmp_path, epoch=1)
    checking.sanity_checking = True
    run_validation(view, checking)
    assert view.last_path is None
    run_validation(view, fake_trainer(tmp_path, epoch=1))  # (1 + 1) % 2 == 0
    assert view.last_path == tmp_path / "tsne" / "tsne_epoch001.png"
    assert sorted(p.name for p in (tmp_path / "tsne").iterdir()) == ["tsne_epoch001.png"]


def test_callback_without_logger_or_log_dir_does_nothing(tmp_path: Path) -> None:
    view = TSNEView(**FAST)
    run_validation(view, fake_trainer(None))
    assert view.last_path is None
    run_validation(view, fake_trainer(tmp_path))  # no logger, but a log dir: still the PNG
    assert_png(tmp_path / "tsne" / "tsne_epoch000.png")


def test_callback_collects_only_on_rank_zero(tmp_path: Path) -> None:
    trainer = fake_trainer(tmp_path)
    trainer.is_global_zero = False
    view = TSNEView(**FAST)
    run_validation(view, trainer)
    assert view.last_path is None and not (tmp_path / "tsne").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, r"every_n_epochs=0; expected an integer >= 1"),
        ({"max_points": 0}, r"max_points=0; expected an integer >= 1"),
        ({"perplexity": 0.0}, r"perplexity=0.0; expected a number > 0"),
        ({"max_iter": 100}, r"max_iter=100; expected an integer >= 250"),
    ],
)
def test_bad_callback_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TSNEView(**kwargs)


# --------------------------------------------------------------------------- with real runs


def generated_data(tmp_path: Path) -> AlignmentDataModule:
    return AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )


@pytest.mark.slow
def test_fit_writes_the_view_and_tensorboard_gets_it(tiny_text_model: str, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    view = TSNEView(**FAST)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, logger=logger, callbacks=[view])
    drawn, fitted, validated = [], [], []

    def record(*args, image_objects=None):
        drawn.append((args[3].tolist(), image_objects))  # image ids, their objects
        return plot_coordinates(*args, image_objects=image_objects)

    def fit(images, texts, *args):
        fitted.append((images, texts))
        return tsne_coordinates(images, texts, *args)

    module = tiny_module(tiny_text_model)
    encode_images = module.encode_images

    def counted(batch: dict) -> torch.Tensor:
        rows = encode_images(batch)
        if trainer.validating and not trainer.sanity_checking:
            validated.append(rows.shape[0])
        return rows

    plot_coordinates = tsne_view.plot_coordinates
    data = generated_data(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tsne_view, "plot_coordinates", record)
        patch.setattr(tsne_view, "tsne_coordinates", fit)
        patch.setattr(module, "encode_images", counted)
        trainer.fit(module, data)
    # the towers ran once over the validation images: the view took the step's embeddings,
    # which are exactly the system's embeddings of those images and their captions
    assert sum(validated) == 8
    module.eval()
    with torch.no_grad():
        batches = list(data.val_dataloader())
        images = torch.cat([encode_images(b) for b in batches])
        texts = torch.cat([module.encode_texts(b) for b in batches])
    [(shown_images, shown_texts)] = fitted
    assert torch.equal(shown_images, images) and torch.equal(shown_texts, texts)
    # the generated data knows every image's objects: the view is coloured by the first one
    [(ids, objects)] = drawn
    truth = {r.image_id: r.objects[0] for r in data.records}
    assert len(ids) == 8 and objects == [truth[i] for i in ids] and all(objects)
    log_dir = Path(logger.log_dir)
    png = log_dir / "tsne" / "tsne_epoch000.png"
    assert_png(png)
    assert view.last_path == png
    c = view.last_coordinates
    assert c is not None and c.images.shape == (8, 2) and c.texts.shape == (40, 2)  # 5 captions
    logger.experiment.flush()
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert "val/tsne" in events.Tags()["images"]
    assert (log_dir / "projector_config.pbtxt").is_file()
    [metadata] = list(log_dir.glob("*/val_embeddings/metadata.tsv"))
    lines = metadata.read_text().splitlines()
    assert lines[0] == "modality\tcluster\ttext"
    assert len(lines) == 1 + 8 + 40
    assert all(len(line.split("\t")) == 3 for line in lines)


def test_view_from_a_predictions_file(tiny_text_model: str, tmp_path: Path, capsys) -> None:
    written = tmp_path / "embeddings_test.pt"
    writer = EmbeddingWriter(output_path=str(written))
    trainer = quiet_trainer(callbacks=[writer])
    trainer.predict(
        tiny_module(tiny_text_model), generated_data(tmp_path), return_predictions=False
    )
    out = tsne_from_predictions(written, tmp_path / "view.png", max_points=4, **FAST)
    assert out == tmp_path / "view.png"
    assert_png(out)
    capsys.readouterr()
    assert (
        cli_main(
            ["tsne", str(written), "--max-points", "3", "--perplexity", "4", "--max-iter", "250"]
        )
        == 0
    )
    default = tmp_path / "embeddings_test_tsne.png"
    assert_png(default)
    printed = capsys.readouterr().out
    # it says what it does, then how the fit goes, every 50 iterations, then where the view is
    stages = [
        f"read 8 images and 40 captions from {written}",
        "t-SNE of 18 points (3 images, 15 captions), exact gradient, 250 iterations; progress "
        "every 50:",
        "[t-SNE] Iteration 50:",
        "[t-SNE] Iteration 250:",
        f"wrote {default}",
    ]
    positions = [printed.index(stage) for stage in stages]
    assert positions == sorted(positions)


def test_a_predictions_file_with_objects_colours_by_them(tmp_path: Path) -> None:
    images, texts, owner = embeddings(num_images=4, per_image=2)
    data = {
        "image_embeddings": images,
        "image_id": torch.arange(4),
        "text_embeddings": texts,
        "text_image_id": owner,
    }
    drawn = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tsne, "plot_coordinates", lambda *a, **k: drawn.append(k))
        good = write(tmp_path / "good.pt", {**data, "image_objects": ["a", "b", "", "a"]})
        tsne_from_predictions(good, tmp_path / "x.png", **FAST)
    assert drawn == [{"image_objects": ["a", "b", "", "a"]}]
    bad = write(tmp_path / "bad.pt", {**data, "image_objects": ["a", "b"]})
    with pytest.raises(ConfigurationError, match=r"bad\.pt: image_objects must be a list of one"):
        tsne_from_predictions(bad, tmp_path / "x.png", **FAST)


def write(path: Path, value: object) -> Path:
    torch.save(value, path)
    return path


def test_bad_prediction_files_are_named(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(ConfigurationError, match=r"absent\.pt: embeddings file not found"):
        tsne_from_predictions(missing, tmp_path / "x.png")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a torch file")
    with pytest.raises(ConfigurationError, match=r"garbage\.pt: cannot be loaded"):
        tsne_from_predictions(garbage, tmp_path / "x.png")
    listed = write(tmp_path / "list.pt", [1, 2])
    with pytest.raises(ConfigurationError, match=r"list\.pt: holds a list; expected a torch"):
        tsne_from_predictions(listed, tmp_path / "x.png")
    images, texts, owner = embeddings(num_images=4, per_image=2)
    partial = write(tmp_path / "partial.pt", {"image_embeddings": images, "image_id": owner})
    with pytest.raises(
        ConfigurationError, match=r"partial\.pt: missing key\(s\) text_embeddings, text_image_id"
    ):
        tsne_from_predictions(partial, tmp_path / "x.png")
    stray = write(
        tmp_path / "stray.pt",
        {
            "image_embeddings": images,
            "image_id": torch.arange(4),
            "text_embeddings": texts,
            "text_image_id": owner + 2,
        },
    )
    with pytest.raises(ConfigurationError, match=r"stray\.pt: text_image_id names images not"):
        tsne_from_predictions(stray, tmp_path / "x.png")
    shaped = write(
        tmp_path / "shaped.pt",
        {
            "image_embeddings": images,
            "image_id": torch.arange(3),
            "text_embeddings": texts,
            "text_image_id": owner,
        },
    )
    with pytest.raises(ConfigurationError, match=r"shaped\.pt: expected image_embeddings"):
        tsne_from_predictions(shaped, tmp_path / "x.png")
    with pytest.raises(SystemExit) as done:
        cli_main(["tsne", str(missing)])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith(f"adaptalign: error: {missing}: embeddings file")
    assert not (tmp_path / "x.png").exists()
