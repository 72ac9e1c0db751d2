"""Gathering with gradients: two gloo processes reproduce one process on the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adaptalign.lightning_modules.controls import Controls
from adaptalign.lightning_modules.gather import all_reduce_sum, gather_rows, gather_with_grad
from adaptalign.lightning_modules.system import AlignmentModule
from tests.helpers.builders import tiny_module
from tests.helpers.distributed import run_distributed

GLOBAL_BATCH = 8


def make_module(text_model: str) -> AlignmentModule:
    module = tiny_module(text_model, temperature=0.2)
    return module.eval()  # no dropout / batch-norm batch statistics: only the gather differs


def make_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    words = ["red", "blue", "circle", "square", "left", "top", "small", "large"]
    texts = [
        f"a {words[i]} {words[(3 * i + 1) % 8]} at the {words[(5 * i + 2) % 8]}" for i in range(8)
    ]
    return {"images": images, "texts": texts}


def loss_and_grads(module: AlignmentModule, batch: dict) -> tuple[torch.Tensor, dict]:
    image = module.encode_images(batch)
    text = module.encode_texts(batch)
    loss = module.contrastive_loss(image, text, batch, Controls()).loss
    module.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _rank_work(rank: int, world: int, text_model: str, out_dir: str) -> None:
    module = make_module(text_model)
    full = make_batch()
    per_rank = GLOBAL_BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    local = {"images": full["images"][rows], "texts": full["texts"][rows]}
    loss, grads = loss_and_grads(module, local)
    # What DDP does: average the loss for reporting and the parameter gradients across ranks.
    dist.all_reduce(loss)
    loss /= world
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    gathered, offset = gather_with_grad(torch.full((rank + 1, 2), float(rank)))
    labels = gather_rows(torch.arange(rank + 1) + 10 * rank)  # integers, outside autograd
    torch.save(
        {"loss": loss, "grads": grads, "gathered": gathered, "offset": offset, "labels": labels},
        f"{out_dir}/rank{rank}.pt",
    )


@pytest.mark.ddp
def test_two_process_loss_and_gradients_equal_one_process(
    tiny_text_model: str, tmp_path: Path
) -> None:
    reference_loss, reference_grads = loss_and_grads(make_module(tiny_text_model), make_batch())
    run_distributed(_rank_work, 2, tmp_path, tiny_text_model, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], reference_loss, atol=1e-6)
        assert result["grads"].keys() == reference_grads.keys()
        for name, grad in reference_grads.items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-6, rtol=1e-4), name
        # Uneven row counts (1 and 2 rows) are gathered in rank order without padding rows.
        assert result["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert result["offset"] == rank
        assert result["labels"].tolist() == [0, 10, 11]
    assert len(reference_grads) > 4  # towers, projections and temperature all receive gradients


def test_gather_rows_on_one_process_is_the_input() -> None:
    rows = torch.arange(6).reshape(3, 2)
    assert gather_rows(rows) is rows


def _sum_work(rank: int, world: int, out_dir: str) -> None:
    values = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
    summed = all_reduce_sum(values)
    torch.save({"values": values, "summed": summed}, f"{out_dir}/sum{rank}.pt")


@pytest.mark.ddp
def test_all_reduce_sum_gives_every_rank_the_total_and_leaves_the_input(tmp_path: Path) -> None:
    values = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(values) is values  # one process: nothing to add
    run_distributed(_sum_work, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        saved = torch.load(tmp_path / f"sum{rank}.pt")
        assert saved["summed"].tolist() == [3.0, 30.0]
        assert saved["values"].tolist() == [rank + 1.0, 10.0 * (rank + 1)]
