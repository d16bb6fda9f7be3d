"""Distributed ITC: two CPU processes (gloo) equal one process on the concatenated batch.

Each process encodes its local slice with the tiny X-VLM, computes the ITC loss with the features of both processes
(`gather_with_grad`), back-propagates and averages the gradients over processes (what DDP does). The result must
equal the loss and gradients of one process on the concatenated batch. With `official_gradient_scaling=True` the
gradients that flow through the gathered features are 1/world_size of that (the official `AllGather`), while the
temperature's is not.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _setup():
    from modeling_xvlm import XVLMConfig, XVLMModel

    torch.manual_seed(0)
    config = XVLMConfig.from_preset("tiny", text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = XVLMModel(config).eval()  # eval: no dropout; gradients are still computed
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(5, 3, 64, 64, generator=g)
    input_ids = torch.randint(5, 128, (5, 6), generator=g)
    input_ids[:, 0] = 2
    image_ids = torch.tensor([0, 1, 1, 2, 0])  # repeated ids across the two processes: soft targets
    return model, pixel_values, input_ids, image_ids


def _itc(model, pixel_values, input_ids, image_ids, **kwargs):
    from modeling_xvlm.losses import image_text_contrastive_loss

    image = model.get_image_features(pixel_values).pooler_output
    text = model.get_text_features(input_ids).pooler_output
    return image_text_contrastive_loss(image, text, model.temp, image_ids, **kwargs)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case, rows, kwargs in (
            ("default", [slice(0, 3), slice(3, 5)], {}),  # unequal local batches (3 and 2)
            ("equal", [slice(0, 2), slice(2, 4)], {}),
            ("official", [slice(0, 2), slice(2, 4)], {"official_gradient_scaling": True}),
        ):
            model, pixel_values, input_ids, image_ids = _setup()
            local = rows[rank]
            loss = _itc(model, pixel_values[local], input_ids[local], image_ids[local], **kwargs)
            loss.backward()
            grads = _grads(model)
            for grad in grads.values():  # DDP: average over processes
                dist.all_reduce(grad)
                grad /= WORLD
            results[case] = {"loss": loss.detach(), "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(n_rows: int) -> dict:
    model, pixel_values, input_ids, image_ids = _setup()
    loss = _itc(model, pixel_values[:n_rows], input_ids[:n_rows], image_ids[:n_rows], gather=False)
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(model)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process_on_the_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    for case, n_rows in (("default", 5), ("equal", 4)):
        ref = _reference(n_rows)
        for result in ranks:
            assert torch.allclose(result[case]["loss"], ref["loss"], atol=1e-6), case
        grads = ranks[0][case]["grads"]
        assert set(grads) == set(ref["grads"])
        for name, grad in grads.items():
            assert torch.allclose(grad, ref["grads"][name], atol=1e-5, rtol=1e-3), (case, name)

    # Official AllGather: every gradient that flows through the gathered features is 1/world_size too small.
    ref = _reference(4)
    grads = ranks[0]["official"]["grads"]
    assert torch.allclose(ranks[0]["official"]["loss"], ref["loss"], atol=1e-6)
    assert torch.allclose(grads["temp"], ref["grads"]["temp"], atol=1e-5, rtol=1e-3)
    for name, grad in grads.items():
        if name != "temp":
            assert torch.allclose(grad, ref["grads"][name] / WORLD, atol=1e-5, rtol=1e-3), name
